"""The monitor at run time: records what each loaded version answers, closes windows, publishes them.

Cost on the request path: `VersionMonitor.record` appends one tuple to a list. Every
`FLUSH_EVERY` requests (and on every tick) the list is turned into counts in one go: the inputs
of all those requests are concatenated and binned in one vectorised pass, their latencies
bucketed with one searchsorted, their outputs counted with one bincount
(`WindowSummary.observe_batch`). So the per-request cost is a list append plus a share of a
numpy pass, measured in `make bench` (monitor on vs off).

The daemon calls `tick()` about once a second on the event loop: it flushes, closes the
windows that are due, publishes each non-empty window as a `summary` and, when the window has
enough rows, its drift tests against the reference profile as a `drift` message. Publishing
goes through the telemetry outbox (on disk first), so windows survive broker outages and
restarts within the outbox's bounds; a window still open when the agent stops is published
then, and one open when it is killed is lost (at most one window per version).

Monitoring never fails a request: an error while counting is logged (once per version), counted
in `status()["errors"]`, and the requests it held are left out of the window.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.config import MonitorConfig
from agent.errors import NotFound, RequestError
from agent.monitor.drift import DriftDetector
from agent.monitor.feedback import FeedbackError, PredictionBook, score
from agent.monitor.report import drift_message
from agent.monitor.summary import WindowSummary

if TYPE_CHECKING:
    from agent.runtime.registry import LoadedVersion

log = logging.getLogger(__name__)

FLUSH_EVERY = 256  # requests held before they are counted together

Publish = Callable[[str, Mapping[str, Any]], object]
_Pending = tuple[Mapping[str, np.ndarray] | None, Mapping[str, np.ndarray] | None, float, int, str | None]


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
        self._pending: list[_Pending] = []
        self._window_requests = config.window_requests
        self._flush_at = max(1, min(FLUSH_EVERY, config.window_requests or FLUSH_EVERY))
        # Called when the window has its window_requests requests (the Monitor closes and
        # publishes it); None: windows close on the Monitor's ticks only.
        self.on_full: Callable[[VersionMonitor], None] | None = None
        self._warned = False
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

    # -- request path -------------------------------------------------------------------------

    def record(
        self,
        inputs: Mapping[str, np.ndarray] | None,
        outputs: Mapping[str, np.ndarray] | None,
        latency_s: float,
        rows: int,
        prediction_id: str | None,
    ) -> None:
        """One answered request (outputs None: the model failed). Cheap: counted at the next flush."""
        pending = self._pending
        pending.append((inputs, outputs, latency_s, rows, prediction_id))
        if len(pending) >= self._flush_at:
            if self.on_full is not None and self._window_requests and self.window_full():
                self.on_full(self)
            else:
                self.flush()

    def window_full(self) -> bool:
        return bool(self._window_requests) and (
            self.summary.requests + len(self._pending) >= self._window_requests
        )

    # -- counting -----------------------------------------------------------------------------

    def _matrix(self, batch: list[Mapping[str, np.ndarray]]) -> np.ndarray | None:
        columns = self._columns
        if columns is None:
            return None
        if len(columns) == 1:
            name = columns[0]
            x = np.concatenate([b[name] for b in batch])
            return x.reshape(len(x), -1) if x.ndim != 2 else x
        parts = [np.column_stack([np.asarray(b[c]).reshape(-1) for c in columns]) for b in batch]
        return np.concatenate(parts)

    def flush(self) -> None:
        pending = self._pending
        if not pending:
            return
        self._pending = []
        self._flush_at = FLUSH_EVERY
        if self._window_requests:  # stop exactly at the window's size
            left = self._window_requests - self.summary.requests - len(pending)
            self._flush_at = max(1, min(FLUSH_EVERY, left))
        try:
            self._count(pending)
        except Exception:  # counting must never break serving
            # One odd request (an input of another shape) spoils the batch: count them one
            # by one, so only the requests that cannot be counted are left out.
            for one in pending:
                try:
                    self._count([one])
                except Exception as exc:
                    self.errors += 1
                    if not self._warned:
                        self._warned = True
                        log.warning(
                            "%s version %d: monitoring failed, request left out: %r",
                            self.name,
                            self.version,
                            exc,
                        )

    def _count(self, pending: list[_Pending]) -> None:
        # Per request only list comprehensions run here; the rest is numpy over the batch.
        latencies = [p[2] for p in pending]
        answered = [p for p in pending if p[1] is not None]
        failed = len(pending) - len(answered)
        if not answered:
            self.summary.observe_batch(None, None, latencies, failed)
            return
        x = self._matrix([p[0] for p in answered])  # type: ignore[misc]  # answered: inputs set
        outputs = {k: np.concatenate([p[1][k] for p in answered]) for k in answered[0][1]}  # type: ignore[index, union-attr]
        rows_each = [p[3] for p in answered]
        rows = sum(rows_each)
        predictions = self.summary.observe_batch(x, outputs, latencies, failed, rows=rows)
        if predictions is None or self._book.capacity == 0 or len(predictions) != rows:
            return  # nothing to score feedback against (or not one output per row)
        offsets = None if rows == len(answered) else [0, *itertools.accumulate(rows_each)]
        self._book.add_batch(self, [p[4] for p in answered], predictions.tolist(), offsets)

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
        if self._window_requests:
            self._flush_at = max(1, min(FLUSH_EVERY, self._window_requests))
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
            "window": {"start": s.start, "requests": s.requests + len(self._pending), "errors": s.errors},
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
        self._versions: dict[tuple[str, int], VersionMonitor] = {}
        self.unpublished = 0  # closed windows with no telemetry to take them

    def attach(self, lv: LoadedVersion) -> None:
        vm = VersionMonitor(lv, self.config, self.book, self.clock)
        vm.on_full = lambda full: self._close(full, self.clock())
        old = self._versions.get((lv.name, lv.version))
        if old is not None:
            self._close(old, self.clock())
        self._versions[(lv.name, lv.version)] = vm
        lv.monitor = vm

    def detach(self, lv: LoadedVersion) -> None:
        """The version is unloaded: its open window is published now, its prediction ids forgotten."""
        vm = self._versions.pop((lv.name, lv.version), None)
        lv.monitor = None
        if vm is not None:
            self._close(vm, self.clock())
            self.book.drop_owner(vm)

    def tick(self) -> None:
        now = self.clock()
        for vm in list(self._versions.values()):
            vm.flush()
            if vm.summary.due(now):
                self._close(vm, now)

    def close_all(self) -> None:
        """At stop: publish every open window."""
        now = self.clock()
        for vm in list(self._versions.values()):
            self._close(vm, now)

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
            raise NotFound(
                f"no prediction with id {prediction_id!r} awaits a label: unknown, already labelled, "
                f"or older than the newest {self.book.capacity} predictions"
            )
        try:
            result = found.owner.add_feedback(found.prediction, label)
        except FeedbackError as exc:
            self.book.restore(found)  # a corrected label may follow
            raise RequestError(str(exc)) from None
        return {"id": prediction_id, **result}

    def status(self) -> dict[str, Any]:
        return {
            "enabled": True,
            "window_s": self.config.window_s,
            "window_requests": self.config.window_requests,
            "feedback_ids": len(self.book),
            "unpublished": self.unpublished,
            "versions": [vm.status() for vm in self._versions.values()],
        }
