"""A summary or drift message's body is stored once, in fleet_windows (revision 0002): the
messages read it through the window, a message that outlives its window gets the body back
before the window goes, and the revision moves existing data both ways. SQLite and PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text

from hub import migrations
from hub.fleet import FleetStore, Incoming, parse_message
from hub.registry import Database
from tests.support.clock import Clock


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    d = Database(database_url)
    yield d
    d.dispose()


def msg(kind: str, seq: int, **body: Any) -> Incoming:
    doc = {"device_id": "d1", "seq": seq, "model": "wine", "version": 3, "start": 0.0, "end": 60.0, **body}
    parsed = parse_message(f"outpost/v1/plant/d1/{kind}", json.dumps(doc).encode())
    assert parsed is not None
    return Incoming(parsed)


def stored_bodies(db: Database) -> dict[int, str | None]:
    with db.connect() as conn:
        return {int(s): b for s, b in conn.execute(text("SELECT seq, body FROM fleet_messages"))}


def test_messages_read_the_body_through_the_window_until_it_expires(db: Database) -> None:
    db.create_all()
    clock = Clock()
    store = FleetStore(db, clock=clock, window_retention_s=86400)
    store.create_tables()
    store.apply(
        [msg("summary", 1, requests=5, errors=0, rows=5), msg("event", 2, event="x"), msg("drift", 3)]
    )
    bodies = stored_bodies(db)
    assert bodies[1] is None and bodies[3] is None and bodies[2] is not None
    got = {m.seq: m.body for m in store.messages("d1")}
    assert got[1]["requests"] == 5 and got[2]["event"] == "x" and got[3]["model"] == "wine"
    clock.now += timedelta(days=2)  # the windows expire; the messages (kept by count) stay
    report = store.apply([msg("event", 4, event="y")])
    assert report.expired == 2 and store.windows("summary", "wine", 3, -1e9, 1e9) == []
    assert {m.seq: m.body.get("requests") for m in store.messages("d1")} == {1: 5, 2: None, 3: None, 4: None}
    assert all(b is not None for b in stored_bodies(db).values())


def test_the_revision_moves_bodies_both_ways(db: Database) -> None:
    migrations.upgrade(db, "0001")
    body = json.dumps({"seq": 1, "model": "wine"}, sort_keys=True)
    other = json.dumps({"seq": 2, "event": "x"}, sort_keys=True)
    at = datetime(2024, 1, 1)
    with db.connect(write=True) as conn:
        for seq, kind, b in ((1, "summary", body), (2, "event", other)):
            conn.execute(
                text(
                    "INSERT INTO fleet_messages (device_id, seq, kind, ts, received, body) "
                    "VALUES ('d1', :seq, :kind, NULL, :at, :body)"
                ),
                {"seq": seq, "kind": kind, "at": at, "body": b},
            )
        conn.execute(
            text(
                'INSERT INTO fleet_windows (device_id, seq, kind, "group", model, version, window_start, '
                "window_end, received, requests, errors, n_rows, alert, body) VALUES ('d1', 1, 'summary', "
                "'plant', 'wine', 3, 0, 60, :at, 5, 0, 5, NULL, :body)"
            ),
            {"at": at, "body": body},
        )
    migrations.upgrade(db)
    assert stored_bodies(db) == {1: None, 2: other}  # the event has no window: kept
    migrations.downgrade(db, "0001")
    assert stored_bodies(db) == {1: body, 2: other}
