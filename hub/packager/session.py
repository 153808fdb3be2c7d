"""onnxruntime behind a small interface: the packager's only contact with the runtime.

`OrtModel` loads a serialized model and runs it; `Runner` is the interface the pure
evaluation code depends on, so it can be tested with a fake.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from agent.package.manifest import TensorSpec
from agent.serving.datatypes import from_ort_type
from hub.errors import PackagingError
from hub.packager.convert import INPUT

# Latency is measured on up to this many sample rows, each run this many times after
# one warm-up pass; the median over all runs is reported.
LATENCY_ROWS = 100
LATENCY_REPEATS = 3

# ORT_LOGGING_LEVEL_ERROR: keep onnxruntime's own warnings about graph rewrites out of
# the operator's terminal; real failures still raise.
_ORT_LOG_ERROR = 3


class Runner(Protocol):
    """A loaded model that maps a batch of FP32 rows to named output arrays."""

    def run(self, x: NDArray[np.float32]) -> dict[str, NDArray[Any]]: ...

    def median_latency_us(self, x: NDArray[np.float32]) -> float: ...


def _spec(arg: Any) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape)
    return TensorSpec(name=arg.name, datatype=from_ort_type(arg.type), shape=shape)


class OrtModel:
    """An onnxruntime CPU session, one intra-op thread (a small device's share of a core)."""

    def __init__(self, model: bytes, what: str) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = _ORT_LOG_ERROR
        try:
            self._session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        # onnxruntime raises its own pybind exception classes (Fail, InvalidGraph, ...)
        # that share no useful base besides RuntimeError/Exception.
        except Exception as exc:
            raise PackagingError(f"onnxruntime cannot load the {what} model: {exc}") from exc
        self.what = what
        self.inputs = tuple(_spec(a) for a in self._session.get_inputs())
        self.outputs = tuple(_spec(a) for a in self._session.get_outputs())
        self._names = [o.name for o in self.outputs]

    def run(self, x: NDArray[np.float32]) -> dict[str, NDArray[Any]]:
        try:
            results = self._session.run(self._names, {INPUT: x})
        except Exception as exc:
            raise PackagingError(f"onnxruntime failed to run the {self.what} model: {exc}") from exc
        return {name: np.asarray(value) for name, value in zip(self._names, results, strict=True)}

    def median_latency_us(self, x: NDArray[np.float32]) -> float:
        rows = x[:LATENCY_ROWS]
        feeds = [{INPUT: rows[i : i + 1]} for i in range(rows.shape[0])]
        for feed in feeds:  # warm-up: first runs allocate and pick kernels
            self._session.run(self._names, feed)
        timings: list[int] = []
        for _ in range(LATENCY_REPEATS):
            for feed in feeds:
                start = time.perf_counter_ns()
                self._session.run(self._names, feed)
                timings.append(time.perf_counter_ns() - start)
        return float(np.median(timings)) / 1000.0
