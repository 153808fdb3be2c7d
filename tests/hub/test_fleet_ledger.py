"""The fleet's windows and alerts in the store (SQLite, in-process): indexed with the message,
deduplicated, kept by age not by the per-device count, alerts once per run or episode."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from hub.fleet import AlertRules, FleetStore, Incoming, parse_message
from hub.registry import Database
from tests.support.clock import Clock


@pytest.fixture
def clock() -> Clock:
    return Clock()


# Every test runs on SQLite and on PostgreSQL (`database_url`, tests/conftest.py).
@pytest.fixture
def store(database_url: str, clock: Clock) -> Iterator[FleetStore]:
    db = Database(database_url)
    db.create_all()
    rules = AlertRules(error_rate=0.1, error_rate_critical=0.5, error_min_requests=100, error_window_s=300)
    s = FleetStore(db, keep_per_device=5, clock=clock, window_retention_s=86400, rules=rules)
    s.create_tables()
    yield s
    db.dispose()


def msg(device: str, kind: str, seq: int, **body: Any) -> Incoming:
    doc = {"device_id": device, "seq": seq, "ts": 1.0, **body}
    parsed = parse_message(f"outpost/v1/plant/{device}/{kind}", json.dumps(doc).encode())
    assert parsed is not None
    return Incoming(parsed)


def summary(device: str, seq: int, end: float, requests: int = 10, errors: int = 0, **extra: Any) -> Incoming:
    counts = {"requests": requests, "errors": errors, "rows": requests - errors}
    return msg(device, "summary", seq, model="wine", version=3, start=end - 60, end=end, **counts, **extra)


def drift(device: str, seq: int, start: float, alert: bool) -> Incoming:
    test = {"name": "y", "test": "ks", "p_value": 1e-9, "drifted": alert, "streak": 3}
    verdict = {"alert": alert, "alerting": ["y"] if alert else [], "streak": 3 if alert else 0}
    return msg(device, "drift", seq, model="wine", version=3, start=start, end=start + 60, rows=400,
               features=[test], **verdict)  # fmt: skip


def update(device: str, seq: int, transition: str, **extra: Any) -> Incoming:
    ref = {"model": "wine", "version": 4, "sha256": "cd" * 32}
    return msg(device, "event", seq, event="update", transition=transition, version=ref, **extra)


def test_windows_outlive_the_per_device_message_retention(store: FleetStore) -> None:
    report = store.apply([summary("d1", s, end=60.0 * s) for s in range(1, 11)])
    assert (report.stored, report.windows) == (10, 10)
    assert len(store.messages("d1")) == 5  # keep_per_device=5
    assert len(store.windows("summary", "wine", 3, 0, 1e9)) == 10
    # A late window at a seq the message retention already passed: not a message, still a window.
    report = store.apply([summary("d1", 3, end=1e6 + 1), summary("d1", 0, end=30.0)])
    assert (report.too_old, report.windows) == (2, 1)  # seq 3 is a duplicate window, seq 0 is new
    assert len(store.windows("summary", "wine", 3, 0, 1e9)) == 11


def test_a_duplicate_counts_once_and_out_of_order_is_fine(store: FleetStore) -> None:
    w = summary("d1", 7, end=600.0, requests=50)
    assert store.apply([w, w]).windows == 1
    assert store.apply([w]).windows == 0
    store.apply([summary("d1", 9, end=720.0), summary("d1", 8, end=660.0)])
    found = store.windows("summary", "wine", 3, 0, 1e9)
    assert [(x.seq, x.end) for x in found] == [(7, 600.0), (8, 660.0), (9, 720.0)]
    # ranges take windows whose end is in (since, until]
    assert [x.seq for x in store.windows("summary", "wine", 3, 600.0, 660.0)] == [8]
    assert store.count_windows("summary", "wine", 3, 0, 1e9, group="plant") == 3
    assert store.count_windows("summary", "wine", 3, 0, 1e9, group="other") == 0


def test_unindexable_bodies_are_kept_as_messages_only(store: FleetStore) -> None:
    report = store.apply(
        [
            msg("d1", "summary", 1, model="wine", version="3", start=0, end=60, requests=1, errors=0, rows=1),
            msg("d1", "summary", 2, model="wine", version=3, start=0, requests=1, errors=0, rows=1),
            msg("d1", "summary", 3, model="wine", version=3, start=0, end=60, requests=-1, errors=0, rows=1),
        ]
    )
    assert (report.stored, report.windows) == (3, 0)


def test_windows_and_alerts_expire_by_age(store: FleetStore, clock: Clock) -> None:
    store.apply([summary("d1", 1, end=60.0), update("d1", 2, "probation_failed")])
    assert store.count_windows("summary", "wine", 3, 0, 1e9) == 1 and len(store.alerts()) == 1
    clock.now += timedelta(days=2)
    report = store.apply([summary("d2", 1, end=120.0)])
    assert report.expired == 2
    assert [w.device_id for w in store.windows("summary", "wine", 3, 0, 1e9)] == ["d2"]
    assert store.alerts() == []


def test_drift_alert_once_per_run(store: FleetStore, clock: Clock) -> None:
    #   window start: 0  60  120 180 240 300
    #   alert:        F  T   T   T   F   T      -> two runs, two alerts
    pattern = [False, True, True, True, False, True]
    store.apply([drift("d1", 1, 0, False)])
    store.apply([drift("d1", 2, 60, True)])
    clock.now += timedelta(minutes=1)
    store.apply([drift("d1", 3, 120, True), drift("d1", 3, 120, True)])  # a redelivery too
    store.apply([drift("d1", 4, 180, True)])
    store.apply([drift("d1", 5, 240, False), drift("d1", 6, 300, True)])
    alerts = store.alerts(kind="drift")
    assert len(alerts) == 2 == sum(1 for a, b in zip([False, *pattern], pattern, strict=False) if b and not a)
    second, first = alerts  # most recent first; both renewed now, ordered by id among equals
    assert (first.count, second.count) == (3, 1)
    assert first.device_id == "d1" and first.model == "wine" and first.version == 3
    assert first.evidence["window"]["seq"] == 4 and first.evidence["alerting"] == ["y"]
    assert first.first_seen < first.last_seen
    store.apply([drift("d1", 3, 120, True)])  # redelivered later: changes nothing
    assert [a.count for a in store.alerts(kind="drift")] == [1, 3]


def test_drift_run_arriving_out_of_order_is_one_alert(store: FleetStore) -> None:
    store.apply([drift("d2", 14, 240, True)])
    store.apply([drift("d2", 12, 120, True)])
    store.apply([drift("d2", 11, 60, False)])
    store.apply([drift("d2", 13, 180, True)])
    alerts = store.alerts(kind="drift", device_id="d2")
    assert len(alerts) == 1 and alerts[0].count == 3
    assert alerts[0].evidence["window"]["seq"] == 14  # the latest window's evidence
    # another device's run is its own alert
    store.apply([drift("d3", 1, 180, True)])
    assert len(store.alerts(kind="drift")) == 2


def test_error_rate_alert_is_fleet_wide_and_one_per_episode(store: FleetStore) -> None:
    # bucket [300, 600): 60 + 50 requests, 8 + 4 errors = 10.9% once the sum reaches 100 requests
    store.apply([summary("d1", 1, end=400.0, requests=60, errors=8)])
    assert store.alerts(kind="error_rate") == []  # 60 requests: under the minimum of 100
    store.apply([summary("d2", 1, end=500.0, requests=50, errors=4)])
    (alert,) = store.alerts(kind="error_rate")
    assert alert.device_id is None and alert.severity == "warning"
    assert alert.evidence["requests"] == 110 and alert.evidence["errors"] == 12
    assert alert.evidence["devices"] == 2
    store.apply([summary("d1", 1, end=400.0, requests=60, errors=8)])  # duplicate: nothing new
    assert store.alerts(kind="error_rate")[0].count == 1
    # the next bucket [600, 900) is worse: the same episode, now critical
    store.apply([summary("d3", 1, end=700.0, requests=100, errors=60)])
    (alert,) = store.alerts(kind="error_rate")
    assert alert.count == 2 and alert.severity == "critical" and alert.evidence["rate"] == 0.6
    # healthy bucket, then a bad one after a gap: a new episode
    store.apply([summary("d1", 2, end=1000.0, requests=200, errors=0)])
    store.apply([summary("d1", 3, end=1600.0, requests=200, errors=40)])
    assert len(store.alerts(kind="error_rate")) == 2


def test_error_rate_is_checked_once_per_bucket_of_a_batch(store: FleetStore) -> None:
    """A batch's summaries are indexed first and each (model, version, bucket) is summed once
    after them: the sum is over the whole batch, and one alert comes of it."""
    report = store.apply(
        [
            summary("d1", 1, end=400.0, requests=60, errors=8),
            summary("d2", 1, end=500.0, requests=50, errors=4),
            summary("d3", 1, end=550.0, requests=40, errors=6),
            summary("d4", 1, end=1000.0, requests=20, errors=0),  # another bucket, too few requests
        ]
    )
    assert report.windows == 4 and report.alerts == 1
    (alert,) = store.alerts(kind="error_rate")
    assert alert.count == 1 and alert.evidence["requests"] == 150 and alert.evidence["errors"] == 18
    assert alert.evidence["devices"] == 3


def test_rollback_and_refusal_events(store: FleetStore) -> None:
    fell = update("d1", 5, "probation_failed", reason="error rate 30% over 2%")
    store.apply([fell, fell])
    store.apply([fell])
    store.apply([update("d1", 6, "probation_passed")])
    (alert,) = store.alerts(kind="rollback")
    assert alert.severity == "critical" and alert.version == 4 and "error rate 30%" in alert.message
    store.apply([update("d1", 7, "assignment_refused"), update("d1", 8, "assignment_refused")])
    (refused,) = store.alerts(kind="refused")
    assert refused.count == 2
    assert {a.kind for a in store.alerts()} == {"rollback", "refused"}
    assert store.alerts(since=datetime(2030, 1, 1, tzinfo=UTC)) == []
