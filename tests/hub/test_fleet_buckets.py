"""The error-rate rule's running sums (hub.fleet.buckets, revision 0003): each bucket row equals
the aggregate of its summary windows in fleet_windows, after duplicates, several buckets and
versions, retention, and two writers counting into one bucket at once (on PostgreSQL the real
race). On SQLite and PostgreSQL (`database_url`, tests/conftest.py)."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import text

from hub.fleet import AlertRules, FleetStore, Incoming, parse_message
from hub.registry import Database
from tests.support.clock import Clock

SIZE = 300.0


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    d = Database(database_url)
    d.create_all()
    FleetStore(d).create_tables()
    yield d
    d.dispose()


def make_store(db: Database, clock: Clock | None = None, size: float = SIZE) -> FleetStore:
    rules = AlertRules(error_rate=0.1, error_rate_critical=0.5, error_min_requests=100, error_window_s=size)
    return FleetStore(db, keep_per_device=5, clock=clock or Clock(), window_retention_s=86400, rules=rules)


def summary(device: str, seq: int, end: float, requests: int, errors: int, version: int = 3) -> Incoming:
    doc = {"device_id": device, "seq": seq, "ts": 1.0, "model": "wine", "version": version, "start": end - 60,
           "end": end, "requests": requests, "errors": errors, "rows": requests - errors}  # fmt: skip
    parsed = parse_message(f"outpost/v1/plant/{device}/summary", json.dumps(doc).encode())
    assert parsed is not None
    return Incoming(parsed)


def stored_buckets(db: Database, size: float = SIZE) -> dict[tuple[str, int, float], tuple[int, int, int]]:
    with db.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT model, version, bucket, windows, requests, errors FROM fleet_error_buckets "
                "WHERE window_s = :size"
            ),
            {"size": size},
        )
        return {(m, int(v), float(b)): (int(n), int(r), int(e)) for m, v, b, n, r, e in rows}


def summed_windows(db: Database, size: float = SIZE) -> dict[tuple[str, int, float], tuple[int, int, int]]:
    """What the rule summed before: every summary window of fleet_windows, by bucket."""
    sums: dict[tuple[str, int, float], tuple[int, int, int]] = {}
    with db.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT model, version, window_end, requests, errors FROM fleet_windows "
                "WHERE kind = 'summary'"
            )
        )
        for model, version, end, requests, errors in rows:
            key = (model, int(version), math.floor(end / size) * size)
            n, r, e = sums.get(key, (0, 0, 0))
            sums[key] = (n + 1, r + int(requests), e + int(errors))
    return sums


def test_sums_follow_the_windows_through_duplicates_buckets_versions_and_retention(db: Database) -> None:
    clock = Clock()
    store = make_store(db, clock)
    first = [summary(f"d{i}", 1, end=310.0 + i, requests=10 + i, errors=i % 3) for i in range(6)]
    report = store.apply([*first, first[0], summary("d0", 2, end=650.0, requests=7, errors=1)])
    assert report.windows == 7 and report.duplicates == 1
    store.apply([*first[:3], summary("d1", 2, end=620.0, requests=5, errors=5, version=4)])  # redelivered
    store.apply([summary("d9", 1, end=-250.0, requests=3, errors=0)])  # a device clock before 1970
    sums = summed_windows(db)
    assert stored_buckets(db) == sums
    assert sums[("wine", 3, 300.0)] == (6, 75, 6) and sums[("wine", 4, 600.0)] == (1, 5, 5)
    assert ("wine", 3, -300.0) in sums
    clock.now += timedelta(hours=12)
    store.apply([summary("d0", 3, end=340.0, requests=4, errors=4)])  # late, into an old bucket
    assert stored_buckets(db) == summed_windows(db)
    clock.now += timedelta(hours=13)  # the first windows pass the retention, d0's late one not
    report = store.apply([summary("d5", 2, end=1000.0, requests=1, errors=0)])
    assert report.expired == 9
    assert (
        stored_buckets(db)
        == summed_windows(db)
        == {("wine", 3, 300.0): (1, 4, 4), ("wine", 3, 900.0): (1, 1, 0)}
    )


def test_two_writers_counting_into_one_bucket_both_count(database_url: str) -> None:
    """Two hub workers (their own engines) store batches of one bucket at the same moment, some
    messages through both (a redelivery): every new window counted once. On PostgreSQL their
    transactions overlap: a read-modify-write of the sums would lose one writer's counts."""
    dbs = [Database(database_url), Database(database_url)]
    dbs[0].create_all()
    stores = [make_store(d) for d in dbs]
    stores[0].create_tables()
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait()
            for b in range(15):
                own = [summary(f"w{i}-d{k}", b, end=400.0 + k, requests=10, errors=k % 2) for k in range(20)]
                # through both now and then (every batch would serialize them on the devices' locks)
                shared = [
                    summary(f"shared-d{k}", b, end=500.0, requests=3, errors=1)
                    for k in range(5)
                    if b % 5 == 0
                ]
                stores[i].apply([*own, *shared])
        except BaseException as exc:  # collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    try:
        assert errors == []
        expected = (2 * 15 * 20 + 3 * 5, 2 * 15 * 20 * 10 + 3 * 5 * 3, 2 * 15 * 10 + 3 * 5)
        assert stored_buckets(dbs[0]) == summed_windows(dbs[0]) == {("wine", 3, 300.0): expected}
    finally:
        for d in dbs:
            d.dispose()


def test_the_rule_decides_on_the_buckets_sums(db: Database) -> None:
    store = make_store(db)
    store.apply([summary("d1", 1, end=400.0, requests=60, errors=8)])
    assert store.alerts(kind="error_rate") == []
    store.apply(
        [
            summary("d2", 1, end=500.0, requests=50, errors=4),
            summary("d1", 1, end=400.0, requests=60, errors=8),
        ]
    )
    (alert,) = store.alerts(kind="error_rate")
    assert (alert.evidence["requests"], alert.evidence["errors"], alert.evidence["devices"]) == (110, 12, 2)


def test_a_hub_with_another_bucket_size_fills_its_own_buckets(db: Database) -> None:
    make_store(db).apply([summary(f"d{i}", 1, end=100.0 + 250 * i, requests=10, errors=i) for i in range(4)])
    other = make_store(db, size=600.0)
    other.apply([summary("d9", 1, end=590.0, requests=1, errors=1)])
    assert stored_buckets(db, 600.0) == summed_windows(db, 600.0) == {
        ("wine", 3, 0.0): (3, 21, 2), ("wine", 3, 600.0): (2, 20, 5)
    }  # fmt: skip
    assert stored_buckets(db) == {}  # no hub keeps the 300 s buckets now
    make_store(db).apply([summary("d9", 2, end=900.0, requests=2, errors=0)])  # back to 300 s
    assert stored_buckets(db) == summed_windows(db) and len(stored_buckets(db)) == 4
    assert stored_buckets(db, 600.0) == {}
