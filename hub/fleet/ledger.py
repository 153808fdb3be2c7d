"""The fleet's windows and alerts: what aggregation and alerting read, kept by age.

    fleet_windows   id, device_id, seq, kind (summary | drift), group, model, version,
                    window_start, window_end (the device's clock, epoch seconds), received
                    (hub clock), requests, errors, n_rows (summary; 0 for drift), alert (drift:
                    the device's alert level; NULL for summary), body (JSON text: the
                    message's only copy, fleet_messages.body is NULL for it);
                    UNIQUE(device_id, seq); indexed by (model, version, kind, window_end) for
                    range queries and (device_id, model, version, kind, window_start) for runs
    fleet_alerts    id, key UNIQUE (see hub.fleet.alerts), kind, severity, device_id NULL (fleet),
                    model, version, first_seen, last_seen (hub clock), run_first, run_last (the
                    window starts or buckets the alert covers), count (messages that raised or
                    renewed it), message, evidence (JSON text)

Written by `FleetStore.apply` in the transaction that stores the message: a window is indexed
when its message is first seen (deduplicated by (device_id, seq) on its own, so a late message
that the per-device retention of `fleet_messages` already passed still counts here), and
alerts are raised only for windows and events seen for the first time. The columns let a fleet
sum select its windows without reading any JSON; the error-rate rule reads its bucket's running
sums instead (hub.fleet.buckets: one row, not every device's windows).

An event is looked at only when fleet_messages stores it (new, and newer than the device's
retained messages): an event older than the newest `keep_per_device` raises no alert.

Retention is by age (hub clock): windows received, and alerts last seen, before the cutoff are
deleted (`expire_windows`, which returns what hub.fleet.buckets takes out of its sums, and
`expire_alerts`). A window in a range of time is one whose end is in (since, until], so
adjacent ranges partition the windows.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeGuard, cast

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
    delete,
    func,
    select,
    update,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from hub.fleet.alerts import (
    CRITICAL,
    DRIFT,
    ERROR_RATE,
    INFO,
    WARNING,
    AlertDraft,
    AlertRules,
    drift_alert,
    error_bucket,
    error_rate_alert,
    error_rate_exceeded,
    update_event_alert,
)
from hub.fleet.rules import MAX_ID_LEN, TelemetryMsg
from hub.registry.db import UTCDateTime, insert_ignore

WINDOW_KINDS = frozenset({"summary", "drift"})
MAX_COUNT = 2**63 - 1
_SEVERITY = {INFO: 0, WARNING: 1, CRITICAL: 2}


class FleetBase(DeclarativeBase):
    """Every fleet table (these and hub.fleet.store's); the registry's tables are not touched."""


class FleetWindowRow(FleetBase):
    __tablename__ = "fleet_windows"
    __table_args__ = (
        UniqueConstraint("device_id", "seq", name="uq_fleet_windows_device_seq"),
        Index("ix_fleet_windows_range", "model", "version", "kind", "window_end"),
        Index("ix_fleet_windows_run", "device_id", "model", "version", "kind", "window_start"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    device_id: Mapped[str] = mapped_column(String(128))
    seq: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(16))
    group: Mapped[str] = mapped_column(String(128))
    model: Mapped[str] = mapped_column(String(128))
    version: Mapped[int] = mapped_column(BigInteger)
    window_start: Mapped[float] = mapped_column(Float)
    window_end: Mapped[float] = mapped_column(Float)
    received: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    errors: Mapped[int] = mapped_column(BigInteger, default=0)
    n_rows: Mapped[int] = mapped_column(BigInteger, default=0)
    alert: Mapped[bool | None] = mapped_column(Boolean)
    body: Mapped[str] = mapped_column(Text)


class FleetAlertRow(FleetBase):
    __tablename__ = "fleet_alerts"
    __table_args__ = (Index("ix_fleet_alerts_find", "kind", "model", "version", "device_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    key: Mapped[str] = mapped_column(String(512), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    severity: Mapped[str] = mapped_column(String(16))
    device_id: Mapped[str | None] = mapped_column(String(128))
    model: Mapped[str | None] = mapped_column(String(128))
    version: Mapped[int | None] = mapped_column(BigInteger)
    first_seen: Mapped[datetime] = mapped_column(UTCDateTime())
    last_seen: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    run_first: Mapped[float | None] = mapped_column(Float)
    run_last: Mapped[float | None] = mapped_column(Float)
    count: Mapped[int] = mapped_column(Integer, default=1)
    message: Mapped[str] = mapped_column(Text)
    evidence: Mapped[str] = mapped_column(Text, default="{}")


# -- writes -------------------------------------------------------------------------------------


def _count(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        return None
    return value


def _finite(value: Any) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def window_values(
    msg: TelemetryMsg, now: datetime | None, text: str | None = None
) -> dict[str, Any] | None:
    """The fleet_windows row of a summary or drift message; None when the body cannot be
    indexed (no model, version or times: the message is still kept in fleet_messages).
    `now`: its `received` (None: the caller sets it); `text`: the body's JSON text
    (`body_text`), when the caller has it already."""
    body = msg.body
    model, version = body.get("model"), body.get("version")
    start, end = body.get("start"), body.get("end")
    if not isinstance(model, str) or not model or len(model) > MAX_ID_LEN:
        return None
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_COUNT:
        return None
    if not (_finite(start) and _finite(end)):
        return None
    counts = {k: _count(body, k) for k in ("requests", "errors", "rows")}
    if msg.kind == "summary" and any(v is None for v in counts.values()):
        return None
    return {
        "device_id": msg.device_id,
        "seq": msg.seq,
        "kind": msg.kind,
        "group": msg.group,
        "model": model,
        "version": version,
        "window_start": float(start),
        "window_end": float(end),
        "received": now,
        "requests": (counts["requests"] or 0) if msg.kind == "summary" else 0,
        "errors": (counts["errors"] or 0) if msg.kind == "summary" else 0,
        "n_rows": counts["rows"] or 0,
        "alert": (body.get("alert") is True) if msg.kind == "drift" else None,
        "body": body_text(msg) if text is None else text,
    }


def body_text(msg: TelemetryMsg) -> str:
    """The JSON text a message's body is stored as: as the device sent it when that was strict
    JSON (hub.fleet.rules), else encoded here."""
    return msg.text if msg.text is not None else json.dumps(msg.body, sort_keys=True)


def window_alerts(
    session: Session,
    values: dict[str, Any],
    body: dict[str, Any] | None,
    now: datetime,
    rules: AlertRules,
    rates: set[tuple[str, int, float]],
) -> int:
    """The alerts a window indexed just now raises or renews (its row `values` is stored). A
    summary's fleet error-rate check is left for `check_error_rates` after the batch, once per
    (model, version, bucket): `rates` gets the bucket's key. `body`: the
    message's body; only a drift window whose `alert` is on reads it (the others may pass None)."""
    if values["kind"] == "drift":
        if not values["alert"] or body is None:
            return 0
        draft = drift_alert(values["device_id"], values["seq"], body)
        return int(draft is not None and _drift_run(session, values, draft, now))
    bucket = error_bucket(values["window_end"], rules.error_window_s)
    rates.add((values["model"], values["version"], bucket))
    return 0


def check_error_rates(
    session: Session,
    sums: Mapping[tuple[str, int, float], tuple[int, int]],
    rules: AlertRules,
    now: datetime,
) -> int:
    """The fleet error-rate checks of a batch's (model, version, bucket) keys, given each
    bucket's (requests, errors) over all its summary windows (hub.fleet.buckets keeps them):
    alerts raised or renewed."""
    return sum(int(_error_rate(session, key, *sums[key], rules, now)) for key in sorted(sums))


def record_event(session: Session, msg: TelemetryMsg, now: datetime) -> int:
    """The alert an event seen for the first time raises (0 or 1)."""
    draft = update_event_alert(msg.device_id, msg.seq, msg.body)
    if draft is None:
        return 0
    at = msg.body.get("at")
    point = float(at) if _finite(at) else msg.ts
    existing = session.scalar(select(FleetAlertRow).where(FleetAlertRow.key == draft.key))
    return int(_raise(session, draft, now, point, existing))


def _drift_run(session: Session, w: dict[str, Any], draft: AlertDraft, now: datetime) -> bool:
    """Renew the alert of the run this window belongs to, or raise one for a new run."""
    base = (
        FleetWindowRow.device_id == w["device_id"],
        FleetWindowRow.model == w["model"],
        FleetWindowRow.version == w["version"],
        FleetWindowRow.kind == DRIFT,
        FleetWindowRow.alert.is_(False),
    )
    start = w["window_start"]
    before = session.scalar(
        select(func.max(FleetWindowRow.window_start)).where(*base).where(FleetWindowRow.window_start < start)
    )
    after = session.scalar(
        select(func.min(FleetWindowRow.window_start)).where(*base).where(FleetWindowRow.window_start > start)
    )
    query = select(FleetAlertRow).where(
        FleetAlertRow.kind == DRIFT,
        FleetAlertRow.device_id == w["device_id"],
        FleetAlertRow.model == w["model"],
        FleetAlertRow.version == w["version"],
    )
    if after is not None:
        query = query.where(FleetAlertRow.run_first < after)
    if before is not None:
        query = query.where(FleetAlertRow.run_last > before)
    existing = session.scalar(query.order_by(FleetAlertRow.id).limit(1))
    return _raise(session, draft, now, start, existing)


def _error_rate(
    session: Session,
    key: tuple[str, int, float],
    requests: int,
    errors: int,
    rules: AlertRules,
    now: datetime,
) -> bool:
    model, version, bucket = key
    size = rules.error_window_s
    if not error_rate_exceeded(requests, errors, rules):
        return False
    # The devices are only the alert's evidence: counted when it is raised or renewed.
    devices = session.scalar(
        select(func.count(func.distinct(FleetWindowRow.device_id))).where(
            FleetWindowRow.model == model,
            FleetWindowRow.version == version,
            FleetWindowRow.kind == "summary",
            FleetWindowRow.window_end >= bucket,
            FleetWindowRow.window_end < bucket + size,
        )
    )
    draft = error_rate_alert(model, version, bucket, requests, errors, int(devices or 0), rules)
    if draft is None:  # pragma: no cover - error_rate_exceeded said it is over
        return False
    existing = session.scalar(
        select(FleetAlertRow)
        .where(
            FleetAlertRow.kind == ERROR_RATE,
            FleetAlertRow.device_id.is_(None),
            FleetAlertRow.model == model,
            FleetAlertRow.version == version,
            FleetAlertRow.run_last >= bucket - size,
            FleetAlertRow.run_first <= bucket + size,
        )
        .order_by(FleetAlertRow.id)
        .limit(1)
    )
    return _raise(session, draft, now, bucket, existing)


def _raise(
    session: Session, draft: AlertDraft, now: datetime, point: float | None, existing: FleetAlertRow | None
) -> bool:
    if existing is None:
        values = {
            "key": draft.key,
            "kind": draft.kind,
            "severity": draft.severity,
            "device_id": draft.device_id,
            "model": draft.model,
            "version": draft.version,
            "first_seen": now,
            "last_seen": now,
            "run_first": point,
            "run_last": point,
            "count": 1,
            "message": draft.message,
            "evidence": json.dumps(draft.evidence, sort_keys=True),
        }
        if insert_ignore(session, FleetAlertRow, values):
            return True
        # Another hub worker raised the same key a moment ago: renew it instead.
        existing = session.scalar(select(FleetAlertRow).where(FleetAlertRow.key == draft.key))
        if existing is None:  # pragma: no cover - deleted by retention in between
            return False
    existing.last_seen = max(existing.last_seen, now)
    existing.count += 1
    if _SEVERITY.get(draft.severity, 0) > _SEVERITY.get(existing.severity, 0):
        existing.severity = draft.severity
    newest = point is None or existing.run_last is None or point >= existing.run_last
    if point is not None:
        existing.run_first = point if existing.run_first is None else min(existing.run_first, point)
        existing.run_last = point if existing.run_last is None else max(existing.run_last, point)
    if newest:  # the evidence of the latest window or bucket, not of one that arrived late
        existing.message = draft.message
        existing.evidence = json.dumps(draft.evidence, sort_keys=True)
    return True


def expire_windows(session: Session, cutoff: datetime, messages: Table | None = None) -> list[Any]:
    """Delete the windows received before `cutoff`; each one's (kind, model, version, window_end,
    requests, errors), from RETURNING (hub.fleet.buckets takes them out of its sums: a window
    two writers expire at once is returned to one of them). `messages` (hub.fleet.store's
    fleet_messages): first copy the bodies of the windows going to the messages that hold
    theirs in the window (body NULL) and outlive it."""
    w = cast(Table, FleetWindowRow.__table__)
    if messages is not None:
        session.execute(
            update(messages)
            .values(body=w.c.body)
            .where(
                w.c.received < cutoff,
                messages.c.body.is_(None),
                messages.c.device_id == w.c.device_id,
                messages.c.seq == w.c.seq,
            )
        )
    gone = session.execute(
        delete(w)
        .where(w.c.received < cutoff)
        .returning(w.c.kind, w.c.model, w.c.version, w.c.window_end, w.c.requests, w.c.errors)
    )
    return list(gone)


def expire_alerts(session: Session, cutoff: datetime) -> int:
    """Delete the alerts last seen before `cutoff`; the number deleted."""
    alerts: Any = session.execute(delete(FleetAlertRow).where(FleetAlertRow.last_seen < cutoff))
    return int(alerts.rowcount or 0)


# -- reads --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    device_id: str
    seq: int
    group: str
    start: float
    end: float
    body: dict[str, Any]


@dataclass(frozen=True)
class Alert:
    id: int
    kind: str
    severity: str
    device_id: str | None
    model: str | None
    version: int | None
    first_seen: datetime
    last_seen: datetime
    count: int
    message: str
    evidence: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "severity": self.severity,
            "device_id": self.device_id,
            "model": self.model,
            "version": self.version,
            "first_seen": self.first_seen.isoformat(),
            "last_seen": self.last_seen.isoformat(),
            "count": self.count,
            "message": self.message,
            "evidence": self.evidence,
        }


