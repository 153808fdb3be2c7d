"""Per-window summaries of one model version: what it was asked, what it answered, how fast.

Pure: numpy and the standard library, no I/O, no clocks read behind the caller's back
(the clock is injected). The caller feeds every request to `WindowSummary.observe`,
asks `due(now)` and publishes what `close(now)` returns.

Everything in a closed window is a count (or an integer sum), so windows add up:
`merge(a, b)` sums two windows of the same model version, across time or across
devices, and is associative and commutative (exactly: latency sums are integer
microseconds, not floats).

Window schema (JSON-ready, `SCHEMA`):

    {"schema": "outpost-summary/1", "model": "wine", "version": 3,
     "start": 1700000000.0, "end": 1700000060.0,   # clock seconds; merge: min / max
     "windows": 1,                                  # windows merged into this one
     "requests": 120, "errors": 2,                  # requests observed, of which failed
     "rows": 470,                                   # input rows of the successful requests
     "latency": {"bounds": [...LATENCY_BUCKETS], "counts": [...], "sum_us": 81234},
                                                    # counts[i]: bounds[i-1] < s <= bounds[i];
                                                    # the last count is above the last bound
     "features": [{"name": "alcohol", "kind": "numeric",
                   "counts": [...],                 # one per reference bin / category
                   "missing": 0,                    # NaN (numeric) or NaN/None/"" (categorical)
                   "other": 0}],                    # categorical: not a reference category;
                                                    # numeric: present values when the reference
                                                    # had no bins (every reference value missing)
     "prediction": {"kind": "classification", "labels": ["0", "1", "2"],
                    "counts": [...], "other": 0, "missing": 0}
              or   {"kind": "regression", "counts": [...], "other": 0, "missing": 0}
              or   null,                            # task "other", or no prediction profile
     "feedback": {"labelled": 40, "correct": 37}   # classification: labels fed back this window
              or {"labelled": 40, "abs_error_sum": 3.2, "sq_error_sum": 0.9}   # regression
              or null,                              # no prediction kind: nothing to score
     "shadow": {"compared": 120, "agreed": 117}    # a shadow experiment's candidate: its answers to
              or null,                              # copies, compared row by row with the stable's
     "cache": {"hits": 90, "misses": 30}           # the version's response cache: requests answered
              or null}                              # from it, and looked up in it but not there

For every feature, sum(counts) + missing + other == rows; likewise for the prediction.
Feedback counts the labels that arrived during the window (for predictions made in it or
earlier), so accuracy over a range is sum(correct) / sum(labelled) of its windows.

Feature counts are in the reference profile's bins, binned as the packager built them
(agent.monitor.binning). The edges themselves are not repeated in the window: the hub has
the signed profile of the model version.

Of a failed request only its count is kept (in requests and errors): its inputs may be
malformed and it has no outputs, so it adds nothing to the feature and prediction counts.
The agent fills the latency histogram from its answers (the same buckets as its
Prometheus histogram, `add_answers`), so sum(latency counts) == requests - errors there;
`observe` used on its own also buckets the latencies of failed requests.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from agent.metrics import LATENCY_BUCKETS
from agent.monitor.binning import Categories, FeatureBinner, edges_index

__all__ = ["SCHEMA", "WindowSummary", "merge"]

SCHEMA = "outpost-summary/1"
LABEL = "label"
PROBABILITIES = "probabilities"
PREDICTION = "prediction"

IntArray = NDArray[np.int64]


class _Predictions:
    """Counts predictions: classes (label output, else argmax of probabilities) or regression bins."""

    def __init__(self, task: str, profile: Mapping[str, Any], labels: Sequence[str]) -> None:
        self.kind: str | None = None
        pred = profile.get("prediction") or {}
        if task == "classification":
            self.kind = task
            self.labels = tuple(labels) or tuple(str(v) for v in pred.get("labels", []))
            self.size = len(self.labels)
            self._classes = Categories(self._label_values(self.labels))
        elif task == "regression":
            self.kind = task
            edges = [float(v) for v in pred.get("bin_edges", [])]
            self._edges = np.asarray(edges, dtype=np.float64)
            self.size = max(len(edges) - 1, 0)
        self.reset()

    @staticmethod
    def _label_values(labels: tuple[str, ...]) -> list[Any]:
        # Labels are the text of the classes ("0", "setosa"); integer classes also match
        # an INT64 label output, or a float one, by number.
        try:
            return [int(v) for v in labels]
        except ValueError:
            return list(labels)

    def reset(self) -> None:
        self.counts = np.zeros(getattr(self, "size", 0), dtype=np.int64)
        self.other = 0
        self.missing = 0

    def observe(self, outputs: Mapping[str, NDArray[Any]], rows: int) -> NDArray[Any] | None:
        """Count the rows' predictions; returns them per row (class index, -1 for a class not in
        the labels, -2 missing; or the regression value), None when there are none to score."""
        if self.kind == "classification":
            if LABEL in outputs:
                index = self._classes.index(np.asarray(outputs[LABEL]).ravel())
            elif PROBABILITIES in outputs:
                probs = np.asarray(outputs[PROBABILITIES])
                index = np.argmax(probs.reshape(probs.shape[0], -1), axis=1).astype(np.int64)
                index[index >= self.size] = -1
            else:
                self.missing += rows
                return None
            self.missing += int((index == -2).sum())
            self.other += int((index == -1).sum())
            self.counts += np.bincount(index[index >= 0], minlength=self.size)
            return index
        if self.kind == "regression":
            if PREDICTION in outputs:
                values = np.asarray(outputs[PREDICTION], dtype=np.float64).ravel()
            elif len(outputs) == 1:
                values = np.asarray(next(iter(outputs.values())), dtype=np.float64).ravel()
            else:
                self.missing += rows
                return None
            nan = np.isnan(values)
            self.missing += int(nan.sum())
            present = values[~nan]
            if self.size == 0:
                self.other += int(present.size)
            else:
                self.counts += np.bincount(edges_index(self._edges, present), minlength=self.size)
            return values
        return None

    def to_json(self) -> dict[str, Any] | None:
        if self.kind is None:
            return None
        doc: dict[str, Any] = {"kind": self.kind}
        if self.kind == "classification":
            doc["labels"] = list(self.labels)
        doc.update(counts=[int(c) for c in self.counts], other=self.other, missing=self.missing)
        return doc


class WindowSummary:
    """The running window of one model version; see the module docstring for what it holds.

    A window is due when it has seen `window_requests` requests, or `window_seconds` have
    passed since it started (either may be None, not both). `clock` gives the start of the
    first window; afterwards each window starts where the previous one was closed.
    """

    def __init__(
        self,
        model: str,
        version: int,
        profile: Mapping[str, Any],
        labels: Sequence[str] = (),
        task: str = "other",
        window_requests: int | None = None,
        window_seconds: float | None = None,
        clock: Callable[[], float] | None = None,
        input_names: Sequence[str] = (),
    ) -> None:
        if window_requests is None and window_seconds is None:
            raise ValueError("a summary window needs window_requests, window_seconds or both")
        if (window_requests is not None and window_requests < 1) or (
            window_seconds is not None and not window_seconds > 0
        ):
            raise ValueError("window_requests must be >= 1 and window_seconds > 0")
        if clock is None:
            import time

            clock = time.time
        self.model = model
        self.version = version
        self.window_requests = window_requests
        self.window_seconds = window_seconds
        self.binner = FeatureBinner.from_profile(profile, input_names)
        self._predictions = _Predictions(task, profile, labels)
        self._reset(clock())

    def _reset(self, start: float) -> None:
        self.start = start
        self.requests = 0
        self.errors = 0
        self.rows = 0
        self._latency = [0] * (len(LATENCY_BUCKETS) + 1)
        self._latency_us = 0
        self._binned = self.binner.empty()
        self._counts = self._binned.counts.copy()
        self._missing = self._binned.missing.copy()
        self._other = self._binned.other.copy()
        self._predictions.reset()
        self.labelled = 0
        self.correct = 0
        self.abs_error_sum = 0.0
        self.sq_error_sum = 0.0
        self.shadow_compared = 0
        self.shadow_agreed = 0
        self.cache_hits = 0
        self.cache_misses = 0

    @property
    def prediction_kind(self) -> str | None:
        return self._predictions.kind

    @property
    def labels(self) -> tuple[str, ...]:
        return self._predictions.labels if self._predictions.kind == "classification" else ()

    def observe(
        self,
        inputs: NDArray[Any] | None,
        outputs: Mapping[str, NDArray[Any]] | None,
        latency_s: float,
        ok: bool,
    ) -> None:
        """Record one request: its input rows, its outputs (when ok) and its latency."""
        if ok:
            self.observe_batch(inputs, outputs, (latency_s,), 0)
        else:
            self.observe_batch(None, None, (latency_s,), 1)

    def observe_batch(
        self,
        inputs: NDArray[Any] | None,
        outputs: Mapping[str, NDArray[Any]] | None,
        latencies_s: Sequence[float],
        failed: int,
        rows: int | None = None,
    ) -> NDArray[Any] | None:
        """Record many requests at once, which costs about what one does.

        `latencies_s` has one entry per request, failed ones included, of which `failed`
        failed; `inputs` and `outputs` are the rows of the successful ones, concatenated.
        `rows` (the successful requests' rows) is needed only when `inputs` is None.
        Returns the per-row predictions (see `_Predictions.observe`) for scoring feedback.
        """
        n = len(latencies_s)
        if not 0 <= failed <= n:
            raise ValueError("failed must be between 0 and the number of latencies")
        # What can fail (an input of the wrong shape) runs before anything is counted, so a
        # batch is counted whole or not at all.
        binned = None
        if inputs is not None:
            x = np.asarray(inputs)
            rows = int(x.shape[0]) if x.ndim >= 1 else 1
            if self.binner.n_features:
                binned = self.binner.bin_rows(x)
        rows = rows or 0
        predictions = self._predictions.observe(outputs, rows) if outputs is not None else None
        if binned is not None:
            self._counts += binned.counts
            self._missing += binned.missing
            self._other += binned.other
        self.rows += rows
        self.requests += n
        self.errors += failed
        if n == 1:  # the common case of observe(): no arrays for one number
            latency = latencies_s[0]
            self._latency[bisect_left(LATENCY_BUCKETS, latency)] += 1
            self._latency_us += max(round(latency * 1e6), 0)
        elif n:
            lat = np.asarray(latencies_s, dtype=np.float64)
            buckets = np.searchsorted(LATENCY_BUCKETS, lat, side="left")
            counts = np.bincount(buckets, minlength=len(self._latency))
            self._latency = [a + int(b) for a, b in zip(self._latency, counts.tolist(), strict=True)]
            self._latency_us += int(np.maximum(np.rint(lat * 1e6), 0).sum())
        return predictions

    def add_answers(self, requests: int, errors: int, latency_counts: Sequence[int], latency_us: int) -> None:
        """Requests counted elsewhere (the agent's metrics): how many, how many failed, and the
        latency histogram (LATENCY_BUCKETS, the overflow last) with its sum in microseconds."""
        if len(latency_counts) != len(self._latency):
            raise ValueError(f"expected {len(self._latency)} latency counts, got {len(latency_counts)}")
        self.requests += requests
        self.errors += errors
        self._latency = [a + int(b) for a, b in zip(self._latency, latency_counts, strict=True)]
        self._latency_us += latency_us

    def add_shadow(self, compared: int, agreed: int) -> None:
        """Rows of shadow copies compared with the primary's answers, and how many agreed."""
        self.shadow_compared += compared
        self.shadow_agreed += agreed

    def add_cache(self, hits: int, misses: int) -> None:
        """Requests the response cache answered (hits; they are among `requests` too) and requests it
        was asked for and did not hold (misses: the model answered them)."""
        self.cache_hits += hits
        self.cache_misses += misses

    def add_feedback(
        self, labelled: int, correct: int = 0, abs_error: float = 0.0, sq_error: float = 0.0
    ) -> None:
        """Labels fed back for `labelled` rows: how many were right (classification), or the sums
        of absolute and squared errors (regression)."""
        self.labelled += labelled
        self.correct += correct
        self.abs_error_sum += abs_error
        self.sq_error_sum += sq_error

    def _feedback_json(self) -> dict[str, Any] | None:
        kind = self._predictions.kind
        if kind == "classification":
            return {"labelled": self.labelled, "correct": self.correct}
        if kind == "regression":
            return {
                "labelled": self.labelled,
                "abs_error_sum": self.abs_error_sum,
                "sq_error_sum": self.sq_error_sum,
            }
        return None

    def due(self, now: float) -> bool:
        if self.window_requests is not None and self.requests >= self.window_requests:
            return True
        return self.window_seconds is not None and now - self.start >= self.window_seconds

    def close(self, now: float) -> dict[str, Any]:
        """The window as JSON values; a new, empty window starts at `now`."""
        features = []
        for f, (name, kind) in enumerate(zip(self.binner.names, self.binner.kinds, strict=True)):
            lo, hi = self.binner.offsets[f], self.binner.offsets[f + 1]
            features.append(
                {
                    "name": name,
                    "kind": kind,
                    "counts": [int(c) for c in self._counts[lo:hi]],
                    "missing": int(self._missing[f]),
                    "other": int(self._other[f]),
                }
            )
        window = {
            "schema": SCHEMA,
            "model": self.model,
            "version": self.version,
            "start": self.start,
            "end": now,
            "windows": 1,
            "requests": self.requests,
            "errors": self.errors,
            "rows": self.rows,
            "latency": {
                "bounds": list(LATENCY_BUCKETS),
                "counts": list(self._latency),
                "sum_us": self._latency_us,
            },
            "features": features,
            "prediction": self._predictions.to_json(),
            "feedback": self._feedback_json(),
            "shadow": (
                {"compared": self.shadow_compared, "agreed": self.shadow_agreed}
                if self.shadow_compared
                else None
            ),
            "cache": (
                {"hits": self.cache_hits, "misses": self.cache_misses}
                if self.cache_hits or self.cache_misses
                else None
            ),
        }
        self._reset(now)
        return window


_SUMMED = ("windows", "requests", "errors", "rows")
_COUNTS = ("counts", "missing", "other")


def _add_counts(a: Mapping[str, Any], b: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Adds the count fields of two feature / prediction entries whose other fields are equal."""
    layout_a = {k: v for k, v in a.items() if k not in _COUNTS}
    layout_b = {k: v for k, v in b.items() if k not in _COUNTS}
    if layout_a != layout_b or len(a["counts"]) != len(b["counts"]):
        raise ValueError(f"cannot merge windows: {where} differs")
    return {
        **layout_a,
        "counts": [x + y for x, y in zip(a["counts"], b["counts"], strict=True)],
        "missing": a["missing"] + b["missing"],
        "other": a["other"] + b["other"],
    }


def merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """The sum of two windows of the same model version (of one device or several).

    Counts add, start is the earlier start and end the later end. Raises ValueError when
    the windows are not of the same schema, model, version and layout (bins, labels).
    Returns a new dict; neither argument is changed.
    """
    for key in ("schema", "model", "version"):
        if a[key] != b[key]:
            raise ValueError(f"cannot merge windows: {key} {a[key]!r} != {b[key]!r}")
    la, lb = a["latency"], b["latency"]
    if la["bounds"] != lb["bounds"]:
        raise ValueError("cannot merge windows: latency bounds differ")
    if len(a["features"]) != len(b["features"]):
        raise ValueError("cannot merge windows: feature count differs")
    pa, pb = a["prediction"], b["prediction"]
    if (pa is None) != (pb is None):
        raise ValueError("cannot merge windows: prediction differs")
    return {
        "schema": a["schema"],
        "model": a["model"],
        "version": a["version"],
        "start": min(a["start"], b["start"]),
        "end": max(a["end"], b["end"]),
        **{k: a[k] + b[k] for k in _SUMMED},
        "latency": {
            "bounds": list(la["bounds"]),
            "counts": [x + y for x, y in zip(la["counts"], lb["counts"], strict=True)],
            "sum_us": la["sum_us"] + lb["sum_us"],
        },
        "features": [
            _add_counts(fa, fb, f"feature {i}")
            for i, (fa, fb) in enumerate(zip(a["features"], b["features"], strict=True))
        ],
        "prediction": None if pa is None else _add_counts(pa, pb, "prediction"),
        "feedback": _add_feedback(a.get("feedback"), b.get("feedback")),
        "shadow": _add_shadow(a.get("shadow"), b.get("shadow")),
        "cache": _add_cache(a.get("cache"), b.get("cache")),
    }


def _add_shadow(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> dict[str, Any] | None:
    # None is "nothing compared" (or an agent from before shadows): zero, not a different layout.
    if a is None:
        return None if b is None else dict(b)
    if b is None:
        return dict(a)
    return {"compared": a["compared"] + b["compared"], "agreed": a["agreed"] + b["agreed"]}


def _add_cache(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> dict[str, Any] | None:
    # None is "no cache, or nothing looked up" (or an agent from before the cache): zero.
    if a is None:
        return None if b is None else dict(b)
    if b is None:
        return dict(a)
    return {"hits": a["hits"] + b["hits"], "misses": a["misses"] + b["misses"]}


def _add_feedback(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if a is None or b is None:
        if a is not b:
            raise ValueError("cannot merge windows: feedback differs")
        return None
    if set(a) != set(b):
        raise ValueError("cannot merge windows: feedback differs")
    return {k: a[k] + b[k] for k in a}
