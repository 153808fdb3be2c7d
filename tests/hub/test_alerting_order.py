"""Alerting on SQLite and PostgreSQL (`database_url`, tests/conftest.py): a resolution never
overtakes the alert it resolves, and a sender that breaks fails its delivery instead of holding it."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from hub.alerting import AlertingConfig, Attempt, Dispatcher, RetryPolicy, Webhook
from hub.alerting.store import AlertingBase
from hub.fleet.ledger import FleetBase
from hub.fleet.store import DeviceRow
from hub.registry import Database
from hub.rollouts.store import RolloutBase
from tests.support.receiver import Receiver

HUB = "http://hub.example:8700"


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 27, 14, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    db = Database(database_url)
    db.create_all()
    for base in (FleetBase, RolloutBase, AlertingBase):
        base.metadata.create_all(db.engine)
    yield db
    db.dispose()


def offline_device(db: Database, at: datetime) -> None:
    with db.session(write=True) as s:
        s.add(DeviceRow(device_id="dev-9", group="lab", online=False, bd_seq=4, last_seen=at, state="{}"))


def run(d: Dispatcher, clock: Clock, ticks: int, step_s: float) -> None:
    for _ in range(ticks):
        d.tick()
        clock.now += timedelta(seconds=step_s)


def test_a_resolution_waits_for_the_alert_it_resolves(db: Database) -> None:
    clock = Clock()
    offline_device(db, clock.now - timedelta(hours=1))
    with Receiver() as rx:
        rx.script("/am", 503, 503, 503)
        policy = RetryPolicy(base_s=10.0, max_backoff_s=10.0)
        config = AlertingConfig((Webhook("pager", rx.url + "/am", format="alertmanager"),), HUB, 600.0,
                                policy=policy)  # fmt: skip
        d = Dispatcher(db, config, clock=clock)
        run(d, clock, 1, step_s=1)  # the offline alert: 503, pending
        with db.session(write=True) as s:
            row = s.get(DeviceRow, "dev-9")
            assert row is not None
            row.online = True
        run(d, clock, 5, step_s=1)  # the resolution is queued, and waits
        assert [r.status for r in rx.at("/am")] == [503]
        assert {x.state for x in d.deliveries()} == {"pending"}
        run(d, clock, 40, step_s=1)
        sent = [(r.status, "endsAt" in r.body[0]) for r in rx.at("/am")]
    assert sent == [(503, False), (503, False), (503, False), (200, False), (200, True)]


def test_a_sender_that_breaks_fails_the_delivery_and_releases_it(db: Database) -> None:
    clock = Clock()
    offline_device(db, clock.now - timedelta(hours=1))

    def broken(url: str, body: Any, headers: Mapping[str, str], timeout_s: float) -> Attempt:
        raise RuntimeError("a bug")

    config = AlertingConfig((Webhook("ops", "http://127.0.0.1:9/hook"),), HUB, 600.0)
    d = Dispatcher(db, config, poster=broken, clock=clock)
    run(d, clock, 3, step_s=100)
    (failed,) = d.deliveries()
    assert (failed.state, failed.attempts) == ("failed", 1)
    assert failed.last_error == "internal error: RuntimeError: a bug"