def _window(r: FleetWindowRow) -> Window:
    return Window(r.device_id, r.seq, r.group, r.window_start, r.window_end, json.loads(r.body))


def _range(kind: str, model: str, version: int, since: float, until: float, group: str | None) -> Any:
    clauses = [
        FleetWindowRow.model == model,
        FleetWindowRow.version == version,
        FleetWindowRow.kind == kind,
        FleetWindowRow.window_end > since,
        FleetWindowRow.window_end <= until,
    ]
    if group is not None:
        clauses.append(FleetWindowRow.group == group)
    return clauses


def select_windows(
    session: Session,
    kind: str,
    model: str,
    version: int,
    since: float,
    until: float,
    group: str | None = None,
    limit: int | None = None,
) -> list[Window]:
    """The windows whose end is in (since, until], oldest first; at most `limit`."""
    query = (
        select(FleetWindowRow)
        .where(*_range(kind, model, version, since, until, group))
        .order_by(FleetWindowRow.window_end, FleetWindowRow.device_id, FleetWindowRow.seq)
    )
    if limit is not None:
        query = query.limit(limit)
    return [_window(r) for r in session.scalars(query)]


def count_windows(
    session: Session, kind: str, model: str, version: int, since: float, until: float, group: str | None
) -> int:
    query = select(func.count()).select_from(FleetWindowRow)
    return int(session.scalar(query.where(*_range(kind, model, version, since, until, group))) or 0)


