"""The monitor at run time: records what each loaded version answers, closes windows, publishes them.

Cost on the request path: the response path appends the request's latency to a list
(`VersionMonitor.record`); the batcher, after a batch's answers went out, hands over the batch's
own concatenated inputs and outputs with the requests' prediction ids (`observe`: one append per
onnxruntime batch, no per-request arrays). Every `FLUSH_REQUESTS` requests (and every tick) what is
held is counted in one go: one concatenation of the batches, one vectorised binning pass, one
searchsorted for the latencies, one bincount for the predictions
(`WindowSummary.observe_batch`). The cost is measured in `make bench` (monitor on vs off).

The daemon calls `tick()` about once a second on the event loop: it flushes, closes the
windows that are due, publishes each non-empty window as a `summary` and, when the window has
enough rows, its drift tests against the reference profile as a `drift` message. A window of
`window_requests` closes at the end of the batch that reaches the count (so it may hold a few
more). Publishing goes through the telemetry outbox (on disk first), so windows survive broker
outages and restarts within the outbox's bounds; a window still open when the agent stops is
published then, and one open when it is killed is lost (at most one window per version).

Monitoring never fails a request: an error while counting is logged (once per version), counted
in `status()["errors"]`, and the requests it held are left out of the window.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import operator
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.config import MonitorConfig
from agent.errors import NotFound, RequestError
from agent.monitor.drift import DriftDetector
from agent.monitor.feedback import FeedbackError, PredictionBook, score
from agent.monitor.report import drift_message
from agent.monitor.summary import WindowSummary
from agent.runtime.batcher import BatchArrays, BatchItem

if TYPE_CHECKING:
    from agent.monitor.capture import Capture
    from agent.runtime.registry import LoadedVersion

log = logging.getLogger(__name__)

FLUSH_REQUESTS = 256  # requests held before they are counted together
SHADOW_ID_SUFFIX = "~shadow"  # as agent.serving.app files a shadow copy's prediction
_SIZE = operator.attrgetter("size")
_PREDICTION_ID = operator.attrgetter("ticket.prediction_id")
_PREDICTION_SEQ = operator.attrgetter("ticket.prediction_seq")

Publish = Callable[[str, Mapping[str, Any]], object]
# One batch as the batcher ran it: the inputs and outputs counted, and its requests' ids (the
# agent's counters, -1 for another id) with the text of the other ids (None when there are none),
# and their rows.
_Batch = tuple[
    Mapping[str, np.ndarray], Mapping[str, np.ndarray], list[int], list[str | None] | None, list[int]
]


class VersionMonitor:
    """The running window, drift state and pending observations of one loaded version."""

    def __init__(
        self,
        lv: LoadedVersion,
        config: MonitorConfig,
        book: PredictionBook[VersionMonitor],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = lv.name
        self.version = lv.version
        m = lv.manifest
        self.profile: Mapping[str, Any] = m.reference_profile
        self._book = book
        # Answers and their latencies come from the version's own metrics (agent.metrics), which
        # the response path keeps anyway: the window takes the difference since its last flush.
        self._metrics = lv.metrics
        self._seen_answers = lv.metrics.requests
        self._seen_latency = list(lv.metrics.latency.counts)
        self._seen_latency_s = lv.metrics.latency.sum
        # The response cache's hits and misses, read like the answers (agent.runtime.cache).
        self._cache = lv.cache
        self._seen_cache = (lv.cache.hits, lv.cache.misses) if lv.cache is not None else (0, 0)
        self._failed = 0  # requests the model failed since the last flush
        self._batches: list[_Batch] = []  # onnxruntime batches since the last flush
        self._pending = 0  # requests in _batches
        self._window_requests = config.window_requests
        # Called when the window has its window_requests requests (the Monitor closes and
        # publishes it); None: windows close on the Monitor's ticks only.
        self.on_full: Callable[[VersionMonitor], None] | None = None
        self._warned = False
        # Data capture for retraining (agent.monitor.capture), when the monitor has it.
        self.capture: Capture | None = None
        self.errors = 0
        self.windows = 0
        self.drift_windows = 0
        self.alert = False
        self.last_drift: dict[str, Any] | None = None

        def window(profile: Mapping[str, Any], input_names: tuple[str, ...]) -> WindowSummary:
            return WindowSummary(
                lv.name,
                lv.version,
                profile,
                labels=m.labels,
                task=m.task,
                window_requests=config.window_requests or None,
                window_seconds=config.window_s,
                clock=clock,
                input_names=input_names,
            )

        try:
            self.summary = window(m.reference_profile, m.features)
        except ValueError as exc:
            # A profile that does not describe the inputs: summaries go on without feature counts.
            log.warning("%s version %d: no feature counts in summaries: %s", lv.name, lv.version, exc)
            self.profile = {"prediction": m.reference_profile.get("prediction")}
            self.summary = window(self.profile, ())
        self._columns = self._input_columns(lv)
        self._outputs = self._output_names(lv)
        self.detector = DriftDetector(
            alpha=config.drift_alpha,
            k=config.drift_k,
            method="bonferroni" if config.drift_correction == "bonferroni" else "bh",
            psi_threshold=config.psi_threshold or None,
        )

    def _input_columns(self, lv: LoadedVersion) -> tuple[str, ...] | None:
        """The inputs that hold the profile's features: one rows x features tensor, or one
        tensor per feature (named like it). None: the features cannot be found (not counted)."""
        n = self.summary.binner.n_features
        if n == 0:
            return None
        specs = lv.session.inputs
        if len(specs) == 1 and (specs[0].shape[-1:] == (n,) or (n == 1 and len(specs[0].shape) == 1)):
            return (specs[0].name,)
        names = self.summary.binner.names
        if {s.name for s in specs} >= set(names):
            return names
        log.warning(
            "%s version %d: the reference profile's %d features are not the inputs %s: no feature counts",
            lv.name,
            lv.version,
            n,
            [s.name for s in specs],
        )
        return None

    def _output_names(self, lv: LoadedVersion) -> tuple[str, ...]:
        """The outputs the prediction counts read (see summary._Predictions); only these are kept."""
        names = [s.name for s in lv.session.outputs]
        kind = self.summary.prediction_kind
        if kind == "classification":
            return tuple(n for n in ("label", "probabilities") if n in names)[:1]
        if kind == "regression":
            return ("prediction",) if "prediction" in names else tuple(names[:1]) if len(names) == 1 else ()
        return ()

    # -- request path -------------------------------------------------------------------------

    def add_shadow(self, compared: int, agreed: int) -> None:
        """A shadow copy this version answered, compared with the stable answer (agent.runtime.experiment)."""
        self.summary.add_shadow(compared, agreed)

    def record_failure(self) -> None:
        """A request the model failed (a 5xx). Answers need no call: they are in the metrics."""
        self._failed += 1

    def _unflushed_requests(self) -> int:
        return self._metrics.requests - self._seen_answers + self._failed

    def observe(
        self,
        items: Sequence[BatchItem],
        outcomes: Sequence[Mapping[str, np.ndarray] | BaseException] | None,
        arrays: BatchArrays | None,
    ) -> None:
        """One onnxruntime batch, from the batcher after its answers went out (a `BatchObserver`;
        outcomes None: the requests shared the call, each one's outcome its rows of the outputs).

        `arrays` are the batch's own concatenated inputs and outputs when it ran as one call: kept
        as they are, with the batch's items (prediction ids and rows are read at the flush), so
        the serving path pays one append per batch. Otherwise each answered request's arrays.
        """
        if self.capture is not None:
            self.capture.observe(self.name, self.version, items, outcomes, arrays)
        # Only the arrays counted and the ids are kept, not the requests: holding 256 requests'
        # objects until the flush cost more (in cache misses) than the counting itself.
        if arrays is not None:
            self._batches.append(self._keep(arrays[0], arrays[1], items))
            self._pending += len(items)
        elif outcomes is not None:
            for item, out in zip(items, outcomes, strict=True):
                if not isinstance(out, BaseException):
                    self._batches.append(self._keep(item.inputs, out, (item,)))
                    self._pending += 1
        if self._pending >= FLUSH_REQUESTS or (self._window_requests and self.window_full()):
            if self.on_full is not None and self.window_full():
                self.on_full(self)
            else:
                self.flush()

    def _keep(
        self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray], items: Sequence[BatchItem]
    ) -> _Batch:
        columns = self._columns
        kept_inputs = {c: inputs[c] for c in columns} if columns is not None else {}
        names = self._outputs
        seqs = list(map(_PREDICTION_SEQ, items))
        texts = list(map(_PREDICTION_ID, items)) if -1 in seqs else None  # only clients' ids as text
        return kept_inputs, {k: outputs[k] for k in names}, seqs, texts, list(map(_SIZE, items))

    def holds(self, prediction_id: str) -> bool:
        """Whether a request with this id (one the client or a shadow copy chose) waits to be counted."""
        return any(b[3] is not None and prediction_id in b[3] for b in self._batches)

    def window_full(self) -> bool:
        return bool(self._window_requests) and (
            self.summary.requests + self._unflushed_requests() >= self._window_requests
        )

    # -- counting -----------------------------------------------------------------------------

    def _matrix(self, batch: list[Mapping[str, np.ndarray]]) -> np.ndarray | None:
        columns = self._columns
        if columns is None:
            return None
        if len(columns) == 1:
            name = columns[0]
            x = np.concatenate([b[name] for b in batch]) if len(batch) > 1 else np.asarray(batch[0][name])
            return x.reshape(len(x), -1) if x.ndim != 2 else x
        parts = [np.column_stack([np.asarray(b[c]).reshape(-1) for c in columns]) for b in batch]
        return np.concatenate(parts)

    def flush(self) -> None:
        batches, self._batches = self._batches, []
        self._pending = 0
        self._take_answers()
        if not batches:
            return
        try:
            self._count(batches)
        except Exception:  # counting must never break serving
            # One odd request (an input of another shape) spoils the lot: count the batches
            # one by one, so only what cannot be counted is left out.
            for one in batches:
                try:
                    self._count([one])
                except Exception as exc:
                    self.errors += len(one[2])
                    if not self._warned:
                        self._warned = True
                        log.warning(
                            "%s version %d: monitoring failed, %d request(s) left out: %r",
                            self.name,
                            self.version,
                            len(one[2]),
                            exc,
                        )

    def _take_answers(self) -> None:
        m = self._metrics
        answers = m.requests - self._seen_answers
        failed, self._failed = self._failed, 0
        if not answers and not failed:
            return
        counts = list(m.latency.counts)
        latency = [now - seen for now, seen in zip(counts, self._seen_latency, strict=True)]
        latency_us = max(round((m.latency.sum - self._seen_latency_s) * 1e6), 0)
        self._seen_answers, self._seen_latency, self._seen_latency_s = m.requests, counts, m.latency.sum
        self.summary.add_answers(answers + failed, failed, latency, latency_us)
        cache = self._cache
        if cache is not None:
            hits, misses = cache.hits, cache.misses
            self.summary.add_cache(hits - self._seen_cache[0], misses - self._seen_cache[1])
            self._seen_cache = (hits, misses)

    def _count(self, batches: list[_Batch]) -> None:
        # Per batch (not per request) list comprehensions, then numpy over all the rows.
        x = self._matrix([b[0] for b in batches])
        names = tuple(batches[0][1])
        if len(batches) == 1:
            outputs = dict(batches[0][1])
        else:
            outputs = {k: np.concatenate([b[1][k] for b in batches]) for k in names}
        sizes = list(itertools.chain.from_iterable(b[4] for b in batches))
        rows = sum(sizes)
        predictions = self.summary.observe_batch(x, outputs, (), 0, rows=rows)
        if predictions is None or self._book.capacity == 0 or len(predictions) != rows:
            return  # nothing to score feedback against (or not one output per row)
        seqs = np.fromiter(itertools.chain.from_iterable(b[2] for b in batches), np.int64, len(sizes))
        texts = None
        if any(b[3] is not None for b in batches):
            texts = [t for b in batches for t in (b[3] if b[3] is not None else [None] * len(b[2]))]
        offsets = None
        if rows != len(sizes):
            offsets = np.fromiter(itertools.accumulate(sizes, initial=0), np.int64, len(sizes) + 1)
        self._book.add_batch(self, predictions, offsets, seqs=seqs, names=texts)

    # -- feedback and windows -----------------------------------------------------------------

    def add_feedback(self, prediction: Any, label: Any) -> dict[str, Any]:
        s = score(self.summary.prediction_kind, self.summary.labels, prediction, label)
        self.summary.add_feedback(s.labelled, s.correct, s.abs_error, s.sq_error)
        result: dict[str, Any] = {"model": self.name, "version": self.version, "labelled": s.labelled}
        if self.summary.prediction_kind == "classification":
            result["correct"] = s.correct
        else:
            result["abs_error"] = s.abs_error
        return result

    def close(self, now: float, min_rows: int) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """Close the window: (summary, drift), each None when there is nothing to publish."""
        self.flush()
        window = self.summary.close(now)
        feedback = window.get("feedback") or {}
        if window["requests"] == 0 and not feedback.get("labelled"):
            return None, None  # an idle window says nothing new
        self.windows += 1
        drift = None
        if window["rows"] >= min_rows and (self.profile.get("features") or self.profile.get("prediction")):
            try:
                drift = drift_message(window, self.profile, self.detector)
            except ValueError as exc:
                log.warning("%s version %d: drift not tested: %s", self.name, self.version, exc)
            else:
                self.drift_windows += 1
                self.last_drift = drift
                if drift["alert"] and not self.alert:
                    log.warning(
                        "%s version %d: input drift in %s for %d windows in a row",
                        self.name,
                        self.version,
                        ", ".join(drift["alerting"]),
                        self.detector.k,
                    )
                self.alert = bool(drift["alert"])
        return window, drift

    def status(self) -> dict[str, Any]:
        s = self.summary
        doc: dict[str, Any] = {
            "model": self.name,
            "version": self.version,
            "window": {
                "start": s.start,
                "requests": s.requests + self._unflushed_requests(),
                "errors": s.errors + self._failed,
            },
            "windows_published": self.windows,
            "drift_windows": self.drift_windows,
            "drift_alert": self.alert,
            "errors": self.errors,
        }
        if self.last_drift is not None:
            doc["drifted"] = self.last_drift["drifted"]
            doc["alerting"] = self.last_drift["alerting"]
        return doc


class Monitor:
    """Every loaded version's monitor, the prediction-id book, and publishing of closed windows."""

    def __init__(self, config: MonitorConfig, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.book: PredictionBook[VersionMonitor] = PredictionBook(config.feedback_ids)
        self.publish: Publish | None = None  # set when telemetry starts; until then windows are dropped
        # Data capture for retraining; None when the device has none (the daemon sets it).
        self.capture: Capture | None = None
        self._versions: dict[tuple[str, int], VersionMonitor] = {}
        self.unpublished = 0  # closed windows with no telemetry to take them

    def attach(self, lv: LoadedVersion) -> None:
        vm = VersionMonitor(lv, self.config, self.book, self.clock)
        vm.on_full = lambda full: self._close(full, self.clock())
        vm.capture = self.capture
        old = self._versions.get((lv.name, lv.version))
        if old is not None:
            self._close(old, self.clock())
        self._versions[(lv.name, lv.version)] = vm
        lv.monitor = vm
        lv.batcher.observer = vm.observe

    def detach(self, lv: LoadedVersion) -> None:
        """The version is unloaded: its open window is published now, its prediction ids forgotten."""
        vm = self._versions.pop((lv.name, lv.version), None)
        lv.monitor = None
        lv.batcher.observer = None
        if vm is not None:
            self._close(vm, self.clock())
            self.book.drop_owner(vm)

    def tick(self) -> None:
        now = self.clock()
        for vm in list(self._versions.values()):
            vm.flush()
            if vm.summary.due(now):
                self._close(vm, now)
        if self.capture is not None:
            self.capture.tick()

    def close_all(self) -> None:
        """At stop: publish every open window."""
        now = self.clock()
        for vm in list(self._versions.values()):
            self._close(vm, now)
        if self.capture is not None:
            self.capture.flush_all()

    def _close(self, vm: VersionMonitor, now: float) -> None:
        window, drift = vm.close(now, self.config.drift_min_rows)
        for kind, body in (("summary", window), ("drift", drift)):
            if body is None:
                continue
            if self.publish is None:
                self.unpublished += 1
                continue
            try:
                self.publish(kind, body)
            except Exception as exc:  # a full disk must not stop serving; the outbox counts it
                self.unpublished += 1
                log.warning("%s version %d: %s not recorded: %s", vm.name, vm.version, kind, exc)

    def feedback(self, prediction_id: Any, label: Any) -> dict[str, Any]:
        """Score a label against the prediction it belongs to (POST /v1/feedback)."""
        if not isinstance(prediction_id, str) or not prediction_id:
            raise RequestError("id must be the non-empty string returned as the prediction's id")
        found = self.book.take(prediction_id)
        if found is None:  # it may still be waiting in a version's pending list
            for vm in self._versions.values():
                vm.flush()
            found = self.book.take(prediction_id)
        if found is None:
            # Forgotten by the book (older than its newest predictions) but captured: the label
            # still joins the captured request at the hub.
            if self.capture is not None and self.capture.label(prediction_id, label):
                return {"id": prediction_id, "captured": True}
            raise NotFound(
                f"no prediction with id {prediction_id!r} awaits a label: unknown, already labelled, "
                f"or older than the newest {self.book.capacity} predictions"
            )
        try:
            result = found.owner.add_feedback(found.prediction, label)
        except FeedbackError as exc:
            self.book.restore(found)  # a corrected label may follow
            raise RequestError(str(exc)) from None
        answer: dict[str, Any] = {"id": prediction_id, **result}
        if self.capture is not None and self.capture.captured(prediction_id):
            with contextlib.suppress(RequestError):  # a label too big to send is still scored
                answer["captured"] = self.capture.label(prediction_id, label)
        # A shadow experiment's candidate answered the same request: its prediction is scored too.
        shadow_id = prediction_id + SHADOW_ID_SUFFIX
        shadow = self.book.take(shadow_id)
        if shadow is None:
            # The copy ran after the stable answer: it may still wait in the candidate's pending
            # batches when the stable prediction was counted already (a flush every 256 requests).
            for vm in self._versions.values():
                if vm.holds(shadow_id):
                    vm.flush()
                    shadow = self.book.take(shadow_id)
                    break
        if shadow is not None:
            # A label that fits the stable version but not the candidate's classes scores only the former.
            with contextlib.suppress(FeedbackError):
                answer["shadow"] = shadow.owner.add_feedback(shadow.prediction, label)
        return answer

    def status(self) -> dict[str, Any]:
        return {
            "enabled": True,
            "window_s": self.config.window_s,
            "window_requests": self.config.window_requests,
            "feedback_ids": len(self.book),
            "unpublished": self.unpublished,
            "versions": [vm.status() for vm in self._versions.values()],
        }
