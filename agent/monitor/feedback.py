"""Ground truth for predictions already made: a bounded book of recent prediction ids, and scoring.
Pure (numpy).

Every answered inference has an id (the request's, or one the agent made up and returned). The
book remembers, for the newest `capacity` ids, which version answered and what it predicted
(per row). `POST /v1/feedback {"id": ..., "label": ...}` takes the entry out (one label per
prediction) and `score` compares: for classification, how many rows were right; for regression,
the sums of absolute and squared errors. Those counts go into the version's current summary
window, so accuracy adds up across windows and devices like every other figure.

Memory: per prediction 8 bytes for the id the agent made and the prediction's own bytes (numpy),
plus the text of ids that clients chose: the default 10,000 ids cost about 0.2 MB.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np
from numpy.typing import NDArray

__all__ = ["FeedbackError", "PredictionBook", "Score", "score"]

Owner = TypeVar("Owner")
_HEX_DIGITS = "0123456789abcdef"
Prediction = int | float | tuple[int | float, ...]


class FeedbackError(ValueError):
    """A label that cannot be scored against its prediction (the caller's mistake)."""


@dataclass
class _Batch(Generic[Owner]):
    owner: Owner
    seqs: NDArray[np.int64]  # ids the agent made, by their counter; -1: another id (in `names`)
    names: list[str | None] | None  # ids given as text (the clients'), or None when there are none
    predictions: NDArray[Any]  # one per row
    offsets: NDArray[np.int64] | None  # id i predicted rows offsets[i]:offsets[i + 1]; None: one each
    taken: set[int] = field(default_factory=set)  # ids already labelled

    def __len__(self) -> int:
        return int(self.seqs.shape[0])

    def prediction(self, i: int) -> Prediction:
        if self.offsets is None:
            value: Prediction = self.predictions[i].item()
            return value
        return tuple(self.predictions[self.offsets[i] : self.offsets[i + 1]].tolist())


@dataclass(frozen=True)
class Found(Generic[Owner]):
    owner: Owner
    prediction: Prediction
    batch: _Batch[Owner]
    index: int


class PredictionBook(Generic[Owner]):
    """The newest `capacity` predictions (give or take one batch), each with its owner (the version).

    Kept as the batches the monitor counted them in, as arrays: the ids the agent made itself
    (`own_prefix` + a hexadecimal counter, what most apps get) as their counters, 8 bytes each,
    the predictions as the numpy array they came in; only ids chosen by clients are kept as text.
    Adding costs a few arrays per batch, never an object per prediction, which matters on the
    request path and in memory; finding an id searches the batches, newest first (a reused id
    means the newest prediction), once per label.
    """

    def __init__(self, capacity: int, own_prefix: str = "") -> None:
        if capacity < 0:
            raise ValueError("capacity must not be negative")
        self.capacity = capacity
        self.own_prefix = own_prefix
        self._batches: deque[_Batch[Owner]] = deque()
        self._size = 0
        self.forgotten = 0  # predictions pushed out by newer ones

    def __len__(self) -> int:
        return self._size

    def add_batch(
        self,
        owner: Owner,
        predictions: NDArray[Any],
        offsets: NDArray[np.int64] | None = None,
        *,
        seqs: NDArray[np.int64] | None = None,
        names: list[str | None] | None = None,
    ) -> None:
        """Predictions of one batch: per id its counter (`seqs`, -1 when the id is in `names`)."""
        if self.capacity == 0:
            return
        if seqs is None:
            if names is None:
                raise ValueError("add_batch needs seqs or names")
            seqs = np.full(len(names), -1, dtype=np.int64)
        if not len(seqs):
            return
        self._batches.append(_Batch(owner, seqs, names, predictions, offsets))
        self._size += len(seqs)
        while self._size - len(self._batches[0]) >= self.capacity:
            gone = self._batches.popleft()
            self._size -= len(gone)
            self.forgotten += len(gone)

    def add(self, prediction_id: str, owner: Owner, prediction: Prediction) -> None:
        """One prediction (of one row, or a tuple of rows), by its id as text."""
        if isinstance(prediction, tuple):
            offsets = np.array([0, len(prediction)], dtype=np.int64)
            self.add_batch(owner, np.asarray(prediction), offsets, names=[prediction_id])
        else:
            self.add_batch(owner, np.asarray([prediction]), names=[prediction_id])

    def _own_seq(self, prediction_id: str) -> int | None:
        prefix = self.own_prefix
        if not prefix or not prediction_id.startswith(prefix):
            return None
        # Exactly what the app writes (f"{counter:x}", counting from 1): int(..., 16) alone also
        # takes "-1" (the mark of a client's id in `seqs`), "+a", "0xa", "a_b" and " a".
        text = prediction_id[len(prefix) :]
        if not 0 < len(text) <= 15 or text[0] == "0" or text.strip(_HEX_DIGITS):
            return None
        return int(text, 16)

    def take(self, prediction_id: str) -> Found[Owner] | None:
        """Find a prediction and mark it labelled (one label per prediction); `restore` undoes that."""
        seq = self._own_seq(prediction_id)
        for batch in reversed(self._batches):
            hits: set[int] = set()
            if seq is not None:
                hits.update(int(i) for i in np.flatnonzero(batch.seqs == seq))
            if batch.names is not None:  # also when it looks like ours: a client may choose any id
                hits.update(i for i, name in enumerate(batch.names) if name == prediction_id)
            for i in sorted(hits, reverse=True):
                if i not in batch.taken:
                    batch.taken.add(i)
                    return Found(batch.owner, batch.prediction(i), batch, i)
        return None

    def restore(self, found: Found[Owner]) -> None:
        """The label was refused: the prediction may be labelled again."""
        found.batch.taken.discard(found.index)

    def drop_owner(self, owner: Owner) -> int:
        """Forget the predictions of an owner that is gone (an unloaded version)."""
        kept = deque(b for b in self._batches if b.owner is not owner)
        dropped = self._size - sum(len(b) for b in kept)
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
