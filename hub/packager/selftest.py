"""Self-test vectors: sample rows with the outputs the packaged model must reproduce.

The agent runs them when it loads a version and rolls back on a mismatch, so a vector
must not fail on a healthy device:
- only rows without missing values (NaN is not valid JSON) and with finite outputs;
- for classifiers, rows the model is sure about (top two probabilities at least
  MIN_MARGIN apart), so a last-bit difference between CPUs cannot flip the label;
- for an int8 model, a tolerance of a few output quantization steps: int8 kernels differ
  between CPU generations (VNNI or not) and graph optimisation levels by a step or so.

Pure: takes arrays, returns manifest values.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from agent.package.manifest import SelfTest, Tensor
from agent.serving.datatypes import from_numpy
from hub.errors import PackagingError
from hub.packager.convert import INPUT, PROBABILITIES
from hub.packager.estimator import CLASSIFICATION

SELF_TEST_ROWS = 8
MIN_MARGIN = 0.1
FP32_ATOL = 1e-4
RTOL = 1e-3
INT8_STEPS = 4
_INT8_LEVELS = 255


def pick_rows(
    x: NDArray[np.float32], outputs: dict[str, NDArray[Any]], task: str, k: int = SELF_TEST_ROWS
) -> NDArray[np.intp]:
    """Indices of up to k usable rows, spread over the sample."""
    usable = ~np.isnan(x).any(axis=1)
    for value in outputs.values():
        if value.dtype.kind == "f":
            usable &= np.isfinite(value.reshape(value.shape[0], -1)).all(axis=1)
    if task == CLASSIFICATION:
        top2 = np.sort(outputs[PROBABILITIES], axis=1)[:, -2:]
        sure = usable & (top2[:, -1] - top2[:, 0] >= MIN_MARGIN)
        if sure.any():
            usable = sure
    candidates = np.flatnonzero(usable)
    if candidates.size == 0:
        raise PackagingError(
            "no sample row without missing values gives finite outputs; "
            "the self-test needs at least one"
        )
    spread = np.unique(np.linspace(0, candidates.size - 1, min(k, candidates.size)).round())
    picked: NDArray[np.intp] = candidates[spread.astype(np.intp)]
    return picked


def tolerance(kept_int8: bool, outputs: dict[str, NDArray[Any]]) -> tuple[float, float]:
    """(atol, rtol) for the self-test, from the kept model's outputs on the whole sample."""
    if not kept_int8:
        return FP32_ATOL, RTOL
    step = 0.0
    for value in outputs.values():
        finite = value[np.isfinite(value)] if value.dtype.kind == "f" else None
        if finite is not None and finite.size:
            step = max(step, float(finite.max() - finite.min()) / _INT8_LEVELS)
    return max(FP32_ATOL, INT8_STEPS * step), RTOL


def tensor(name: str, value: NDArray[Any]) -> Tensor:
    datatype = from_numpy(value.dtype)
    flat = value.ravel()
    data = [str(v) for v in flat] if datatype == "BYTES" else flat.tolist()
    return Tensor(name=name, datatype=datatype, shape=tuple(int(d) for d in value.shape), data=data)


def self_test(
    rows: NDArray[np.float32],
    expected: dict[str, NDArray[Any]],
    atol: float,
    rtol: float,
) -> SelfTest:
    """The manifest's self-test: `rows` as input, `expected` (name -> array) as outputs."""
    return SelfTest(
        inputs=(tensor(INPUT, rows),),
        outputs=tuple(tensor(name, value) for name, value in expected.items()),
        atol=atol,
        rtol=rtol,
    )
