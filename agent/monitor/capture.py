"""Data capture for retraining: a sampled, rate-limited share of requests, with their predictions.

Off unless the group's signed assignment asks for it (`"capture": {"sample_bp", "max_rows_per_min"}`,
agent.update.canary.CapturePolicy); the runner hands each poll's policy to `Capture.set_policy`.
A model without a policy costs one dict lookup per onnxruntime batch, and nothing is kept.

What is kept: for a sampled request, its id, version, time, every input tensor and every output
tensor with the request's shape (rows first), as JSON (non-finite numbers as null, bytes as UTF-8
text). Labels fed back later for a captured id (POST /v1/feedback) follow in a later message, so
the hub can join them. One `capture` message per model carries up to `batch_rows` requests:

    {"schema": "outpost-capture/1", "model": "wine",
     "rows": [{"id", "version", "ts", "inputs": {name: [...]}, "outputs": {name: [...]}}],
     "labels": [{"id", "label", "ts"}],
     "dropped": {"rate": n, "size": n, "full": n}}      # since the previous message

Limits, each counted in `dropped` and in status when it bites:
- sampling: each request independently with probability sample_bp / 10,000 (the gap to the next
  sampled request is drawn from the geometric distribution, so unsampled batches cost nothing);
- rate: a token bucket of min(hub's, device's max_rows_per_min) a minute, at most a minute's
  worth in a burst ("rate");
- size: a request whose JSON exceeds `max_row_bytes` is not kept ("size");
- room: messages go through the telemetry outbox (on disk first, sent when the broker is up);
  capture may hold at most `max_outbox_bytes` of it, and a batch that does not fit is dropped
  ("full"), so a long outage never pushes summaries, drift or events out of the outbox.

Shadow copies (ids ending in "~shadow") are never captured: they repeat a captured request.
Runs on the event loop, after the answers went out (VersionMonitor.observe), never on the
request's own path.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.config import CaptureConfig
from agent.errors import RequestError
from agent.runtime.batcher import BatchArrays, rows_of

if TYPE_CHECKING:  # agent.update (about 0.5 MB of RSS) is imported only with a hub configured
    from agent.update.canary import CapturePolicy

log = logging.getLogger(__name__)

SCHEMA = "outpost-capture/1"
SHADOW_SUFFIX = "~shadow"
MAX_LABEL_BYTES = 4096
MAX_PENDING_LABELS = 10_000

Publish = Callable[[str, Mapping[str, Any]], object]


class Sampler:
    """Bernoulli sampling of a stream at `rate`, by geometric gaps: `picks(n)` says which of the
    next n requests are sampled, drawing one number per sampled request instead of one per request."""

    def __init__(self, rate: float, rng: random.Random) -> None:
        if not 0.0 < rate <= 1.0:
            raise ValueError("the sample rate must be in (0, 1]")
        self.rate = rate
        self._rng = rng
        self._log_q = math.log1p(-rate) if rate < 1.0 else 0.0
        self._gap = self._draw()

    def _draw(self) -> int:
        """Requests skipped before the next sampled one (geometric, support 0, 1, ...)."""
        if self.rate >= 1.0:
            return 0
        u = 1.0 - self._rng.random()  # (0, 1]
        return int(math.log(u) / self._log_q)

    def picks(self, n: int) -> list[int]:
        out: list[int] = []
        i = self._gap
        while i < n:
            out.append(i)
            i += 1 + self._draw()
        self._gap = i - n
        return out


class TokenBucket:
    """At most `per_min` takes a minute, with at most a minute's worth at once."""

    def __init__(self, per_min: int, now: float) -> None:
        self.capacity = float(per_min)
        self.per_s = per_min / 60.0
        self.tokens = self.capacity
        self._at = now

    def take(self, now: float) -> bool:
        self.tokens = min(self.capacity, self.tokens + max(0.0, now - self._at) * self.per_s)
        self._at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


