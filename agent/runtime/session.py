"""The onnxruntime adapter: one InferenceSession per loaded model version.

The only module of the serving path that imports onnxruntime. Sessions are set
up for small devices: few threads, no spinning, no CPU memory arena by default.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import ModelLoadError
from agent.package.manifest import TensorSpec
from agent.runtime.providers import CPU, DEFAULT_PROVIDERS, choose_providers
from agent.serving.datatypes import from_ort_type

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SessionOptions:
    intra_op_threads: int = 1
    inter_op_threads: int = 1
    cpu_mem_arena: bool = False
    # Execution providers in order of preference (agent.runtime.providers); CPU is always added last.
    providers: tuple[str, ...] = DEFAULT_PROVIDERS


def available_providers() -> list[str]:
    """The execution providers this onnxruntime build has."""
    import onnxruntime as ort

    return list(ort.get_available_providers())


class OrtSession:
    """A loaded ONNX model. `run` is thread-safe (onnxruntime sessions are)."""

    def __init__(self, model_path: Path, options: SessionOptions) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = options.intra_op_threads
        so.inter_op_num_threads = options.inter_op_threads
        so.enable_cpu_mem_arena = options.cpu_mem_arena
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning threads burn a core between requests; on a shared device that
        # costs more than the few microseconds of wake-up it saves.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        so.log_severity_level = 4  # errors reach the caller and our log; onnxruntime need not print them too
        choice = choose_providers(options.providers, ort.get_available_providers())
        reasons = list(choice.reasons)
        try:
            self._session = ort.InferenceSession(
                str(model_path), sess_options=so, providers=list(choice.providers)
            )
        except Exception as exc:  # onnxruntime raises several unrelated types
            if choice.providers == (CPU,):
                raise ModelLoadError(f"onnxruntime could not load {model_path}: {exc}") from exc
            # An accelerator present in the build can still fail on this device (a missing
            # driver or library, an operator it refuses): the CPU provider runs every model.
            reasons.append(f"{', '.join(choice.providers[:-1])} failed at session creation ({exc}); on CPU")
            log.warning("%s: %s", model_path, reasons[-1])
            try:
                self._session = ort.InferenceSession(str(model_path), sess_options=so, providers=[CPU])
            except Exception as exc2:
                raise ModelLoadError(f"onnxruntime could not load {model_path}: {exc2}") from exc2
        # What onnxruntime actually registered: it can drop a provider it cannot initialise
        # without raising.
        self.providers: tuple[str, ...] = tuple(self._session.get_providers())
        dropped = [p for p in choice.providers if p not in self.providers and not _noted(p, reasons)]
        if dropped:
            reasons.append(f"onnxruntime did not register {', '.join(dropped)}")
        self.provider_note = "; ".join(reasons) if reasons else "as configured"
        if reasons:
            log.warning("%s runs on %s: %s", model_path, ", ".join(self.providers), self.provider_note)
        self.inputs = tuple(self._spec(a) for a in self._session.get_inputs())
        self.outputs = tuple(self._spec(a) for a in self._session.get_outputs())
        self.output_names = [o.name for o in self.outputs]
        self.input_map = {s.name: s for s in self.inputs}
        self._run = self._direct_run() or self._session.run

    def _direct_run(self) -> Callable[[list[str], Mapping[str, np.ndarray]], Sequence[np.ndarray]] | None:
        """onnxruntime's own run, past the Python wrapper, with one RunOptions for every call.

        Per call the wrapper checks the input names (decode_infer_request has checked them against
        this signature) and, given no RunOptions, the binding makes a new one: together about 1.5
        µs of the ~10 µs a one-row run of a small model costs (tests/benchmarks: `_sess.run` with
        a kept RunOptions 9.6 µs, `run` 11.3 µs). Only on the CPU provider alone: with an
        accelerator the wrapper's fall back to CPU on a provider failure is worth its checks.
        None when the binding is not there as expected (another onnxruntime version)."""
        import onnxruntime as ort

        inner = getattr(self._session, "_sess", None)
        run = getattr(inner, "run", None)
        if self.providers != (CPU,) or run is None:
            return None
        options = ort.RunOptions()

        def direct(names: list[str], inputs: Mapping[str, np.ndarray]) -> Sequence[np.ndarray]:
            result: Sequence[np.ndarray] = run(names, inputs, options)
            return result

        return direct

    def provider_status(self) -> dict[str, Any]:
        """For /v1/status: the providers in use, in order, and why they are not what was configured."""
        return {"providers": list(self.providers), "providers_note": self.provider_note}

    @staticmethod
    def _spec(arg: object) -> TensorSpec:
        shape = tuple(d if isinstance(d, int) else -1 for d in getattr(arg, "shape", ()) or ())
        try:
            datatype = from_ort_type(str(getattr(arg, "type", "")))
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from exc
        return TensorSpec(str(getattr(arg, "name", "")), datatype, shape)

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        results: Sequence[np.ndarray] = self._run(self.output_names, inputs)
        return dict(zip(self.output_names, results, strict=True))


def _noted(provider: str, reasons: list[str]) -> bool:
    return any(provider in r for r in reasons)
