"""The fleet's tables and the writes the consumer makes, on the registry's database.

    devices         device_id PK, group, online, bd_seq NULL (no state seen yet),
                    last_seen NULL (hub clock of the last live message), state (JSON text,
                    the last applied state), last_seq NULL (highest telemetry seq seen),
                    pruned_seq NULL (messages at or below it were removed by retention)
    fleet_messages  id, device_id, seq, kind (summary | drift | event), ts NULL (the
                    device's, epoch seconds), received (hub clock), body (JSON text; NULL
                    when fleet_windows holds it: a window's message); UNIQUE(device_id, seq)

Own DeclarativeBase (the registry's tables are not touched), in the registry's database (SQLite by
default, PostgreSQL unchanged); the hub's schema comes from hub.migrations, `create_tables` is
for tests.

Dedupe: (device_id, seq) is unique and inserted with ON CONFLICT DO NOTHING, so a QoS 1
redelivery, or the same message through two hub workers, is stored once.
Retention (bounded): the newest `keep_per_device` messages per device are kept
(DEFAULT_KEEP_PER_DEVICE); older ones are deleted and `pruned_seq` remembers where, so a
message at or below it arriving late is dropped (counted as too old) instead of stored again.
A retained state delivered on (re)subscribe does not move `last_seen` (it is not news).

Writes are per batch (the consumer's, up to 500 messages), in one transaction: the batch's
devices locked with one SELECT, one INSERT per table for all its rows (hub.registry.db.
insert_new: which (device_id, seq) were new comes back from RETURNING), one UPDATE
(executemany) for the devices it changed, one query for the retention's cut-offs. What each
message does is decided without the database (hub.fleet.batch), in batch order, exactly as
applying the messages one at a time did; effects (windows, alerts) follow only the rows that
were new. The body is stored as the device sent it (hub.fleet.rules: strict JSON), and once:
a summary or drift message that is a window keeps it in fleet_windows only (its fleet_messages
row has body NULL; `messages` reads it through the window, and a window's body is copied back
to its message before the window expires, hub.fleet.ledger.expire_windows).

Summary and drift windows are also indexed in `fleet_windows`, summed per error-rate bucket in
`fleet_error_buckets` (hub.fleet.buckets: one upsert per bucket of the batch, for the windows
that were new), and alerts raised in `fleet_alerts` (hub.fleet.ledger), in the same
transaction; those are kept by age (`window_retention_s`, DEFAULT_WINDOW_RETENTION_S), not by
the per-device count, so fleet sums over recent ranges never miss a window the message
retention dropped.

Capture messages (data for retraining, big) never go to `fleet_messages`: the `capture` sink
(hub.capture.store) stores them in its own tables in the same transaction, and expires them on
the same cadence. Without a sink they are counted (`capture_ignored`) and dropped.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, cast

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    String,
    Table,
    Text,
    UniqueConstraint,
    and_,
    bindparam,
    delete,
    func,
    select,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Mapped, Session, mapped_column

from hub.capture.rules import CaptureMsg
from hub.errors import NotFoundError
from hub.fleet import buckets, ledger
from hub.fleet.alerts import AlertRules
from hub.fleet.batch import DeviceState, Prepared, first_groups, may_need_pruning, plan_batch, prepare
from hub.fleet.ledger import FleetBase, FleetWindowRow
from hub.fleet.rules import Message, TelemetryMsg
from hub.registry import Database
from hub.registry.db import UTCDateTime, insert_new

DEFAULT_KEEP_PER_DEVICE = 1000
DEFAULT_WINDOW_RETENTION_S = 30 * 86400.0
EXPIRE_EVERY_S = 60.0  # how often a write also deletes windows and alerts past their age


class DeviceRow(FleetBase):
    __tablename__ = "devices"

    device_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    group: Mapped[str] = mapped_column(String(128), index=True)
    online: Mapped[bool] = mapped_column(Boolean, default=False)
    bd_seq: Mapped[int | None] = mapped_column(BigInteger)
    last_seen: Mapped[datetime | None] = mapped_column(UTCDateTime())
    state: Mapped[str] = mapped_column(Text, default="{}")
    last_seq: Mapped[int | None] = mapped_column(BigInteger)
    pruned_seq: Mapped[int | None] = mapped_column(BigInteger)


class FleetMessageRow(FleetBase):
    __tablename__ = "fleet_messages"
    __table_args__ = (UniqueConstraint("device_id", "seq", name="uq_fleet_messages_device_seq"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    device_id: Mapped[str] = mapped_column(String(128))
    seq: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(16))
    ts: Mapped[float | None] = mapped_column(Float)
    received: Mapped[datetime] = mapped_column(UTCDateTime())
    body: Mapped[str | None] = mapped_column(Text)  # NULL: in fleet_windows (see the docstring)


# The write path's statements, built once (Core: see FleetStore._apply).
DEVICES = cast(Table, DeviceRow.__table__)
MESSAGES = cast(Table, FleetMessageRow.__table__)
WINDOWS = cast(Table, FleetWindowRow.__table__)
KEY = ("device_id", "seq")  # what both message tables dedupe on
_DEVICE_COLUMNS = ("group", "online", "bd_seq", "last_seen", "state", "last_seq", "pruned_seq")
_SELECT_DEVICES = (
    select(DEVICES.c.device_id, *(DEVICES.c[name] for name in _DEVICE_COLUMNS))
    .where(DEVICES.c.device_id.in_(bindparam("ids", expanding=True)))
    .order_by(DEVICES.c.device_id)
    .with_for_update()
)
# bindparam names must differ from the columns' in an UPDATE's SET clause
_UPDATE_DEVICE = (
    update(DEVICES)
    .where(DEVICES.c.device_id == bindparam("b_device_id"))
    .values({name: bindparam(f"b_{name}") for name in _DEVICE_COLUMNS})
)
_DELETE_UP_TO = delete(MESSAGES).where(
    MESSAGES.c.device_id == bindparam("b_device_id"), MESSAGES.c.seq <= bindparam("b_cutoff")
)


def _device_params(device: DeviceState) -> dict[str, Any]:
    params = {f"b_{name}": getattr(device, name) for name in _DEVICE_COLUMNS}
    params["b_device_id"] = device.device_id
    return params


def _cutoffs_statement(keep: int) -> Any:
    """Per device (`ids`), the seq of its newest message past the newest `keep`, or NULL: an
    index walk of (device_id, seq) from the top, in the database."""
    newest_first = (
        select(MESSAGES.c.seq)
        .where(MESSAGES.c.device_id == DEVICES.c.device_id)
        .order_by(MESSAGES.c.seq.desc())
        .offset(keep)
        .limit(1)
        .scalar_subquery()
    )
    return select(DEVICES.c.device_id, newest_first).where(
        DEVICES.c.device_id.in_(bindparam("ids", expanding=True))
    )


@dataclass(frozen=True)
class Incoming:
    """A parsed message and how it came: `retained` when the broker replayed a retained one."""

    message: Message
    retained: bool = False

    @property
    def device_id(self) -> str:
        return self.message.device_id


@dataclass
class ApplyReport:
    stored: int = 0
    duplicates: int = 0
    too_old: int = 0
    states_applied: int = 0
    states_ignored: int = 0
    pruned: int = 0
    windows: int = 0  # summary and drift windows indexed for aggregation
    alerts: int = 0  # alerts raised or renewed
    expired: int = 0  # windows and alerts deleted by age
    captured: int = 0  # capture messages stored (their duplicates count in `duplicates`)
    capture_rows: int = 0  # captured requests stored
    capture_ignored: int = 0  # capture messages dropped: no capture store


class CaptureSink(Protocol):
    """Where capture messages go (hub.capture.store.CaptureStore), in the fleet's transaction."""

    def record(self, session: Session, msg: CaptureMsg, now: datetime) -> Any: ...

    def expire(self, session: Session, now: datetime) -> int: ...


