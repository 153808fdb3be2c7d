"""The fleet writer's batch path: the pure plan (hub.fleet.batch), the one-statement insert
(hub.registry.db.insert_new) on SQLite and PostgreSQL, and whole batches through FleetStore that
mix new messages with redeliveries, late ones and states: stored once, effects applied once."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, Text, UniqueConstraint, func, select

from hub.fleet import FleetStore, Incoming, parse_message
from hub.fleet.batch import DeviceState, may_need_pruning, plan_batch, prepare
from hub.fleet.ledger import FleetWindowRow
from hub.fleet.rules import Message
from hub.fleet.store import FleetMessageRow
from hub.registry import Database
from hub.registry.db import UTCDateTime, insert_new

NOW = datetime(2024, 1, 1, tzinfo=UTC)


def parsed(device: str, kind: str, doc: dict[str, Any], group: str = "plant") -> Message:
    msg = parse_message(f"outpost/v1/{group}/{device}/{kind}", json.dumps(doc).encode())
    assert msg is not None
    return msg


def window(device: str, kind: str, seq: int, end: float = 600.0, **extra: Any) -> Message:
    body = {"seq": seq, "model": "wine", "version": 3, "start": end - 60, "end": end}
    body.update({"requests": 10, "errors": 0, "rows": 10} if kind == "summary" else {"alert": False})
    return parsed(device, kind, {**body, **extra})


# -- the plan, pure -----------------------------------------------------------------------------

PLANS: list[tuple[str, list[tuple[Message, bool]], dict[str, Any], dict[str, Any]]] = [
    (
        "a repeat in the batch adds no rows and counts as a duplicate",
        [(window("d1", "summary", 5), False), (window("d1", "summary", 5), False)],
        {},
        {"windows": [5], "messages": [5], "duplicates": 1, "last_seq": 5},
    ),
    (
        "too old for the messages, still a window; last_seq stays",
        [(window("d1", "summary", 3), False), (window("d1", "drift", 12), False)],
        {"pruned_seq": 4, "last_seq": 10},
        {"windows": [3, 12], "messages": [12], "too_old": 1, "last_seq": 12},
    ),
    (
        "an event is a message, not a window",
        [(parsed("d1", "event", {"seq": 7, "event": "x"}), False)],
        {},
        {"windows": [], "messages": [7], "last_seq": 7},
    ),
    (
        "a body that cannot be indexed is a message only",
        [(parsed("d1", "summary", {"seq": 2, "model": "wine"}), False)],
        {},
        {"windows": [], "messages": [2], "last_seq": 2},
    ),
    (
        "an older will is ignored, a retained state does not move last_seen",
        [
            (parsed("d1", "state", {"online": False, "bd_seq": 1}), True),
            (parsed("d1", "state", {"online": True, "bd_seq": 3, "versions": {"wine": 3}}), True),
        ],
        {"online": True, "bd_seq": 2},
        {"states": (1, 1), "online": True, "bd_seq": 3, "last_seen": None},
    ),
    (
        "a will keeps the versions the birth told",
        [
            (parsed("d1", "state", {"online": True, "bd_seq": 3, "versions": {"wine": 3}}), False),
            (parsed("d1", "state", {"online": False, "bd_seq": 3}), False),
        ],
        {},
        {"states": (2, 0), "online": False, "versions": {"wine": 3}, "last_seen": NOW},
    ),
    (
        "capture without a capture store is counted and leaves last_seq",
        [(parsed("d1", "capture", {"seq": 9, "schema": "outpost-capture/1", "model": "wine"}), False)],
        {"last_seq": 4},
        {"capture_ignored": 1, "last_seq": 4},
    ),
]


@pytest.mark.parametrize(("batch", "stored", "expected"), [p[1:] for p in PLANS], ids=[p[0] for p in PLANS])
def test_plan(batch: list[tuple[Message, bool]], stored: dict[str, Any], expected: dict[str, Any]) -> None:
    devices = {"d1": DeviceState("d1", "plant", **stored)}
    plan = plan_batch([prepare(msg, retained) for msg, retained in batch], devices, NOW, capture=False)
    device = devices["d1"]
    got = {
        "windows": [r["seq"] for r in plan.window_rows()],
        "messages": [r["seq"] for r in plan.message_rows()],
        "duplicates": plan.duplicates,
        "too_old": plan.too_old,
        "capture_ignored": plan.capture_ignored,
        "states": (plan.states_applied, plan.states_ignored),
        "last_seq": device.last_seq,
        "online": device.online,
        "bd_seq": device.bd_seq,
        "last_seen": device.last_seen,
        "versions": json.loads(device.state).get("versions"),
    }
    assert {k: got[k] for k in expected} == expected


def test_the_body_is_stored_once() -> None:
    """A window's message leaves its body to the window row; an event keeps its own."""
    summary, event = window("d1", "summary", 1), parsed("d1", "event", {"seq": 2, "event": "x"})
    plan = plan_batch(
        [prepare(summary), prepare(event)], {"d1": DeviceState("d1", "plant")}, NOW, capture=False
    )
    (w,), (m1, m2) = plan.window_rows(), plan.message_rows()
    assert m1["body"] is None and json.loads(w["body"]) == getattr(summary, "body", None)
    assert json.loads(m2["body"]) == {"seq": 2, "event": "x"}
    assert w["received"] == m1["received"] == NOW


