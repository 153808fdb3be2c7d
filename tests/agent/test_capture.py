"""Data capture (agent.monitor.capture): sampling, limits, batching, labels, and what must survive
a full outbox or a refusing disk. Pure logic with fake batch items; the agent-to-hub path with a
real agent, hub and Mosquitto is tests/e2e/test_capture.py."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from agent.config import CaptureConfig
from agent.errors import AgentError, RequestError
from agent.monitor.capture import Capture, Sampler, TokenBucket, tensor_json
from agent.update.canary import Assignment, AssignmentError, CapturePolicy


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def item(pid: str | None, x: list[float]) -> Any:
    return SimpleNamespace(
        ticket=SimpleNamespace(prediction_id=pid), inputs={"input": np.array([x], np.float32)}, size=1
    )


def outcome(label: int) -> dict[str, np.ndarray]:
    return {"label": np.array([label], np.int64), "probabilities": np.array([[0.25, 0.75]], np.float32)}


class Sink:
    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    def __call__(self, kind: str, body: Mapping[str, Any]) -> int:
        assert kind == "capture"
        json.dumps(body, allow_nan=False)  # what the outbox will encode
        self.messages.append(dict(body))
        return len(self.messages)

    @property
    def rows(self) -> list[dict[str, Any]]:
        return [r for m in self.messages for r in m["rows"]]


EVERY = CapturePolicy(10_000, 6000)


def make(policy: CapturePolicy | None = EVERY, **config: Any) -> tuple[Capture, Sink, Clock]:
    clock = Clock()
    capture = Capture(CaptureConfig(**config), clock=clock, rng=random.Random(7))
    sink = Sink()
    capture.publish = sink
    capture.set_policy("wine", policy)
    return capture, sink, clock


def feed(capture: Capture, n: int, start: int = 0, model: str = "wine", version: int = 1) -> None:
    items = [item(f"p{start + i}", [float(start + i), 0.5]) for i in range(n)]
    capture.observe(model, version, items, [outcome((start + i) % 2) for i in range(n)])


# -- the assignment's key ---------------------------------------------------------------------


def _assignment(capture: Any) -> dict[str, Any]:
    v = {
        "version": 1,
        "manifest": "models/wine/1/manifest.json",
        "model": "models/wine/1/model.onnx",
        "sha256": "a" * 64,
        "manifest_sha256": "b" * 64,
    }
    doc = {
        "format": "outpost-assignment/1",
        "group": "default",
        "model": "wine",
        "serial": 1,
        "stable": v,
        "candidate": None,
        "percent": 0,
        "salt": "s",
        "created": "2026-11-27T00:00:00Z",
    }
    if capture is not ...:
        doc["capture"] = capture
    return doc


def test_assignment_capture_is_parsed_and_checked() -> None:
    assert Assignment.parse(_assignment(...)).capture is None  # an older hub: no key at all
    assert Assignment.parse(_assignment(None)).capture is None
    policy = Assignment.parse(_assignment({"sample_bp": 250, "max_rows_per_min": 60})).capture
    assert policy == CapturePolicy(250, 60) and policy.rate == 0.025
    for bad, says in [
        ({"sample_bp": 0, "max_rows_per_min": 60}, "sample_bp must be at least 1"),
        ({"sample_bp": 10_001, "max_rows_per_min": 60}, "sample_bp must be 1..10000"),
        ({"sample_bp": 5, "max_rows_per_min": 0}, "max_rows_per_min must be at least 1"),
        ({"sample_bp": 5}, "max_rows_per_min is missing"),
        ({"sample_bp": "5", "max_rows_per_min": 1}, "sample_bp must be an integer"),
        ([5, 60], "capture must be an object or null"),
    ]:
        with pytest.raises(AssignmentError, match=says):
            Assignment.parse(_assignment(bad))


# -- sampling and the rate limit ----------------------------------------------------------------


def test_sampler_takes_the_asked_share_whatever_the_batch_sizes() -> None:
    n, rate = 200_000, 0.05
    whole = Sampler(rate, random.Random(1)).picks(n)
    expected, sd = n * rate, math.sqrt(n * rate * (1 - rate))
    assert abs(len(whole) - expected) < 4 * sd
    # The same draws cut into uneven batches pick the same requests.
    split = Sampler(rate, random.Random(1))
    got, offset = [], 0
    rng = random.Random(2)
    while offset < n:
        size = min(rng.randint(1, 40), n - offset)
        got += [offset + i for i in split.picks(size)]
        offset += size
    assert got == whole
    assert Sampler(1.0, random.Random(1)).picks(5) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        Sampler(0.0, random.Random(1))


def test_token_bucket_allows_a_minute_then_the_rate() -> None:
    bucket = TokenBucket(60, now=0.0)
    assert all(bucket.take(0.0) for _ in range(60))
    assert not bucket.take(0.0)
    assert bucket.take(1.0) and not bucket.take(1.0)
    assert sum(bucket.take(1.0 + t / 10) for t in range(1, 101)) == 10  # one a second


def test_tensor_json_sends_what_json_can_carry() -> None:
    assert tensor_json(np.array([[1.5, np.nan, np.inf]], np.float32)) == [[1.5, None, None]]
    assert tensor_json(np.array([[b"ok", b"\xff"]], object)) == [["ok", "\ufffd"]]
    assert tensor_json(np.array([3, 4], np.int64)) == [3, 4]


# -- capture ---------------------------------------------------------------------------------


def test_nothing_is_captured_without_a_policy() -> None:
    capture, sink, clock = make(policy=None)
    feed(capture, 500)
    clock.t += 3600
    capture.tick()
    capture.flush_all()
    assert sink.messages == [] and capture.status()["models"] == {}
    assert not capture.captured("p1")


def test_every_sampled_request_is_sent_with_its_inputs_outputs_and_version() -> None:
    capture, sink, clock = make(batch_rows=10)
    feed(capture, 25, version=3)
    capture.tick()  # two full batches go; five requests wait for flush_s
    assert [len(m["rows"]) for m in sink.messages] == [10, 10]
    clock.t += 61
    capture.tick()
    rows = sink.rows
    assert [r["id"] for r in rows] == [f"p{i}" for i in range(25)]
    first = rows[0]
    assert first == {
        "id": "p0",
        "version": 3,
        "ts": 1000.0,
        "inputs": {"input": [[0.0, 0.5]]},
        "outputs": {"label": [0], "probabilities": [[0.25, 0.75]]},
    }
    assert all(m["schema"] == "outpost-capture/1" and m["model"] == "wine" for m in sink.messages)
    assert all(m["dropped"] == {"rate": 0, "size": 0, "full": 0} for m in sink.messages)
    status = capture.status()["models"]["wine"]
    assert (status["sampled"], status["captured"], status["sent"], status["messages"]) == (25, 25, 25, 3)


def test_requests_that_shared_a_call_are_captured_with_their_own_rows() -> None:
    """The batcher hands a shared call's batch over without per-request outcomes: each request's
    rows are cut from the outputs, past the rows of the requests before it (of 1, 2 and 1 rows)."""
    capture, sink, clock = make(batch_rows=10)
    sizes = [1, 2, 1]
    items = [
        SimpleNamespace(
            ticket=SimpleNamespace(prediction_id=f"p{k}"),
            inputs={"input": np.full((n, 2), k, np.float32)},
            size=n,
        )
        for k, n in enumerate(sizes)
    ]
    inputs = {"input": np.concatenate([i.inputs["input"] for i in items])}
    outputs = {
        "label": np.array([0, 1, 2, 3], np.int64),
        "probabilities": np.arange(8, dtype=np.float32).reshape(4, 2),
    }
    capture.observe("wine", 1, items, None, (inputs, outputs))
    clock.t += 61
    capture.tick()
    by_id = {r["id"]: r for r in sink.rows}
    assert by_id["p0"]["outputs"] == {"label": [0], "probabilities": [[0.0, 1.0]]}
    assert by_id["p1"]["outputs"] == {"label": [1, 2], "probabilities": [[2.0, 3.0], [4.0, 5.0]]}
    assert by_id["p1"]["inputs"] == {"input": [[1.0, 1.0], [1.0, 1.0]]}
    assert by_id["p2"]["outputs"] == {"label": [3], "probabilities": [[6.0, 7.0]]}
    assert capture.errors == 0


def test_other_models_failed_requests_and_shadow_copies_are_not_captured() -> None:
    capture, sink, _ = make()
    feed(capture, 5, model="other")
    items = [item("a", [1.0, 2.0]), item("a~shadow", [1.0, 2.0]), item("b", [3.0, 4.0]), item(None, [0, 0])]
    capture.observe("wine", 1, items, [outcome(1), outcome(1), RuntimeError("model failed"), outcome(0)])
    capture.flush_all()
    assert [r["id"] for r in sink.rows] == ["a"]


def test_rate_and_size_limits_drop_and_count() -> None:
    capture, sink, clock = make(policy=CapturePolicy(10_000, 30), max_rows_per_min=20, batch_rows=100)
    feed(capture, 50)  # the device's ceiling (20) is below the hub's (30)
    capture.flush_all()
    assert len(sink.rows) == 20
    assert sink.messages[-1]["dropped"] == {"rate": 30, "size": 0, "full": 0}
    clock.t += 3  # one more a 3 s, as 20 a minute
    feed(capture, 5, start=100)
    capture.flush_all()
    assert [r["id"] for r in sink.messages[-1]["rows"]] == ["p100"]
    assert sink.messages[-1]["dropped"]["rate"] == 4  # counted since the previous message only

    big, big_sink, _ = make(max_row_bytes=200)
    items = [item("small", [1.0, 2.0]), item("large", [0.123456789] * 40)]
    big.observe("wine", 1, items, [outcome(0), outcome(1)])
    big.flush_all()
    assert [r["id"] for r in big_sink.rows] == ["small"]
    assert big_sink.messages[0]["dropped"] == {"rate": 0, "size": 1, "full": 0}


def test_a_full_outbox_share_drops_rows_but_not_summaries_room_and_keeps_labels() -> None:
    capture, sink, clock = make(max_outbox_bytes=10_000)
    queued = {"bytes": 9_990}
    capture.outbox_bytes = lambda: queued["bytes"]
    feed(capture, 3)
    assert capture.label("p1", 1)
    capture.flush_all()
    # The rows did not fit: dropped and counted; the label still went out, alone.
    assert sink.rows == [] and [lab["id"] for lab in sink.messages[0]["labels"]] == ["p1"]
    assert capture.status()["models"]["wine"]["dropped_full"] == 3
    queued["bytes"] = 0  # the broker came back and the outbox drained
    clock.t += 1
    feed(capture, 2, start=10)
    capture.flush_all()
    assert [r["id"] for r in sink.rows] == ["p10", "p11"]
    # The drop was told with the label; counts are since the previous message.
    assert [m["dropped"]["full"] for m in sink.messages] == [3, 0]


def test_a_refusing_outbox_loses_the_batch_not_the_agent() -> None:
    capture, sink, _ = make()

    def refuse(kind: str, body: Mapping[str, Any]) -> int:
        raise AgentError("database or disk is full")

    capture.publish = refuse
    feed(capture, 4)
    capture.flush_all()  # no exception
    assert capture.status()["errors"] == 1 and capture.status()["models"]["wine"]["dropped_full"] == 4
    capture.publish = sink
    feed(capture, 1, start=50)
    capture.flush_all()
    assert [r["id"] for r in sink.rows] == ["p50"]


def test_rows_wait_for_telemetry_within_a_bound() -> None:
    capture, sink, _ = make(batch_rows=5)
    capture.publish = None
    feed(capture, 30)
    capture.tick()
    status = capture.status()["models"]["wine"]
    assert status["waiting"] == 10 and status["dropped_full"] == 20
    capture.publish = sink
    capture.flush_all()
    assert [len(m["rows"]) for m in sink.messages] == [5, 5]


def test_labels_join_captured_requests_once() -> None:
    capture, sink, clock = make(label_ids=3)
    feed(capture, 5)
    capture.flush_all()
    assert not capture.captured("p0") and capture.captured("p4")  # only the newest 3 are remembered
    clock.t += 10
    assert capture.label("p4", [1]) and not capture.label("p4", 0)  # one label per prediction
    assert not capture.label("nope", 1)
    with pytest.raises(RequestError, match="NaN"):
        capture.label("p3", float("nan"))
    with pytest.raises(RequestError, match="at most"):
        capture.label("p3", "x" * 5000)
    clock.t += 61
    capture.tick()  # a label alone is sent after flush_s too
    assert sink.messages[-1]["rows"] == [] and sink.messages[-1]["labels"] == [
        {"id": "p4", "label": [1], "ts": 1010.0}
    ]


def test_policy_changes_and_off() -> None:
    capture, sink, _ = make(policy=CapturePolicy(100, 60))
    capture.set_policy("wine", CapturePolicy(10_000, 60))
    feed(capture, 2)
    capture.set_policy("wine", None)  # what was captured still goes
    assert [r["id"] for r in sink.rows] == ["p0", "p1"]
    feed(capture, 2, start=10)
    capture.flush_all()
    assert len(sink.rows) == 2
    capture.set_policy("wine", CapturePolicy(10_000, 60))
    capture.set_policy("beer", CapturePolicy(10_000, 60))
    capture.clear_others({"beer"})
    assert list(capture.status()["models"]) == ["beer"]


def test_a_device_that_refuses_capture_keeps_nothing_and_says_so() -> None:
    capture, sink, _ = make(enabled=False)
    feed(capture, 20)
    capture.flush_all()
    assert sink.messages == []
    status = capture.status()
    assert status["enabled"] is False and status["models"] == {}
    assert status["refused"] == {"wine": {"sample_bp": 10_000, "max_rows_per_min": 6000}}


def test_config_is_checked() -> None:
    for key in ("max_rows_per_min", "batch_rows", "max_row_bytes", "label_ids"):
        with pytest.raises(AgentError, match=f"capture.{key}"):
            CaptureConfig(**{key: 0})
    with pytest.raises(AgentError, match="flush_s"):
        CaptureConfig(flush_s=0)
    assert dataclasses.replace(CaptureConfig(), max_outbox_bytes=0).max_outbox_bytes == 0