@dataclass(frozen=True)
class DeviceInfo:
    device_id: str
    group: str
    online: bool
    bd_seq: int | None
    last_seen: datetime | None
    last_seq: int | None
    state: dict[str, Any] = field(default_factory=dict)
    messages: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "group": self.group,
            "online": self.online,
            "bd_seq": self.bd_seq,
            "last_seen": self.last_seen.isoformat() if self.last_seen else None,
            "last_seq": self.last_seq,
            "versions": self.state.get("versions"),
            "update": self.state.get("update"),
            "messages": self.messages,
            "state": self.state,
        }


@dataclass(frozen=True)
class StoredMessage:
    device_id: str
    seq: int
    kind: str
    ts: float | None
    received: datetime
    body: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "kind": self.kind,
            "ts": self.ts,
            "received": self.received.isoformat(),
            "body": self.body,
        }


def utc_now() -> datetime:
    return datetime.now(UTC)


class FleetStore:
    def __init__(
        self,
        db: Database,
        keep_per_device: int = DEFAULT_KEEP_PER_DEVICE,
        *,
        clock: Callable[[], datetime] = utc_now,
        window_retention_s: float = DEFAULT_WINDOW_RETENTION_S,
        rules: AlertRules | None = None,
        capture: CaptureSink | None = None,
    ) -> None:
        if keep_per_device < 1:
            raise ValueError("keep_per_device must be at least 1")
        if not window_retention_s > 0:
            raise ValueError("window_retention_s must be positive")
        self.db = db
        self.keep_per_device = keep_per_device
        self.clock = clock
        self.window_retention = timedelta(seconds=window_retention_s)
        self.rules = rules or AlertRules()
        self.capture = capture
        self._expired_at: datetime | None = None
        self._buckets_filled = False
        self._cutoffs = _cutoffs_statement(keep_per_device)

    def create_tables(self) -> None:
        """The fleet's tables, for tests and tools (a hub's database: hub.migrations)."""
        FleetBase.metadata.create_all(self.db.engine)

    def apply(self, batch: Sequence[Incoming | Prepared]) -> ApplyReport:
        """Write a batch in one transaction. The consumer hands it messages already reduced to
        their rows (hub.fleet.batch.prepare: their bodies need not live until the batch is
        written). Retried once on a unique violation (two hub workers adding the same row of
        the capture tables at the same moment)."""
        items = [i if isinstance(i, Prepared) else prepare(i.message, i.retained) for i in batch]
        if not self._buckets_filled:  # its own transaction: no lock held across the batch's
            with self.db.session(write=True) as session:
                buckets.fill(session, self.rules.error_window_s)
            self._buckets_filled = True
        try:
            return self._apply(items)
        except sa_exc.IntegrityError:
            return self._apply(items)

    def _apply(self, batch: list[Prepared]) -> ApplyReport:
        report = ApplyReport()
        now = self.clock()
        with self.db.session(write=True) as session:
            # Core statements on the session's connection for the per-message rows: the ORM's
            # unit of work and statement building cost more than the database did (profile of
            # make bench-fleet's ingest phase). Alerts and capture, rare, stay on the ORM.
            conn = session.connection()
            devices = self._lock_devices(conn, batch)
            before = {device_id: d.values() for device_id, d in devices.items()}
            plan = plan_batch(batch, devices, now, capture=self.capture is not None)
            report.duplicates += plan.duplicates
            report.too_old += plan.too_old
            report.states_applied += plan.states_applied
            report.states_ignored += plan.states_ignored
            report.capture_ignored += plan.capture_ignored
            for msg in plan.captures:
                self._capture(session, msg, now, report)
            new_windows = insert_new(conn, WINDOWS, plan.window_rows(), KEY)
            message_rows = plan.message_rows()
            new_messages = insert_new(conn, MESSAGES, message_rows, KEY)
            report.stored += len(new_messages)
            report.duplicates += len(message_rows) - len(new_messages)
            rates: set[buckets.BucketKey] = set()  # error-rate checks for after the batch
            added: dict[buckets.BucketKey, buckets.Counts] = {}  # what the new windows add to them
            for entry in plan.entries:  # in batch order, as the alerts were raised one message at a time
                item = entry.item
                key = (item.device_id, item.seq)
                body = item.keep.body if isinstance(item.keep, TelemetryMsg) else None
                if entry.window is not None and key in new_windows:
                    report.windows += 1
                    report.alerts += ledger.window_alerts(session, entry.window, body, now, self.rules, rates)
                    if entry.window["kind"] == "summary":
                        buckets.count_window(added, entry.window, self.rules.error_window_s)
                if isinstance(item.keep, TelemetryMsg) and item.kind == "event" and key in new_messages:
                    report.alerts += ledger.record_event(session, item.keep, now)
            session.flush()
            expire = self._expired_at is None or (now - self._expired_at).total_seconds() >= EXPIRE_EVERY_S
            cutoff = now - self.window_retention
            alerts, expired = self._error_rates(session, added, rates, cutoff if expire else None, now)
            report.alerts += alerts
            report.pruned += self._prune(conn, devices, plan.telemetry_devices)
            changed = [d for device_id, d in devices.items() if d.values() != before[device_id]]
            if changed:
                conn.execute(_UPDATE_DEVICE, [_device_params(d) for d in changed])
            if expire:
                report.expired += expired + ledger.expire_alerts(session, cutoff)
                if self.capture is not None:
                    report.expired += self.capture.expire(session, now)
                self._expired_at = now
        return report

    def _error_rates(
        self,
        session: Session,
        added: dict[buckets.BucketKey, buckets.Counts],
        rates: set[buckets.BucketKey],
        cutoff: datetime | None,
        now: datetime,
    ) -> tuple[int, int]:
        """Add the batch's new summary windows to their buckets (hub.fleet.buckets), take the
        windows received before `cutoff` out of them and delete those (retention, when due), and
        check the error rate once per (model, version, bucket) of the new windows. Returns
        (alerts raised or renewed, windows deleted). The buckets are all written, in key order,
        before any error-rate alert: the lock order hub.fleet.buckets relies on."""
        size = self.rules.error_window_s
        gone: dict[buckets.BucketKey, buckets.Counts] = {}
        expired = 0
        if cutoff is not None:
            rows = ledger.expire_windows(session, cutoff, MESSAGES)
            expired, gone = len(rows), buckets.removed(rows, size)
        deltas = {key: buckets.Counts(c.windows, c.requests, c.errors) for key, c in added.items()}
        for key, c in gone.items():
            deltas.setdefault(key, buckets.Counts()).add(c.windows, c.requests, c.errors)
        totals = buckets.apply(session, deltas, size)
        sums = {}
        for key in rates:
            # the sums the rule saw before retention moved ahead of it: the windows expiring now
            # still counted
            total, out = totals.get(key, buckets.Counts()), gone.get(key, buckets.Counts())
            sums[key] = (total.requests - out.requests, total.errors - out.errors)
        return ledger.check_error_rates(session, sums, self.rules, now), expired

    @staticmethod
    def _lock_devices(conn: Connection, batch: Sequence[Prepared]) -> dict[str, DeviceState]:
        """The batch's devices, locked until the transaction ends (PostgreSQL: FOR UPDATE, in
        device id order so that two hub workers lock in the same order; SQLite: the write
        lock). Devices seen for the first time are inserted first, ON CONFLICT DO NOTHING, so
        that one another worker inserts at the same moment is locked here too."""
        groups = first_groups(batch)
        ids = sorted(groups)
        devices = {row[0]: DeviceState(*row) for row in conn.execute(_SELECT_DEVICES, {"ids": ids})}
        missing = [device_id for device_id in ids if device_id not in devices]
        if missing:
            rows = [{"device_id": d, "group": groups[d], "online": False, "state": "{}"} for d in missing]
            insert_new(conn, DEVICES, rows, ("device_id",))
            found = conn.execute(_SELECT_DEVICES, {"ids": missing})
            devices.update((row[0], DeviceState(*row)) for row in found)
        return devices

    def _capture(self, session: Session, msg: CaptureMsg, now: datetime, report: ApplyReport) -> None:
        assert self.capture is not None  # plan_batch leaves capture messages out without a sink
        done = self.capture.record(session, msg, now)
        report.captured += done.batches
        report.duplicates += done.duplicates
        report.capture_rows += done.rows

    def _prune(self, conn: Connection, devices: dict[str, DeviceState], touched: set[str]) -> int:
        """Delete each touched device's messages past the newest `keep_per_device`: the cut-off
        seqs of all of them in one query (an index walk per device), the deletes in one
        executemany; devices whose seq range shows they cannot be over are not asked."""
        ids = sorted(d for d in touched if may_need_pruning(devices[d], self.keep_per_device))
        if not ids:
            return 0
        cutoffs = [(d, c) for d, c in conn.execute(self._cutoffs, {"ids": ids}) if c is not None]
        if not cutoffs:
            return 0
        result: Any = conn.execute(_DELETE_UP_TO, [{"b_device_id": d, "b_cutoff": c} for d, c in cutoffs])
        for device_id, cutoff in cutoffs:
            device = devices[device_id]
            device.pruned_seq = max(cutoff, device.pruned_seq or cutoff)
        return int(result.rowcount or 0)

    # -- reads --------------------------------------------------------------------------------

    @staticmethod
    def _info(row: DeviceRow, messages: int) -> DeviceInfo:
        return DeviceInfo(
            device_id=row.device_id,
            group=row.group,
            online=row.online,
            bd_seq=row.bd_seq,
            last_seen=row.last_seen,
            last_seq=row.last_seq,
            state=json.loads(row.state or "{}"),
            messages=messages,
        )

    def devices(self, group: str | None = None) -> list[DeviceInfo]:
        with self.db.session() as session:
            rows = session.execute(
                select(FleetMessageRow.device_id, func.count()).group_by(FleetMessageRow.device_id)
            )
            counts = {str(r[0]): int(r[1]) for r in rows}
            query = select(DeviceRow).order_by(DeviceRow.group, DeviceRow.device_id)
            if group is not None:
                query = query.where(DeviceRow.group == group)
            return [self._info(row, counts.get(row.device_id, 0)) for row in session.scalars(query)]

    def device(self, device_id: str) -> DeviceInfo:
        with self.db.session() as session:
            row = session.get(DeviceRow, device_id)
            if row is None:
                raise NotFoundError(f"no device {device_id!r} has reported to this hub")
            count = session.scalar(
                select(func.count())
                .select_from(FleetMessageRow)
                .where(FleetMessageRow.device_id == device_id)
            )
            return self._info(row, int(count or 0))

    def messages(self, device_id: str, limit: int = 50, kind: str | None = None) -> list[StoredMessage]:
        """The device's newest messages first (by seq)."""
        m, w = MESSAGES, WINDOWS
        query = (
            select(m.c.device_id, m.c.seq, m.c.kind, m.c.ts, m.c.received, func.coalesce(m.c.body, w.c.body))
            .select_from(m.outerjoin(w, and_(w.c.device_id == m.c.device_id, w.c.seq == m.c.seq)))
            .where(m.c.device_id == device_id)
        )
        if kind is not None:
            query = query.where(m.c.kind == kind)
        with self.db.session() as session:
            rows = session.execute(query.order_by(m.c.seq.desc()).limit(limit))
            return [
                StoredMessage(dev, seq, k, ts, received, json.loads(body) if body is not None else {})
                for dev, seq, k, ts, received, body in rows
            ]

    # -- windows and alerts (hub.fleet.ledger) ------------------------------------------------

    def windows(
        self,
        kind: str,
        model: str,
        version: int,
        since: float,
        until: float,
        group: str | None = None,
        limit: int | None = None,
    ) -> list[ledger.Window]:
        """The model version's windows whose end is in (since, until], oldest first."""
        with self.db.session() as session:
            return ledger.select_windows(session, kind, model, version, since, until, group, limit)

    def count_windows(
        self, kind: str, model: str, version: int, since: float, until: float, group: str | None = None
    ) -> int:
        with self.db.session() as session:
            return ledger.count_windows(session, kind, model, version, since, until, group)

    def latest_windows(
        self, kind: str, model: str, version: int, since: float, until: float, group: str | None = None
    ) -> list[ledger.Window]:
        """Each device's latest window in the range (by window start)."""
        with self.db.session() as session:
            return ledger.latest_windows(session, kind, model, version, since, until, group)

    def alerts(
        self,
        since: datetime | None = None,
        kind: str | None = None,
        model: str | None = None,
        version: int | None = None,
        device_id: str | None = None,
        limit: int = 200,
    ) -> list[ledger.Alert]:
        """Alerts last seen at or after `since`, the most recently seen first."""
        with self.db.session() as session:
            return ledger.select_alerts(session, since, kind, model, version, device_id, limit)