def tensor_json(a: np.ndarray) -> Any:
    """A tensor as JSON values: nested lists, non-finite numbers as null, bytes as UTF-8 text."""
    if a.dtype.kind == "f":
        finite = np.isfinite(a)
        if not finite.all():
            obj = a.astype(object)
            obj[~finite] = None
            return obj.tolist()
        return a.tolist()
    if a.dtype.kind in "OSU":
        return _texts(a.tolist())
    return a.tolist()


def _texts(value: Any) -> Any:
    if isinstance(value, list):
        return [_texts(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def label_json(label: Any) -> Any:
    """A fed-back label as it will be sent; RequestError when it cannot be (not JSON, too big)."""
    try:
        text = json.dumps(label, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError):
        raise RequestError("label must be a JSON value without NaN or infinity") from None
    if len(text) > MAX_LABEL_BYTES:
        raise RequestError(f"label takes {len(text)} bytes as JSON; at most {MAX_LABEL_BYTES}")
    return label


@dataclass
class Counts:
    sampled: int = 0  # requests the sampler picked
    captured: int = 0  # kept and queued for sending
    sent: int = 0  # requests in messages handed to the outbox
    labels: int = 0  # labels queued for captured requests
    dropped_rate: int = 0
    dropped_size: int = 0
    dropped_full: int = 0
    messages: int = 0

    def to_json(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class _ModelCapture:
    """One model's policy and what waits to be sent."""

    policy: CapturePolicy
    sampler: Sampler
    bucket: TokenBucket
    rows: list[dict[str, Any]] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)  # each row's JSON bytes
    row_bytes: int = 0
    first_at: float | None = None  # when the oldest waiting row or label was queued
    labels: list[dict[str, Any]] = field(default_factory=list)
    # Since the previous message: (rate, size, full)
    unsent_dropped: list[int] = field(default_factory=lambda: [0, 0, 0])
    counts: Counts = field(default_factory=Counts)


class Capture:
    """Every model's capture: sampling on the batcher's hand-over, batching, and publishing."""

    def __init__(
        self,
        config: CaptureConfig,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self._rng = rng or random.Random()
        self._models: dict[str, _ModelCapture] = {}
        # Captured prediction id -> model, so a label fed back later finds its message.
        self._ids: OrderedDict[str, str] = OrderedDict()
        self.publish: Publish | None = None  # set when telemetry starts
        # Bytes of capture messages waiting in the outbox (None: not known, no limit applied).
        self.outbox_bytes: Callable[[], int] | None = None
        self.refused: dict[str, CapturePolicy] = {}  # asked for while [capture] enabled = false
        self.errors = 0
        self._warned = False

    # -- policy -------------------------------------------------------------------------------

    def set_policy(self, model: str, policy: CapturePolicy | None) -> None:
        """The assignment's capture for `model` (None: off). An unchanged policy keeps its state."""
        if not self.config.enabled:
            if policy is None:
                self.refused.pop(model, None)
            elif self.refused.get(model) != policy:
                self.refused[model] = policy
                log.warning("capture for %s asked by the hub, refused: [capture] enabled = false", model)
            return
        current = self._models.get(model)
        if current is not None and current.policy == policy:
            return
        if policy is None:
            if current is not None:
                self._send(model, current, self.clock())  # what was captured before goes out
                del self._models[model]
                log.info("capture for %s: off", model)
            return
        now = self.clock()
        per_min = min(policy.max_rows_per_min, self.config.max_rows_per_min)
        sampler, bucket = Sampler(policy.rate, self._rng), TokenBucket(per_min, now)
        if current is None:
            self._models[model] = _ModelCapture(policy, sampler, bucket)
        else:  # a new rate: what waits stays, counts go on
            current.policy, current.sampler, current.bucket = policy, sampler, bucket
        log.info(
            "capture for %s: %.2f%% of requests, at most %d a minute", model, policy.sample_bp / 100, per_min
        )

    def clear_others(self, keep: set[str]) -> None:
        """Turn capture off for every model but `keep` (the assignment moved to another model)."""
        for model in [m for m in self._models if m not in keep]:
            self.set_policy(model, None)
        for model in [m for m in self.refused if m not in keep]:
            del self.refused[model]

    @property
    def active(self) -> bool:
        return bool(self._models)

    # -- the batcher's hand-over (event loop, after the answers went out) ----------------------

    def observe(
        self,
        model: str,
        version: int,
        items: Sequence[Any],
        outcomes: Sequence[Mapping[str, np.ndarray] | BaseException] | None,
        arrays: BatchArrays | None = None,
    ) -> None:
        """A batch as the batcher hands it to its observer (`BatchObserver`): outcomes None when
        the requests shared one call, each one's outcome then its rows of the outputs."""
        mc = self._models.get(model)
        if mc is None:
            return
        picks = mc.sampler.picks(len(items))
        if not picks:
            return
        try:
            now = self.clock()
            for i in picks:
                if outcomes is not None:
                    out = outcomes[i]
                elif arrays is not None:  # the rows before it are the earlier requests' rows
                    out = rows_of(arrays[1], sum(items[j].size for j in range(i)), items[i].size)
                else:
                    raise ValueError("a batch with neither outcomes nor outputs")
                ticket = items[i].ticket
                pid = ticket.prediction_id
                if isinstance(out, BaseException) or pid is None or pid.endswith(SHADOW_SUFFIX):
                    continue
                mc.counts.sampled += 1
                if not mc.bucket.take(now):
                    mc.counts.dropped_rate += 1
                    mc.unsent_dropped[0] += 1
                    continue
                self._keep(model, mc, pid, version, items[i].inputs, out, now)
        except Exception as exc:  # capture must never break serving
            self.errors += 1
            if not self._warned:
                self._warned = True
                log.warning("capture for %s failed, requests left out: %r", model, exc)

    def _keep(
        self,
        model: str,
        mc: _ModelCapture,
        pid: str,
        version: int,
        inputs: Mapping[str, np.ndarray],
        outputs: Mapping[str, np.ndarray],
        now: float,
    ) -> None:
        row = {
            "id": pid,
            "version": version,
            "ts": round(now, 3),
            "inputs": {k: tensor_json(np.asarray(v)) for k, v in inputs.items()},
            "outputs": {k: tensor_json(np.asarray(v)) for k, v in outputs.items()},
        }
        size = len(json.dumps(row, separators=(",", ":"), allow_nan=False))
        if size > self.config.max_row_bytes:
            mc.counts.dropped_size += 1
            mc.unsent_dropped[1] += 1
            return
        if len(mc.rows) >= 2 * self.config.batch_rows:  # no telemetry to take them yet: bounded
            mc.counts.dropped_full += 1
            mc.unsent_dropped[2] += 1
            return
        mc.rows.append(row)
        mc.sizes.append(size)
        mc.row_bytes += size
        if mc.first_at is None:
            mc.first_at = now
        mc.counts.captured += 1
        self._ids[pid] = model
        self._ids.move_to_end(pid)
        while len(self._ids) > self.config.label_ids:
            self._ids.popitem(last=False)
        if self._full(mc):
            self._send(model, mc, now, only_full=True)

    # -- labels ---------------------------------------------------------------------------------

    def captured(self, prediction_id: str) -> bool:
        return prediction_id in self._ids

    def label(self, prediction_id: str, label: Any) -> bool:
        """Queue a fed-back label for a captured request (once); False when the id was not captured."""
        model = self._ids.get(prediction_id)
        mc = self._models.get(model) if model is not None else None
        if mc is None:
            return False
        label = label_json(label)
        del self._ids[prediction_id]  # one label per prediction, as the feedback book
        if len(mc.labels) >= MAX_PENDING_LABELS:
            mc.labels.pop(0)
        mc.labels.append({"id": prediction_id, "label": label, "ts": round(self.clock(), 3)})
        mc.counts.labels += 1
        if mc.first_at is None:
            mc.first_at = self.clock()
        return True

    # -- sending ----------------------------------------------------------------------------------

    def tick(self) -> None:
        now = self.clock()
        cfg = self.config
        for model, mc in list(self._models.items()):
            if mc.first_at is None:
                continue
            if self._full(mc) or now - mc.first_at >= cfg.flush_s:
                self._send(model, mc, now)

    def flush_all(self) -> None:
        """At stop: everything waiting goes into the outbox."""
        now = self.clock()
        for model, mc in list(self._models.items()):
            self._send(model, mc, now)

    def _full(self, mc: _ModelCapture) -> bool:
        return len(mc.rows) >= self.config.batch_rows or mc.row_bytes >= self.config.batch_bytes

    def _send(self, model: str, mc: _ModelCapture, now: float, only_full: bool = False) -> None:
        """Hand what waits to the outbox, in messages of at most batch_rows / batch_bytes;
        `only_full`: only whole batches (the rest waits for flush_s)."""
        cfg = self.config
        while (mc.rows or mc.labels) and not (only_full and not self._full(mc)):
            n = size = 0
            for row_size in mc.sizes:
                if n and (n >= cfg.batch_rows or size >= cfg.batch_bytes):
                    break
                n += 1
                size += row_size
            labels = mc.labels[:1000]
            outcome = self._publish(model, mc, mc.rows[:n], labels, size)
            if outcome == "later":
                return
            del mc.rows[:n], mc.sizes[:n], mc.labels[: len(labels)]
            mc.row_bytes -= size
            if outcome == "failed":  # the outbox refused (a full disk): what waits goes too
                mc.counts.dropped_full += len(mc.rows)
                mc.rows.clear()
                mc.sizes.clear()
                mc.labels.clear()
        if not mc.rows and not mc.labels:
            mc.row_bytes = 0
            mc.first_at = None
        elif mc.rows:
            mc.first_at = mc.rows[0]["ts"]

    def _publish(
        self,
        model: str,
        mc: _ModelCapture,
        rows: list[dict[str, Any]],
        labels: list[dict[str, Any]],
        size: int,
    ) -> str:
        """Hand one message to the outbox: "sent", "later" (no telemetry yet: keep everything), or
        "failed" (the outbox refused it). Rows over capture's share of the outbox are dropped."""
        if self.publish is None:
            return "later"  # kept (bounded by _keep) until telemetry starts
        if (
            rows
            and self.outbox_bytes is not None
            and self.outbox_bytes() + size > self.config.max_outbox_bytes
        ):
            # A long broker outage filled capture's share: these rows go (counted); the labels
            # still go out, they are small.
            mc.counts.dropped_full += len(rows)
            mc.unsent_dropped[2] += len(rows)
            rows = []
            if not labels:
                return "sent"
        rate, too_big, full = mc.unsent_dropped
        body = {
            "schema": SCHEMA,
            "model": model,
            "rows": rows,
            "labels": labels,
            "dropped": {"rate": rate, "size": too_big, "full": full},
        }
        try:
            self.publish("capture", body)
        except Exception as exc:
            self.errors += 1
            mc.counts.dropped_full += len(rows)
            log.warning("capture for %s: %d request(s) not recorded: %s", model, len(rows), exc)
            return "failed"
        mc.unsent_dropped = [0, 0, 0]
        mc.counts.sent += len(rows)
        mc.counts.messages += 1
        return "sent"

    # -- status -------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        models = {
            model: {
                "sample_bp": mc.policy.sample_bp,
                "max_rows_per_min": min(mc.policy.max_rows_per_min, self.config.max_rows_per_min),
                "waiting": len(mc.rows),
                "labels_waiting": len(mc.labels),
                **mc.counts.to_json(),
            }
            for model, mc in self._models.items()
        }
        doc: dict[str, Any] = {"enabled": self.config.enabled, "models": models, "errors": self.errors}
        if self.refused:
            doc["refused"] = {
                m: {"sample_bp": p.sample_bp, "max_rows_per_min": p.max_rows_per_min}
                for m, p in self.refused.items()
            }
        return doc
