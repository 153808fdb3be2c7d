"""Capture messages: the checks a message passes (pure), and the store (through the fleet
store, as the consumer writes): dedupe by (device, seq), labels before or after their rows, the
per-version limit, retention. The store tests run on SQLite and on PostgreSQL (`database_url`,
tests/conftest.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from hub.capture import rules
from hub.capture.store import CaptureStore
from hub.capture.tables import (
    CaptureBatchRow,
    CaptureCountRow,
    CaptureDropRow,
    CaptureLabelRow,
    CaptureRow,
)
from hub.errors import InvalidRequestError, NotFoundError
from hub.fleet import FleetStore, Incoming, Invalid, parse_message
from hub.fleet.store import FleetMessageRow
from hub.registry import Database


def row(pid: str, version: int = 3, n: int = 1, ts: float = 1000.0) -> dict[str, Any]:
    return {
        "id": pid,
        "version": version,
        "ts": ts,
        "inputs": {"input": [[float(i), None, 2.5] for i in range(n)]},
        "outputs": {"label": [1] * n, "probabilities": [[0.1, 0.8, 0.1]] * n},
    }


def body(
    seq: int, rows: list[Any] | None = None, labels: list[Any] | None = None, **extra: Any
) -> dict[str, Any]:
    return {
        "device_id": "dev-1",
        "seq": seq,
        "ts": 1000.5,
        "schema": "outpost-capture/1",
        "model": "wine",
        "rows": rows or [],
        "labels": labels or [],
        "dropped": {"rate": 0, "size": 0, "full": 0},
        **extra,
    }


def parse(doc: dict[str, Any], device: str = "dev-1") -> Any:
    return parse_message(f"outpost/v1/lab/{device}/capture", json.dumps(doc).encode())


def test_a_capture_message_parses() -> None:
    msg = parse(
        body(7, [row("a", n=2)], [{"id": "z", "label": [1, 2], "ts": 5}], dropped={"rate": 3, "x": 1})
    )
    assert isinstance(msg, rules.CaptureMsg)
    assert (msg.group, msg.device_id, msg.seq, msg.ts, msg.model) == ("lab", "dev-1", 7, 1000.5, "wine")
    assert msg.rows[0].prediction_id == "a" and msg.rows[0].n == 2 and msg.rows[0].version == 3
    assert msg.labels == (rules.FedLabel("z", [1, 2], 5.0),)
    assert msg.dropped == {"rate": 3}


def _without(key: str) -> dict[str, Any]:
    r = row("a")
    del r[key]
    return body(1, [r])


BAD = {
    "schema": body(1, schema="outpost-capture/2"),
    "model": body(1, model="no spaces"),
    "rows-not-list": body(1, rows={"a": 1}),
    "too-many-rows": body(1, [row(str(i)) for i in range(rules.MAX_ROWS_PER_MESSAGE + 1)]),
    "long-id": body(1, [row("x" * 129)]),
    "empty-id": body(1, [row("")]),
    "no-version": _without("version"),
    "bool-version": body(1, [{**row("a"), "version": True}]),
    "no-ts": _without("ts"),
    "no-inputs": _without("inputs"),
    "ragged": body(1, [{**row("a", n=2), "outputs": {"label": [1]}}]),
    "scalar-tensor": body(1, [{**row("a"), "inputs": {"input": 3}}]),
    "label-no-value": body(1, labels=[{"id": "a"}]),
    "label-long-id": body(1, labels=[{"id": "y" * 129, "label": 1}]),
    "dropped-negative": body(1, dropped={"rate": -1}),
    "no-seq": {k: v for k, v in body(1).items() if k != "seq"},
    "other-device": body(1, device_id="dev-2"),
}


@pytest.mark.parametrize("doc", BAD.values(), ids=BAD.keys())
def test_a_bad_capture_message_is_invalid(doc: dict[str, Any]) -> None:
    with pytest.raises(Invalid):
        parse(doc)


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 27, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    d = Database(database_url)  # SQLite, then PostgreSQL (tests/conftest.py)
    d.create_all()
    yield d
    d.dispose()


@pytest.fixture
def fleet(db: Database, clock: Clock) -> FleetStore:
    store = FleetStore(db, clock=clock, capture=CaptureStore(max_rows_per_version=5, retention_s=3600))
    store.create_tables()
    CaptureStore.create_tables(db)
    return store


def send(fleet: FleetStore, *docs: dict[str, Any]) -> Any:
    return fleet.apply([Incoming(parse(d, d["device_id"])) for d in docs])


def count(db: Database, table: Any) -> int:
    with db.session() as s:
        return int(s.scalar(select(func.count()).select_from(table)) or 0)


def test_a_redelivered_message_is_stored_once_and_not_in_fleet_messages(
    fleet: FleetStore, db: Database
) -> None:
    first = send(fleet, body(1, [row("a"), row("b")], dropped={"rate": 2}))
    assert (first.captured, first.capture_rows, first.duplicates) == (1, 2, 0)
    again = send(fleet, body(1, [row("a"), row("b")], dropped={"rate": 2}))
    assert (again.captured, again.capture_rows, again.duplicates) == (0, 0, 1)
    assert count(db, CaptureRow) == 2 and count(db, CaptureBatchRow) == 1 and count(db, CaptureDropRow) == 1
    assert count(db, FleetMessageRow) == 0
    assert fleet.device("dev-1").last_seq == 1
    with db.session() as s:
        batch = s.scalars(select(CaptureBatchRow)).one()
        assert (batch.device_id, batch.seq, batch.group, batch.model, batch.rows) == (
            "dev-1",
            1,
            "lab",
            "wine",
            2,
        )
        stored = s.scalars(select(CaptureRow).where(CaptureRow.prediction_id == "a")).one()
        assert json.loads(stored.inputs) == {"input": [[0.0, None, 2.5]]}
        assert json.loads(stored.outputs) == {"label": [1], "probabilities": [[0.1, 0.8, 0.1]]}


def labels(db: Database) -> dict[tuple[str, str], Any]:
    with db.session() as s:
        return {
            (r.device_id, r.prediction_id): json.loads(r.label) for r in s.scalars(select(CaptureLabelRow))
        }


def test_labels_join_by_device_and_id_whenever_they_come(fleet: FleetStore, db: Database) -> None:
    send(fleet, body(1, labels=[{"id": "early", "label": 2}]))  # before its row
    send(fleet, body(2, [row("early"), row("late")]))
    send(fleet, body(3, labels=[{"id": "late", "label": "x"}, {"id": "late", "label": "y"}]))
    send(fleet, {**body(1, labels=[{"id": "late", "label": 9}]), "device_id": "dev-2"})  # another device
    assert labels(db) == {("dev-1", "early"): 2, ("dev-1", "late"): "y", ("dev-2", "late"): 9}
    send(fleet, body(4, labels=[{"id": "early", "label": 1}]))  # a correction: the latest wins
    assert labels(db)[("dev-1", "early")] == 1


def test_rows_over_the_per_version_limit_are_dropped_and_counted(fleet: FleetStore, db: Database) -> None:
    report = send(fleet, body(1, [row(str(i)) for i in range(4)] + [row("v4", version=4)]))
    assert report.capture_rows == 5
    report = send(fleet, body(2, [row(str(i)) for i in range(4, 7)]))  # room for 1 of 3
    assert report.capture_rows == 1
    with db.session() as s:
        drops = s.execute(select(CaptureDropRow.version, CaptureDropRow.reason, CaptureDropRow.count)).all()
        counts = dict(s.execute(select(CaptureCountRow.version, CaptureCountRow.rows)).all())
    assert [tuple(d) for d in drops] == [(3, "limit", 2)]
    assert counts == {3: 5, 4: 1}


def test_capture_expires_with_the_fleet_cadence(fleet: FleetStore, db: Database, clock: Clock) -> None:
    send(fleet, body(1, [row("a"), row("b")], [{"id": "a", "label": 1}], dropped={"full": 1}))
    clock.now += timedelta(seconds=1800)
    send(fleet, body(2, [row("c")]))
    clock.now += timedelta(seconds=1900)  # the first message is past the hour, the second not
    send(fleet, body(3))
    assert count(db, CaptureRow) == 1 and count(db, CaptureLabelRow) == 0 and count(db, CaptureDropRow) == 0
    assert count(db, CaptureBatchRow) == 2
    with db.session() as s:
        assert s.scalar(select(CaptureCountRow.rows)) == 1


def test_without_a_capture_store_messages_are_counted_and_dropped(db: Database, clock: Clock) -> None:
    store = FleetStore(db, clock=clock)
    store.create_tables()
    CaptureStore.create_tables(db)
    report = send(store, body(1, [row("a")]))
    assert report.capture_ignored == 1 and count(db, CaptureRow) == 0 and count(db, FleetMessageRow) == 0


def test_the_listing_and_an_export_read_the_store(fleet: FleetStore, db: Database, tmp_path: Path) -> None:
    from hub.capture.queries import CaptureQueries, ExportRequest
    from hub.registry import BlobStore, Registry

    send(fleet, body(1, [row("a", n=2, ts=1000.0), row("b", ts=1001.0)], dropped={"size": 4}))
    send(fleet, body(2, labels=[{"id": "b", "label": 7}]))
    send(fleet, {**body(1, [row("c", version=4)]), "device_id": "dev-2"})
    queries = CaptureQueries(db, Registry(db, BlobStore(tmp_path / "blobs")), clock=lambda: 2000.0)
    listing = queries.listing("wine")
    assert [(v["version"], v["rows"], v["labelled"], v["devices"]) for v in listing["versions"]] == [
        (3, 2, 1, 1),
        (4, 1, 0, 1),
    ]
    assert listing["versions"][0]["first_ts"].startswith("1970-01-01T00:16:40")
    assert listing["groups"] == [
        {"group": "lab", "model": "wine", "capture": None, "dropped": {"rate": 0, "size": 4, "full": 0}}
    ]
    # version 3 was never pushed to this registry: the columns come from what was captured
    csv_text = b"".join(queries.export(ExportRequest("wine", 3)).chunks).decode()
    assert csv_text.splitlines() == [
        "ts,device_id,group,version,id,row,input_0,input_1,input_2,output_label,probabilities_0,probabilities_1,probabilities_2,label",
        "1970-01-01T00:16:40.000Z,dev-1,lab,3,a,0,0.0,,2.5,1,0.1,0.8,0.1,",
        "1970-01-01T00:16:40.000Z,dev-1,lab,3,a,1,1.0,,2.5,1,0.1,0.8,0.1,",
        "1970-01-01T00:16:41.000Z,dev-1,lab,3,b,0,0.0,,2.5,1,0.1,0.8,0.1,7",
    ]
    labelled = b"".join(queries.export(ExportRequest("wine", 3, labelled_only=True, since="1000.5")).chunks)
    assert [line.split(",")[4] for line in labelled.decode().splitlines()[1:]] == ["b"]
    with pytest.raises(NotFoundError):
        queries.export(ExportRequest("wine", 9))
    with pytest.raises(InvalidRequestError):
        queries.export(ExportRequest("wine", 3, format="xlsx"))