@pytest.mark.parametrize(
    ("msg", "kept"),
    [
        (window("d1", "summary", 1), False),
        (window("d1", "drift", 2), False),
        (window("d1", "drift", 3, alert=True), True),  # its alert reads the body after the insert
        (parsed("d1", "event", {"seq": 4, "event": "update"}), True),
        (parsed("d1", "state", {"online": True, "bd_seq": 1}), True),
    ],
    ids=["summary", "drift", "drift alerting", "event", "state"],
)
def test_prepare_keeps_the_parsed_message_only_when_needed(msg: Message, kept: bool) -> None:
    assert (prepare(msg).keep is msg) is kept


@pytest.mark.parametrize(
    ("pruned_seq", "last_seq", "needed"),
    [(None, None, True), (None, 50, True), (10, 15, False), (10, 20, False), (10, 21, True)],
)
def test_pruning_is_asked_only_when_the_seq_range_allows_more_than_keep(
    pruned_seq: int | None, last_seq: int | None, needed: bool
) -> None:
    device = DeviceState("d1", "g", pruned_seq=pruned_seq, last_seq=last_seq)
    assert may_need_pruning(device, keep=10) is needed


def test_parse_keeps_strict_json_text_and_falls_back_to_the_stdlib() -> None:
    strict = parse_message("outpost/v1/g/d/event", b'{"seq": 1,  "x": [1, 2]}')
    assert strict is not None and getattr(strict, "text", None) == '{"seq": 1,  "x": [1, 2]}'
    # NaN is not JSON, but the hub always took it (Python's json): still taken, encoded again
    loose = parse_message("outpost/v1/g/d/event", b'{"seq": 2, "x": NaN}')
    assert loose is not None and getattr(loose, "text", "?") is None
    bom = parse_message("outpost/v1/g/d/summary", b'\xef\xbb\xbf{"seq": 3}')
    assert bom is not None and getattr(bom, "text", "?") is None


# -- insert_new on both databases ---------------------------------------------------------------


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    database = Database(database_url)
    yield database
    database.dispose()