def latest_windows(
    session: Session, kind: str, model: str, version: int, since: float, until: float, group: str | None
) -> list[Window]:
    """Each device's latest window (by start) in the range, by device id."""
    light = session.execute(
        select(FleetWindowRow.id, FleetWindowRow.device_id, FleetWindowRow.window_start).where(
            *_range(kind, model, version, since, until, group)
        )
    )
    best: dict[str, tuple[float, int]] = {}
    for row_id, device_id, start in light:
        if device_id not in best or (start, row_id) > best[device_id]:
            best[device_id] = (start, row_id)
    ids = [row_id for _start, row_id in best.values()]
    if not ids:
        return []
    rows = session.scalars(select(FleetWindowRow).where(FleetWindowRow.id.in_(ids)))
    return sorted((_window(r) for r in rows), key=lambda w: w.device_id)


def select_alerts(
    session: Session,
    since: datetime | None = None,
    kind: str | None = None,
    model: str | None = None,
    version: int | None = None,
    device_id: str | None = None,
    limit: int = 200,
) -> list[Alert]:
    """Alerts last seen at or after `since`, the most recently seen first."""
    query = select(FleetAlertRow)
    if since is not None:
        query = query.where(FleetAlertRow.last_seen >= since)
    for column, value in (
        (FleetAlertRow.kind, kind),
        (FleetAlertRow.model, model),
        (FleetAlertRow.version, version),
        (FleetAlertRow.device_id, device_id),
    ):
        if value is not None:
            query = query.where(column == value)
    query = query.order_by(FleetAlertRow.last_seen.desc(), FleetAlertRow.id.desc()).limit(limit)
    rows = session.scalars(query)
    return [
        Alert(
            r.id,
            r.kind,
            r.severity,
            r.device_id,
            r.model,
            r.version,
            r.first_seen,
            r.last_seen,
            r.count,
            r.message,
            json.loads(r.evidence or "{}"),
        )
        for r in rows
    ]
