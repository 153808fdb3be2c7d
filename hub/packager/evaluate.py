"""How good and how fast a converted model is, and whether int8 is kept.

Classification is scored by accuracy, regression by R² (with MAE alongside). The
reference is the sample's targets when given, else the scikit-learn model's own
predictions (then "accuracy" is agreement with the original model).

Pure functions over arrays, plus `evaluate`, which drives a `Runner` (the onnxruntime
adapter in `session`, or a fake in tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from hub.errors import PackagingError
from hub.packager.convert import LABEL, PREDICTION
from hub.packager.estimator import CLASSIFICATION
from hub.packager.session import Runner

DEFAULT_TOLERANCE = 0.01
INT8 = "int8"
FP32 = "fp32"


@dataclass(frozen=True)
class Evaluation:
    accuracy: float  # classification: accuracy; regression: R²
    mae: float | None  # regression only
    latency_us: float  # median single-row latency


@dataclass(frozen=True)
class Decision:
    kept: str  # INT8 or FP32
    reason: str


def encode_classes(values: NDArray[Any], classes: tuple[Any, ...], what: str) -> NDArray[np.int64]:
    """Map label values to indices into `classes`.

    A value matches a class by its text ("setosa", "2") or, for numeric classes, by its
    number, so a CSV target "1.0" matches class 1.
    """
    by_text = {str(c): i for i, c in enumerate(classes)}
    by_number: dict[float, int] = {}
    for i, c in enumerate(classes):
        if isinstance(c, int | float) and not isinstance(c, bool):
            by_number[float(c)] = i
    texts = np.asarray(values).astype(np.str_)
    unique, inverse = np.unique(texts, return_inverse=True)
    index = np.empty(len(unique), dtype=np.int64)
    for u, text in enumerate(unique.tolist()):
        if text in by_text:
            index[u] = by_text[text]
            continue
        try:
            index[u] = by_number[float(text)]
        except (ValueError, KeyError):
            shown = ", ".join(map(str, classes[:10])) + (", ..." if len(classes) > 10 else "")
            raise PackagingError(
                f"{what} value {text!r} is not one of the model's classes ({shown})"
            ) from None
    encoded: NDArray[np.int64] = index[inverse.ravel()]
    return encoded


def regression_targets(values: NDArray[Any], what: str) -> NDArray[np.float64]:
    try:
        return np.asarray(values).astype(np.float64)
    except ValueError:
        raise PackagingError(f"{what} values must be numbers for a regressor") from None


def accuracy(predicted: NDArray[np.int64], truth: NDArray[np.int64]) -> float:
    return float(np.mean(predicted == truth))


def r2_score(predicted: NDArray[np.float64], truth: NDArray[np.float64]) -> float:
    residual = float(np.sum((truth - predicted) ** 2))
    total = float(np.sum((truth - truth.mean()) ** 2))
    if total == 0.0:
        # A constant reference: perfect if matched exactly, otherwise no skill (sklearn's rule).
        return 1.0 if residual == 0.0 else 0.0
    return 1.0 - residual / total


def mean_absolute_error(predicted: NDArray[np.float64], truth: NDArray[np.float64]) -> float:
    return float(np.mean(np.abs(truth - predicted)))


def evaluate(
    runner: Runner,
    x: NDArray[np.float32],
    truth: NDArray[Any],
    task: str,
    classes: tuple[Any, ...],
) -> Evaluation:
    """Score `runner` on the rows `x` against `truth` (class indices, or numbers)."""
    outputs = runner.run(x)
    if task == CLASSIFICATION:
        predicted = encode_classes(outputs[LABEL], classes, "predicted label")
        score, mae = accuracy(predicted, truth), None
    else:
        values = outputs[PREDICTION].astype(np.float64).ravel()
        score, mae = r2_score(values, truth), mean_absolute_error(values, truth)
    return Evaluation(accuracy=score, mae=mae, latency_us=runner.median_latency_us(x))


def decide(fp32: Evaluation, int8: Evaluation | None, tolerance: float, why_none: str) -> Decision:
    """Keep int8 only when it scores within `tolerance` (absolute) of FP32."""
    if int8 is None:
        return Decision(FP32, why_none)
    loss = fp32.accuracy - int8.accuracy
    # A hair of slack so that a loss of exactly `tolerance` is not lost to float rounding.
    if loss <= tolerance + 1e-12:
        return Decision(
            INT8, f"int8 scores {int8.accuracy:.4f}, within {tolerance} of fp32 {fp32.accuracy:.4f}"
        )
    return Decision(
        FP32,
        f"int8 scores {int8.accuracy:.4f}, more than {tolerance} below fp32 {fp32.accuracy:.4f}",
    )