def test_insert_new_returns_exactly_the_keys_it_inserted(db: Database) -> None:
    meta = MetaData()
    table = Table(
        "t",
        meta,
        Column("id", Integer, primary_key=True),
        Column("device_id", String(16)),
        Column("seq", Integer),
        Column("group", String(16)),  # a reserved word, quoted
        Column("at", UTCDateTime()),
        Column("body", Text),
        UniqueConstraint("device_id", "seq"),
    )
    meta.create_all(db.engine)

    def rows(*seqs: int) -> list[dict[str, Any]]:
        return [
            {"device_id": "d", "seq": s, "group": "g", "at": NOW, "body": '{"a": "\\"q\\""}'} for s in seqs
        ]

    key = ("device_id", "seq")
    with db.connect(write=True) as conn:
        assert insert_new(conn, table, rows(1, 2, 2, 3), key) == {("d", 1), ("d", 2), ("d", 3)}
        assert insert_new(conn, table, rows(3, 4), key) == {("d", 4)}
        assert insert_new(conn, table, [], key) == set()
        # more rows than SQLite lets one statement bind (32,766 variables / 5 columns)
        many = rows(*range(10, 7010))
        assert len(insert_new(conn, table, many, key)) == 7000
    with db.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(table)) == 7004
        at, body = conn.execute(select(table.c.at, table.c.body).where(table.c.seq == 1)).one()
        assert (at, body) == (NOW, '{"a": "\\"q\\""}')


# -- whole batches through the store ------------------------------------------------------------


def incoming(msg: Message, retained: bool = False) -> Incoming:
    return Incoming(msg, retained)


def test_a_batch_mixing_new_repeated_and_late_messages(db: Database) -> None:
    db.create_all()
    store = FleetStore(db, keep_per_device=3, clock=lambda: NOW)
    store.create_tables()
    assert store.apply([incoming(window("d1", "summary", s)) for s in (1, 2)]).stored == 2
    fell = parsed("d1", "event", {"seq": 6, "event": "update", "transition": "probation_failed"})
    batch = [
        incoming(window("d1", "summary", 2)),  # stored before: a duplicate, no window, no alert
        incoming(window("d1", "drift", 3)),
        incoming(window("d2", "summary", 1)),  # a new device
        incoming(window("d1", "drift", 3)),  # repeated in the batch
        incoming(window("d1", "summary", 4)),
        incoming(window("d1", "summary", 5)),
        incoming(fell),
        incoming(fell),
    ]
    report = store.apply(batch)
    assert (report.stored, report.duplicates, report.windows, report.alerts) == (5, 3, 4, 1)
    assert report.pruned == 3  # d1 holds 1..6: the newest 3 stay
    assert [m.seq for m in store.messages("d1")] == [6, 5, 4]
    assert store.device("d1").last_seq == 6 and store.device("d2").last_seq == 1
    late = store.apply([incoming(window("d1", "drift", 0, end=60.0)), incoming(fell)])
    assert (late.stored, late.too_old, late.duplicates, late.windows, late.alerts) == (0, 1, 1, 1, 0)
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(FleetWindowRow)) == 7
        assert s.scalar(select(func.count()).select_from(FleetMessageRow)) == 4  # d1: 3, d2: 1
    assert len(store.alerts(kind="rollback")) == 1


def test_two_writers_meeting_a_new_device_both_succeed(db: Database) -> None:
    """Two hub workers' batches for the same new devices at the same moment: the devices row is
    inserted ON CONFLICT DO NOTHING and then locked, so neither fails; each message stored once."""
    db.create_all()
    stores = [FleetStore(db, clock=lambda: NOW) for _ in range(2)]
    stores[0].create_tables()
    errors: list[BaseException] = []
    reports: list[Any] = []
    start = threading.Barrier(2)

    def run(store: FleetStore, seqs: range) -> None:
        try:
            start.wait()
            for seq in seqs:
                batch = [incoming(window(f"d{i}", "summary", seq)) for i in range(20)]
                reports.append(store.apply(batch))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s, range(1, 11))) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert sum(r.stored for r in reports) == 200 and sum(r.duplicates for r in reports) == 200
    assert sum(r.windows for r in reports) == 200
    assert len(stores[0].devices()) == 20
