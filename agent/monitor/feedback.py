"""Ground truth for predictions already made: a bounded book of recent prediction ids, and scoring. Pure.

Every answered inference has an id (the request's, or one the agent made up and returned). The
book remembers, for the newest `capacity` ids, which version answered and what it predicted
(per row). `POST /v1/feedback {"id": ..., "label": ...}` takes the entry out (one label per
prediction) and `score` compares: for classification, how many rows were right; for regression,
the sums of absolute and squared errors. Those counts go into the version's current summary
window, so accuracy adds up across windows and devices like every other figure.

Memory: one dict entry per id holding an int or float for a single-row prediction (a tuple for
several rows), about 150 bytes each: the default 10,000 ids cost about 1.5 MB.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

__all__ = ["FeedbackError", "PredictionBook", "Score", "score"]

Owner = TypeVar("Owner")
Prediction = int | float | tuple[int | float, ...]


class FeedbackError(ValueError):
    """A label that cannot be scored against its prediction (the caller's mistake)."""


class PredictionBook(Generic[Owner]):
    """The newest `capacity` prediction ids, each with its owner (the version) and prediction."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError("capacity must not be negative")
        self.capacity = capacity
        self._entries: dict[str, tuple[Owner, Prediction]] = {}
        self.forgotten = 0  # ids pushed out by newer ones

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, prediction_id: str) -> bool:
        return prediction_id in self._entries

    def add(self, prediction_id: str, owner: Owner, prediction: Prediction) -> None:
        if self.capacity == 0:
            return
        entries = self._entries
        # A reused id (clients choose their own) is a new prediction: it moves to the newest end.
        entries.pop(prediction_id, None)
        entries[prediction_id] = (owner, prediction)
        if len(entries) > self.capacity:
            del entries[next(iter(entries))]  # dicts keep insertion order: the oldest goes
            self.forgotten += 1

    def take(self, prediction_id: str) -> tuple[Owner, Prediction] | None:
        return self._entries.pop(prediction_id, None)

    def drop_owner(self, owner: Owner) -> int:
        """Forget the predictions of an owner that is gone (an unloaded version)."""
        gone = [k for k, (o, _) in self._entries.items() if o is owner]
        for k in gone:
            del self._entries[k]
        return len(gone)


@dataclass(frozen=True)
class Score:
    labelled: int
    correct: int = 0
    abs_error: float = 0.0
    sq_error: float = 0.0


def _rows(value: Any, n: int, what: str) -> list[Any]:
    if n == 1 and not isinstance(value, list):
        return [value]
    if not isinstance(value, list) or len(value) != n:
        raise FeedbackError(f"the prediction has {n} rows: {what} must be a list of {n} labels")
    return value


def _class_text(label: Any) -> str:
    if isinstance(label, bool) or not isinstance(label, str | int | float):
        raise FeedbackError(f"label {label!r} must be a string or a number")
    if isinstance(label, float) and label.is_integer():
        return str(int(label))  # 1.0 is class "1"
    return str(label)


def score(kind: str | None, labels: Sequence[str], prediction: Prediction, label: Any) -> Score:
    """Compare `label` (one per row of the prediction) with what was predicted.

    Classification: labels are class names (or numbers, matched as text: 1 and 1.0 are "1") among
    `labels`; a prediction of a class not among them (-1) or none (-2) is simply wrong. Regression:
    numbers; rows whose prediction is NaN are not scored. Raises FeedbackError for a label that
    does not fit (unknown class, not a number, wrong count) and for a version with nothing to
    score (task "other").
    """
    predicted = list(prediction) if isinstance(prediction, tuple) else [prediction]
    given = _rows(label, len(predicted), "label")
    if kind == "classification":
        index = {text: i for i, text in enumerate(labels)}
        wanted = []
        for value in given:
            text = _class_text(value)
            if text not in index:
                raise FeedbackError(f"label {value!r} is not one of the model's labels {list(labels)}")
            wanted.append(index[text])
        correct = sum(1 for p, w in zip(predicted, wanted, strict=True) if p == w)
        return Score(labelled=len(wanted), correct=correct)
    if kind == "regression":
        pairs: list[tuple[float, float]] = []
        for p, value in zip(predicted, given, strict=True):
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise FeedbackError(f"label {value!r} must be a finite number for a regression model")
            if math.isfinite(p):
                pairs.append((float(p), float(value)))
        errors = [abs(p - v) for p, v in pairs]
        return Score(labelled=len(pairs), abs_error=sum(errors), sq_error=sum(e * e for e in errors))
    raise FeedbackError(
        "this model's task is neither classification nor regression: there is nothing to score"
    )
