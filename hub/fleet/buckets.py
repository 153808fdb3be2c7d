"""Running sums of the fleet error-rate rule, so that its cost does not grow with the fleet.

    fleet_error_buckets  model, version, window_s (the bucket size), bucket (its start, device
                         clock), windows, requests, errors; primary key (model, version,
                         window_s, bucket)

A row holds, for one bucket of the rule (hub.fleet.alerts.error_bucket), the count and the
sums of the summary windows in `fleet_windows` whose end falls in it: exactly what the rule
summed over `fleet_windows` (every device's windows, 10,000 rows per bucket with 10,000
devices) before each check, now one row read.

Invariant: a row equals the aggregate of the summary windows stored in `fleet_windows`. The
store keeps it in the transaction that changes them: a window counts when its insert was new
(RETURNING: a duplicate (device_id, seq) never counts twice), and stops counting when retention
deletes it (DELETE ... RETURNING: a window two hub workers expire at once is returned to one of
them); a row with no window left is deleted. Every change is one upsert per bucket, `INSERT ...
ON CONFLICT DO UPDATE SET requests = fleet_error_buckets.requests + excluded.requests, ...`:
the database adds atomically, so two writers counting into one bucket both count (no
read-modify-write in Python). Upserts go in key order, before the transaction takes any alert
row, so two writers lock bucket rows in one order.

The bucket size is in the key: a hub configured with another `alert_error_window_s` fills its
buckets from `fleet_windows` once, on its first write (`fill`), and drops the other size's,
which nothing keeps any more; the hubs sharing a database are meant to share their settings.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import BigInteger, Float, String, Table, bindparam, delete, func, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from hub.fleet.alerts import error_bucket
from hub.fleet.ledger import FleetBase, FleetWindowRow

BucketKey = tuple[str, int, float]  # model, version, bucket start


class FleetErrorBucketRow(FleetBase):
    __tablename__ = "fleet_error_buckets"

    model: Mapped[str] = mapped_column(String(128), primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    window_s: Mapped[float] = mapped_column(Float, primary_key=True)
    bucket: Mapped[float] = mapped_column(Float, primary_key=True)
    windows: Mapped[int] = mapped_column(BigInteger)
    requests: Mapped[int] = mapped_column(BigInteger)
    errors: Mapped[int] = mapped_column(BigInteger)


BUCKETS = cast(Table, FleetErrorBucketRow.__table__)
_KEY_COLUMNS = ("model", "version", "window_s", "bucket")
_DELETE_EMPTY = delete(BUCKETS).where(
    BUCKETS.c.model == bindparam("b_model"),
    BUCKETS.c.version == bindparam("b_version"),
    BUCKETS.c.window_s == bindparam("b_window_s"),
    BUCKETS.c.bucket == bindparam("b_bucket"),
    BUCKETS.c.windows <= 0,
)


@dataclass
class Counts:
    """Summary windows, and their requests and errors: a bucket's sums, or a change to them."""

    windows: int = 0
    requests: int = 0
    errors: int = 0

    def add(self, windows: int, requests: int, errors: int) -> None:
        self.windows += windows
        self.requests += requests
        self.errors += errors


def count_window(deltas: dict[BucketKey, Counts], values: Mapping[str, Any], size: float) -> BucketKey:
    """Add a summary window (its fleet_windows row `values`) to the change of its bucket."""
    key = (values["model"], values["version"], error_bucket(values["window_end"], size))
    deltas.setdefault(key, Counts()).add(1, values["requests"], values["errors"])
    return key


def removed(rows: Iterable[Any], size: float) -> dict[BucketKey, Counts]:
    """The change deleting windows makes: `rows` (kind, model, version, window_end, requests,
    errors) as DELETE ... RETURNING gave them; drift windows are not counted."""
    deltas: dict[BucketKey, Counts] = {}
    for kind, model, version, end, requests, errors in rows:
        if kind == "summary":
            key = (model, version, error_bucket(end, size))
            deltas.setdefault(key, Counts()).add(-1, -requests, -errors)
    return deltas


def _upsert(session: Session) -> Any:
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        stmt: Any = pg_insert(BUCKETS)
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        stmt = sqlite_insert(BUCKETS)
    else:  # pragma: no cover - the hub runs on SQLite and PostgreSQL
        raise RuntimeError(f"fleet_error_buckets needs SQLite or PostgreSQL, not {dialect}")
    return stmt


def apply(session: Session, deltas: Mapping[BucketKey, Counts], size: float) -> dict[BucketKey, Counts]:
    """Add the `deltas` to their buckets (of `size` seconds), one atomic upsert per bucket in key
    order; the buckets' sums after (RETURNING). Buckets left with no window are deleted."""
    totals: dict[BucketKey, Counts] = {}
    if not deltas:
        return totals
    base = _upsert(session)
    stmt = base.on_conflict_do_update(
        index_elements=list(_KEY_COLUMNS),
        set_={
            name: BUCKETS.c[name] + getattr(base.excluded, name) for name in ("windows", "requests", "errors")
        },
    ).returning(BUCKETS.c.windows, BUCKETS.c.requests, BUCKETS.c.errors)
    empty = []
    for key in sorted(deltas):
        model, version, bucket = key
        d = deltas[key]
        row = {"model": model, "version": version, "window_s": size, "bucket": bucket}
        windows, requests, errors = session.execute(
            stmt.values(**row, windows=d.windows, requests=d.requests, errors=d.errors)
        ).one()
        totals[key] = Counts(int(windows), int(requests), int(errors))
        if windows <= 0:
            empty.append({f"b_{name}": value for name, value in row.items()})
    if empty:
        session.execute(_DELETE_EMPTY, empty)
    return totals


def fill(session: Session, size: float) -> int:
    """Sum `fleet_windows` into the buckets of `size` seconds when there are none of that size
    yet (a hub whose `alert_error_window_s` is new to this database); the buckets written.
    The buckets of another size are deleted: nothing keeps them now (a hub going back to that
    size fills them again). Buckets another writer wrote meanwhile are left as they are."""
    if session.scalar(select(BUCKETS.c.windows).where(BUCKETS.c.window_s == size).limit(1)) is not None:
        return 0
    session.execute(delete(BUCKETS).where(BUCKETS.c.window_s != size))
    w = FleetWindowRow
    # Grouped by end first (a fleet's windows share few ends), then by bucket here: floor() is
    # not in every SQLite.
    rows = session.execute(
        select(w.model, w.version, w.window_end, func.count(), func.sum(w.requests), func.sum(w.errors))
        .where(w.kind == "summary")
        .group_by(w.model, w.version, w.window_end)
    )
    sums: dict[BucketKey, Counts] = {}
    for model, version, end, windows, requests, errors in rows:
        key = (model, version, error_bucket(end, size))
        sums.setdefault(key, Counts()).add(int(windows), int(requests or 0), int(errors or 0))
    if not sums:
        return 0
    stmt = _upsert(session).on_conflict_do_nothing(index_elements=list(_KEY_COLUMNS))
    session.execute(
        stmt,
        [
            {"model": m, "version": v, "window_s": size, "bucket": b, **vars(c)}
            for (m, v, b), c in sorted(sums.items())
        ],
    )
    return len(sums)
