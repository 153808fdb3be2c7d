"""Ground truth for predictions already made: a bounded book of recent prediction ids, and scoring. Pure.

Every answered inference has an id (the request's, or one the agent made up and returned). The
book remembers, for the newest `capacity` ids, which version answered and what it predicted
(per row). `POST /v1/feedback {"id": ..., "label": ...}` takes the entry out (one label per
prediction) and `score` compares: for classification, how many rows were right; for regression,
the sums of absolute and squared errors. Those counts go into the version's current summary
window, so accuracy adds up across windows and devices like every other figure.

Memory: per prediction its id string (which the response made anyway) and its predicted value in
a list, about 100 bytes: the default 10,000 ids cost about 1 MB.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

__all__ = ["FeedbackError", "PredictionBook", "Score", "score"]

Owner = TypeVar("Owner")
Prediction = int | float | tuple[int | float, ...]


class FeedbackError(ValueError):
    """A label that cannot be scored against its prediction (the caller's mistake)."""


@dataclass
class _Batch(Generic[Owner]):
    owner: Owner
    ids: list[str | None]  # None: no id, or already labelled
    predictions: list[Any]  # one per row
    offsets: list[int] | None  # ids[i] predicted rows offsets[i]:offsets[i + 1]; None: one row each


@dataclass(frozen=True)
class Found(Generic[Owner]):
    owner: Owner
    prediction: Prediction
    batch: _Batch[Owner]
    index: int
    prediction_id: str


class PredictionBook(Generic[Owner]):
    """The newest `capacity` predictions (give or take one batch), each with its owner (the version).

    Kept as the batches the monitor counted them in: adding costs a list per batch, not a dict
    entry per prediction, which matters on the request path; finding an id scans the batches,
    newest first (a reused id means the newest prediction), which is a C-speed list search of
    at most `capacity` strings, once per label.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError("capacity must not be negative")
        self.capacity = capacity
        self._batches: deque[_Batch[Owner]] = deque()
        self._size = 0
        self.forgotten = 0  # predictions pushed out by newer ones

    def __len__(self) -> int:
        return self._size

    def add_batch(
        self, owner: Owner, ids: list[str | None], predictions: list[Any], offsets: list[int] | None = None
    ) -> None:
        if self.capacity == 0 or not ids:
            return
        self._batches.append(_Batch(owner, ids, predictions, offsets))
        self._size += len(ids)
        while self._size - len(self._batches[0].ids) >= self.capacity:
            gone = self._batches.popleft()
            self._size -= len(gone.ids)
            self.forgotten += len(gone.ids)

    def add(self, prediction_id: str, owner: Owner, prediction: Prediction) -> None:
        """One prediction (of one row, or a tuple of rows)."""
        if isinstance(prediction, tuple):
            self.add_batch(owner, [prediction_id], list(prediction), [0, len(prediction)])
        else:
            self.add_batch(owner, [prediction_id], [prediction])

    def take(self, prediction_id: str) -> Found[Owner] | None:
        """Find a prediction and mark it labelled (one label per prediction); `restore` undoes that."""
        for batch in reversed(self._batches):
            try:
                i = batch.ids.index(prediction_id)
            except ValueError:
                continue
            batch.ids[i] = None
            if batch.offsets is None:
                prediction: Prediction = batch.predictions[i]
            else:
                prediction = tuple(batch.predictions[batch.offsets[i] : batch.offsets[i + 1]])
            return Found(batch.owner, prediction, batch, i, prediction_id)
        return None

    def restore(self, found: Found[Owner]) -> None:
        """The label was refused: the prediction may be labelled again."""
        found.batch.ids[found.index] = found.prediction_id

    def drop_owner(self, owner: Owner) -> int:
        """Forget the predictions of an owner that is gone (an unloaded version)."""
        kept = deque(b for b in self._batches if b.owner is not owner)
        dropped = self._size - sum(len(b.ids) for b in kept)
        self._batches = kept
        self._size -= dropped
        return dropped


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
