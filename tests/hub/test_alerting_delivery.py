"""Alerts out, delivered for real: the dispatcher on a real database (SQLite, then PostgreSQL:
`database_url`, tests/conftest.py) sends to a real HTTP receiver on 127.0.0.1. Alerts are raised the way
the hub raises them (FleetStore.apply, RolloutStore, the devices table); time is a test clock."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from hub.alerting import AlertingConfig, Dispatcher, RetryPolicy, Webhook
from hub.alerting.store import AlertingBase
from hub.fleet import FleetStore, Incoming, parse_message
from hub.fleet.ledger import FleetBase
from hub.fleet.store import DeviceRow
from hub.registry import Database
from hub.rollouts.plan import Gates, State
from hub.rollouts.store import Rollout, RolloutBase, RolloutStore
from tests.support.receiver import Receiver

HUB = "http://hub.example:8700"


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 27, 14, 0, tzinfo=UTC)
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> Clock:
    return Clock()


_OPEN: list[Database] = []  # every Database a test opened (one per "process"), closed after it


def database(url: str) -> Database:
    db = Database(url)
    _OPEN.append(db)
    return db


@pytest.fixture
def db_url(database_url: str) -> Iterator[str]:
    url = database_url  # SQLite, then PostgreSQL (tests/conftest.py)
    db = database(url)
    db.create_all()
    for base in (FleetBase, RolloutBase, AlertingBase):
        base.metadata.create_all(db.engine)
    yield url
    while _OPEN:
        _OPEN.pop().dispose()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as rx:
        yield rx


POLICY = RetryPolicy(max_attempts=5, base_s=1.0, max_backoff_s=8.0, max_age_s=3600.0)


def dispatcher(url: str, clock: Clock, *hooks: Webhook, offline_after_s: float = 0.0) -> Dispatcher:
    config = AlertingConfig(hooks, HUB, offline_after_s=offline_after_s, timeout_s=5.0, policy=POLICY)
    d = Dispatcher(database(url), config, clock=clock)
    d.create_tables()
    return d


def fleet(url: str, clock: Clock) -> FleetStore:
    return FleetStore(database(url), clock=clock)


def msg(device: str, kind: str, seq: int, **body: Any) -> Incoming:
    doc = {"device_id": device, "seq": seq, "ts": 1.0, **body}
    parsed = parse_message(f"outpost/v1/lab/{device}/{kind}", json.dumps(doc).encode())
    assert parsed is not None
    return Incoming(parsed)


def fallback(device: str, seq: int) -> Incoming:
    ref = {"model": "wine", "version": 4, "sha256": "cd" * 32}
    return msg(device, "event", seq, event="update", transition="probation_failed", version=ref,
               reason="error rate 30% over 10%")  # fmt: skip


def drift(device: str, seq: int) -> Incoming:
    test = {"name": "alcohol", "test": "ks", "p_value": 1e-9, "drifted": True, "streak": 3}
    return msg(device, "drift", seq, model="wine", version=3, start=60.0 * seq, end=60.0 * seq + 60,
               rows=400, features=[test], alert=True, alerting=["alcohol"], streak=3, k=3)  # fmt: skip


def run(d: Dispatcher, clock: Clock, ticks: int, step_s: float = 10.0) -> None:
    for _ in range(ticks):
        d.tick()
        clock.advance(step_s)


def test_a_503_twice_is_retried_and_the_alert_arrives_exactly_once(
    db_url: str, clock: Clock, receiver: Receiver
) -> None:
    fleet(db_url, clock).apply([fallback("dev-1", 1)])
    receiver.script("/hook", 503, 503)
    d = dispatcher(db_url, clock, Webhook("ops", receiver.url + "/hook"))
    report = d.tick()
    assert (report.noticed, report.queued, report.sent, report.delivered) == (1, 1, 1, 0)
    (first,) = d.deliveries()
    assert (first.state, first.attempts, first.last_status) == ("pending", 1, 503)
    assert first.next_attempt == clock.now + timedelta(seconds=1)  # base_s, then doubling
    assert d.tick().sent == 0  # not due yet
    run(d, clock, 6)
    got = receiver.at("/hook")
    assert [r.status for r in got] == [503, 503, 200]
    assert {r.headers["Idempotency-Key"] for r in got} == {"fleet:rollback:dev-1:1"}
    (done,) = d.deliveries()
    assert (done.state, done.attempts, done.last_status) == ("delivered", 3, 200)
    body = got[-1].body
    assert (body["kind"], body["severity"], body["device"], body["group"]) == (
        "rollback",
        "critical",
        "dev-1",
        "lab",
    )
    assert body["link"] == f"{HUB}/models/wine"


def test_a_400_is_not_retried(db_url: str, clock: Clock, receiver: Receiver) -> None:
    fleet(db_url, clock).apply([fallback("dev-1", 1)])
    receiver.script("/hook", 400)
    d = dispatcher(db_url, clock, Webhook("ops", receiver.url + "/hook"))
    run(d, clock, 5)
    assert len(receiver.at("/hook")) == 1
    (failed,) = d.deliveries()
    assert (failed.state, failed.attempts, failed.last_status) == ("failed", 1, 400)
    assert failed.last_error.startswith("HTTP 400") and "not retried" in failed.last_error


def test_retries_end_after_max_attempts_and_connection_errors_count(db_url: str, clock: Clock) -> None:
    fleet(db_url, clock).apply([fallback("dev-1", 1)])
    with Receiver() as rx:
        closed = rx.url  # nothing listens there once the receiver is gone
    d = dispatcher(db_url, clock, Webhook("ops", closed + "/hook"))
    run(d, clock, 12)
    (failed,) = d.deliveries()
    assert (failed.state, failed.attempts) == ("failed", 5)
    assert "cannot connect" in failed.last_error and "gave up after 5 attempts" in failed.last_error


def test_a_restarted_hub_does_not_send_delivered_alerts_again(
    db_url: str, clock: Clock, receiver: Receiver
) -> None:
    fleet(db_url, clock).apply([fallback("dev-1", 1), fallback("dev-2", 2)])
    first = dispatcher(db_url, clock, Webhook("ops", receiver.url + "/hook"))
    run(first, clock, 2)
    assert len(receiver.at("/hook")) == 2
    second = dispatcher(db_url, clock, Webhook("ops", receiver.url + "/hook"))  # a new process
    run(second, clock, 3)
    assert len(receiver.at("/hook")) == 2
    fleet(db_url, clock).apply([fallback("dev-3", 3)])  # ... and it still sends new ones
    run(second, clock, 2)
    assert [b["device"] for b in receiver.bodies("/hook")] == ["dev-1", "dev-2", "dev-3"]


def test_two_dispatchers_on_one_database_deliver_each_alert_once(db_url: str, clock: Clock) -> None:
    fleet(db_url, clock).apply([fallback(f"dev-{i}", i) for i in range(1, 25)])
    with Receiver(delay_s=0.02) as rx:
        rx.script("/hook", 503, 503, 503)  # some retries in the mix
        hook = Webhook("ops", rx.url + "/hook")
        workers = [dispatcher(db_url, clock, hook), dispatcher(db_url, clock, hook)]
        errors: list[BaseException] = []

        def work(d: Dispatcher) -> None:
            try:
                for _ in range(8):
                    d.tick()
                    clock.advance(3.0)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(w,)) for w in workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors
        delivered = [r.headers["Idempotency-Key"] for r in rx.at("/hook") if r.status == 200]
    assert len(delivered) == 24 and len(set(delivered)) == 24
    states = [d.state for d in workers[0].deliveries()]
    assert states == ["delivered"] * 24


def test_each_format_carries_the_alert_and_its_dashboard_link(
    db_url: str, clock: Clock, receiver: Receiver
) -> None:
    fleet(db_url, clock).apply([drift("dev-7", 3)])
    hooks = (
        Webhook("generic", receiver.url + "/json", token="s3cret", headers={"X-Team": "edge"}),
        Webhook("chat", receiver.url + "/slack", format="slack"),
        Webhook("pager", receiver.url + "/am", format="alertmanager"),
        Webhook("critical-only", receiver.url + "/crit", format="alertmanager", min_severity="critical"),
    )
    run(dispatcher(db_url, clock, *hooks), clock, 2)
    link = f"{HUB}/drift/wine/3"
    (generic,) = receiver.at("/json")
    assert generic.headers["Authorization"] == "Bearer s3cret" and generic.headers["X-Team"] == "edge"
    assert generic.headers["Content-Type"] == "application/json"
    body = generic.body
    assert body["schema"] == "outpost.alert/v1" and body["status"] == "firing"
    assert (body["kind"], body["model"], body["version"], body["device"]) == ("drift", "wine", 3, "dev-7")
    assert body["link"] == link and "alcohol" in body["text"]
    (slack,) = receiver.bodies("/slack")
    assert set(slack) == {"text", "blocks"} and link in slack["text"]
    assert any(link in json.dumps(block) for block in slack["blocks"])
    ((am,),) = receiver.bodies("/am")
    assert am["labels"]["alertname"] == "OutpostDrift"
    assert (am["labels"]["severity"], am["labels"]["model"], am["labels"]["device"]) == (
        "warning",
        "wine",
        "dev-7",
    )
    assert am["annotations"]["dashboard"] == link and am["generatorURL"] == link
    assert am["startsAt"] == "2026-11-27T14:00:00+00:00"  # when the hub first saw the alert
    assert receiver.at("/crit") == []  # a warning is below its minimum


def test_a_device_offline_past_the_threshold_raises_one_alert_and_is_resolved_when_back(
    db_url: str, clock: Clock, receiver: Receiver
) -> None:
    db = database(db_url)
    with db.session(write=True) as s:
        s.add(
            DeviceRow(device_id="dev-9", group="lab", online=False, bd_seq=4, last_seen=clock.now, state="{}")
        )
        s.add(
            DeviceRow(device_id="dev-8", group="lab", online=True, bd_seq=2, last_seen=clock.now, state="{}")
        )
    hook = Webhook("pager", receiver.url + "/am", format="alertmanager")
    d = dispatcher(db_url, clock, hook, offline_after_s=600)
    run(d, clock, 5, step_s=100)  # 500 s offline: not yet
    assert receiver.at("/am") == []
    run(d, clock, 10, step_s=100)  # past 600 s, and long after
    ((firing,),) = receiver.bodies("/am")
    assert firing["labels"]["alertname"] == "OutpostDeviceOffline"
    assert firing["labels"]["device"] == "dev-9" and "endsAt" not in firing
    assert firing["generatorURL"] == f"{HUB}/"
    with db.session(write=True) as s:  # the device's birth: online, the same session number
        row = s.get(DeviceRow, "dev-9")
        assert row is not None
        row.online, row.last_seen = True, clock.now
    run(d, clock, 3)
    (_, (resolved,)) = receiver.bodies("/am")
    assert resolved["labels"] == firing["labels"] and resolved["endsAt"]
    with db.session(write=True) as s:  # offline again (a new session): a new alert, once
        row = s.get(DeviceRow, "dev-9")
        assert row is not None
        row.online, row.bd_seq, row.last_seen = False, 5, clock.now
    run(d, clock, 10, step_s=100)
    assert len(receiver.at("/am")) == 3
    assert receiver.bodies("/am")[2][0]["labels"]["alert_id"] == "offline:dev-9@5"


def test_a_halted_rollout_is_notified_with_its_reason(db_url: str, clock: Clock, receiver: Receiver) -> None:
    rollouts = RolloutStore(database(db_url))
    now = clock.now
    started = rollouts.create(
        Rollout(0, "lab", "wine", 3, 4, (5, 25, 100), 0, now, now, 60.0, 10, Gates(), State.RUNNING, "", 1,
                now, "ops"),
        {},
    )  # fmt: skip
    halted = rollouts.change(
        started, now, "halt", "controller", "error rate 12% over 5%", {}, state=State.HALTED
    )
    assert halted is not None
    run(dispatcher(db_url, clock, Webhook("chat", receiver.url + "/slack", format="slack")), clock, 2)
    (slack,) = receiver.bodies("/slack")
    assert "Rollout halted: wine v4 in lab" in slack["text"]
    assert "error rate 12% over 5%" in json.dumps(slack["blocks"])
    assert f"<{HUB}/models/wine|" in json.dumps(slack["blocks"])


def summary(device: str, seq: int, requests: int, errors: int) -> Incoming:
    return msg(device, "summary", seq, model="wine", version=3, start=1000.0, end=1060.0, requests=requests,
               errors=errors, rows=requests - errors)  # fmt: skip


def test_an_error_rate_turning_critical_is_notified_again_as_critical(
    db_url: str, clock: Clock, receiver: Receiver
) -> None:
    hooks = (
        Webhook("chat", receiver.url + "/json"),
        Webhook("pager", receiver.url + "/am", format="alertmanager", min_severity="critical"),
    )
    d = dispatcher(db_url, clock, *hooks)
    store = fleet(db_url, clock)
    store.apply([summary("dev-1", 1, requests=200, errors=20)])  # 10%: a warning
    run(d, clock, 2)
    assert [b["severity"] for b in receiver.bodies("/json")] == ["warning"]
    assert receiver.at("/am") == []
    store.apply([summary("dev-2", 2, requests=200, errors=180)])  # the same bucket: 50%, critical
    run(d, clock, 2)
    assert [b["severity"] for b in receiver.bodies("/json")] == ["warning", "critical"]
    ((am,),) = receiver.bodies("/am")
    assert am["labels"]["alertname"] == "OutpostErrorRate" and am["labels"]["severity"] == "critical"
    assert am["annotations"]["summary"].startswith("Now critical: ")
    assert am["generatorURL"] == f"{HUB}/models/wine"
    run(d, clock, 3)
    assert len(receiver.at("/json")) == 2 and len(receiver.at("/am")) == 1  # once each


def test_a_dead_webhook_costs_one_attempt_a_tick_and_does_not_hold_the_others(
    db_url: str, clock: Clock, receiver: Receiver
) -> None:
    fleet(db_url, clock).apply([fallback(f"dev-{i}", i) for i in range(1, 6)])
    receiver.script("/dead", *([503] * 50))
    hooks = (Webhook("dead", receiver.url + "/dead"), Webhook("live", receiver.url + "/live"))
    d = dispatcher(db_url, clock, *hooks)
    report = d.tick()
    assert (report.sent, report.delivered) == (6, 5)  # one try at the dead one, all five live ones
    assert len(receiver.at("/dead")) == 1 and len(receiver.at("/live")) == 5


def test_a_claim_left_by_a_crashed_hub_is_taken_over_after_its_lease(
    db_url: str, clock: Clock, receiver: Receiver
) -> None:
    from hub.alerting import sources
    from hub.alerting import store as alert_store

    fleet(db_url, clock).apply([fallback("dev-1", 1)])
    hook = Webhook("ops", receiver.url + "/hook")
    crashed = dispatcher(db_url, clock, hook)
    with crashed.db.session(write=True) as s:  # what tick() does before it sends ...
        since = clock.now - timedelta(hours=1)
        sources.fleet_alerts(s, since, clock.now, crashed.sources)
        alert_store.enqueue(s, "ops", hook.severities(), since, clock.now, 10)
    with crashed.db.session(write=True) as s:  # ... it claims the delivery, then dies before sending
        (delivery_id,) = alert_store.due(s, ["ops"], clock.now, 10)
        assert alert_store.claim(s, delivery_id, "crashed", clock.now, crashed.config.lease_s)
    survivor = dispatcher(db_url, clock, hook)
    run(survivor, clock, 3)  # 30 s: the lease (3 x 5 s + 30 s) holds
    assert receiver.at("/hook") == []
    run(survivor, clock, 3)
    assert len(receiver.at("/hook")) == 1
    (done,) = survivor.deliveries()
    assert (done.state, done.attempts) == ("delivered", 2)  # the crashed claim counts as an attempt
