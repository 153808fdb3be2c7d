"""The alerting tables, on the registry's database (own DeclarativeBase, made by hub.migrations
as hub.fleet's and hub.rollouts' are; SQLite and PostgreSQL).

    alert_notices     id, key UNIQUE ("<source>:<ref>"), source (fleet | rollout | offline | test),
                      ref (the source's own id: a fleet_alerts key, a rollout decision id,
                      "<device>@<last_seen>"), kind, severity, status (firing | resolved),
                      resolves (the key of the notice a resolution ends), open (an offline notice
                      not resolved yet), title, text, model, version, group, device, started,
                      ended, link, details (JSON), created (hub clock)
    alert_deliveries  id, notice_key, webhook, UNIQUE(notice_key, webhook), state (pending |
                      sending | delivered | failed), attempts, created, next_attempt, claim (the
                      claimer's random token while sending), lease_until, last_error, last_status,
                      delivered_at

Exactly one delivery row per notice and webhook (insert ... on conflict do nothing), whoever
queues it. A delivery is sent by whoever claims it: `UPDATE ... SET state = 'sending', claim = T,
lease_until = now + lease WHERE id = ? AND (state = 'pending' AND next_attempt <= now OR
state = 'sending' AND lease_until < now)`; only the one whose UPDATE changed the row sends, so two
hub processes on one database never both send it. Its result is written only under the same claim
(`WHERE claim = T`). A claimer that dies mid-send leaves a lease that expires: the delivery is sent
again after it (at least once). The lease is several times the request timeout, so a live sender
always finishes first.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    and_,
    exists,
    or_,
    select,
    update,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, aliased, mapped_column

from hub.alerting.payloads import FIRING, TEST, Notice
from hub.alerting.retry import Step
from hub.registry.db import UTCDateTime, insert_ignore

PENDING, SENDING, DELIVERED, FAILED = "pending", "sending", "delivered", "failed"
STATES = (PENDING, SENDING, DELIVERED, FAILED)


class AlertingBase(DeclarativeBase):
    """The alerting tables; the registry's, fleet's and rollouts' are not touched."""


class NoticeRow(AlertingBase):
    __tablename__ = "alert_notices"
    __table_args__ = (Index("ix_alert_notices_source", "source", "ref"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    key: Mapped[str] = mapped_column(String(600), unique=True)
    source: Mapped[str] = mapped_column(String(16))
    ref: Mapped[str] = mapped_column(String(580))
    kind: Mapped[str] = mapped_column(String(32))
    severity: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default=FIRING)
    resolves: Mapped[str | None] = mapped_column(String(600))
    open: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    title: Mapped[str] = mapped_column(Text)
    text: Mapped[str] = mapped_column(Text)
    model: Mapped[str | None] = mapped_column(String(128))
    version: Mapped[int | None] = mapped_column(BigInteger)
    group: Mapped[str | None] = mapped_column(String(128))
    device: Mapped[str | None] = mapped_column(String(128))
    started: Mapped[datetime] = mapped_column(UTCDateTime())
    ended: Mapped[datetime | None] = mapped_column(UTCDateTime())
    link: Mapped[str] = mapped_column(Text)
    details: Mapped[str] = mapped_column(Text, default="{}")
    created: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)


class DeliveryRow(AlertingBase):
    __tablename__ = "alert_deliveries"
    __table_args__ = (
        UniqueConstraint("notice_key", "webhook", name="uq_alert_deliveries_notice_webhook"),
        Index("ix_alert_deliveries_due", "state", "next_attempt"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    notice_key: Mapped[str] = mapped_column(String(600))
    webhook: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default=PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created: Mapped[datetime] = mapped_column(UTCDateTime())
    next_attempt: Mapped[datetime] = mapped_column(UTCDateTime())
    claim: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_error: Mapped[str] = mapped_column(Text, default="")
    last_status: Mapped[int | None] = mapped_column(Integer)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


# -- notices ------------------------------------------------------------------------------------


def add_notice(
    session: Session, n: Notice, source: str, ref: str, now: datetime, *, open_: bool = False
) -> bool:
    """Record a notice under the key `n.id` (= "<source>:<ref>"); False if it is there already."""
    return insert_ignore(
        session,
        NoticeRow,
        {
            "key": n.id,
            "source": source,
            "ref": ref,
            "kind": n.kind,
            "severity": n.severity,
            "status": n.status,
            "resolves": n.details.get("resolves"),
            "open": open_,
            "title": n.title,
            "text": n.text,
            "model": n.model,
            "version": n.version,
            "group": n.group,
            "device": n.device,
            "started": n.started,
            "ended": n.ended,
            "link": n.link,
            "details": json.dumps(dict(n.details), sort_keys=True, default=str),
            "created": now,
        },
    )


def to_notice(r: NoticeRow) -> Notice:
    return Notice(
        id=r.key,
        kind=r.kind,
        severity=r.severity,
        title=r.title,
        text=r.text,
        started=r.started,
        link=r.link,
        status=r.status,
        model=r.model,
        version=r.version,
        group=r.group,
        device=r.device,
        ended=r.ended,
        details=json.loads(r.details or "{}"),
    )


def known_refs(session: Session, source: str, refs: Sequence[str]) -> set[str]:
    if not refs:
        return set()
    rows = session.scalars(select(NoticeRow.ref).where(NoticeRow.source == source, NoticeRow.ref.in_(refs)))
    return set(rows)


def close_notice(session: Session, key: str) -> bool:
    """Mark an open notice resolved; True for the one caller that changed it."""
    result: Any = session.execute(
        update(NoticeRow).where(NoticeRow.key == key, NoticeRow.open.is_(True)).values(open=False)
    )
    return int(result.rowcount or 0) == 1


# -- deliveries ---------------------------------------------------------------------------------


def enqueue(
    session: Session, webhook: str, severities: Sequence[str], since: datetime, now: datetime, limit: int
) -> int:
    """Queue a delivery to `webhook` for every notice created since `since` at one of `severities`
    that has none yet (test notices are queued only by hand); at most `limit`. The number queued."""
    missing = (
        select(NoticeRow.key)
        .where(
            NoticeRow.created >= since,
            NoticeRow.severity.in_(list(severities)),
            NoticeRow.kind != TEST,
            ~exists().where(and_(DeliveryRow.notice_key == NoticeRow.key, DeliveryRow.webhook == webhook)),
        )
        .order_by(NoticeRow.id)
        .limit(limit)
    )
    queued = 0
    for key in list(session.scalars(missing)):
        queued += add_delivery(session, key, webhook, now)
    return queued


def add_delivery(session: Session, notice_key: str, webhook: str, now: datetime) -> bool:
    values = {"notice_key": notice_key, "webhook": webhook, "state": PENDING, "attempts": 0}
    values |= {"created": now, "next_attempt": now, "last_error": ""}
    return insert_ignore(session, DeliveryRow, values)


def due(session: Session, webhooks: Sequence[str], now: datetime, limit: int) -> list[int]:
    """Deliveries to these webhooks that may be claimed now, the oldest first. A resolution waits
    while the alert it resolves is still on its way to the same webhook (or the receiver would
    hear "resolved" before "firing")."""
    if not webhooks:
        return []
    firing = aliased(DeliveryRow)
    resolves_unsent = exists().where(
        NoticeRow.key == DeliveryRow.notice_key,
        NoticeRow.resolves.is_not(None),
        firing.notice_key == NoticeRow.resolves,
        firing.webhook == DeliveryRow.webhook,
        firing.state.in_([PENDING, SENDING]),
    )
    query = (
        select(DeliveryRow.id)
        .where(
            DeliveryRow.webhook.in_(list(webhooks)),
            or_(
                and_(DeliveryRow.state == PENDING, DeliveryRow.next_attempt <= now),
                and_(DeliveryRow.state == SENDING, DeliveryRow.lease_until < now),
            ),
            ~resolves_unsent,
        )
        .order_by(DeliveryRow.next_attempt, DeliveryRow.id)
        .limit(limit)
    )
    return list(session.scalars(query))


def claim(session: Session, delivery_id: int, token: str, now: datetime, lease_s: float) -> bool:
    """Take a due delivery for sending (attempts + 1); True only for the one claimer that did."""
    result: Any = session.execute(
        update(DeliveryRow)
        .where(
            DeliveryRow.id == delivery_id,
            or_(
                and_(DeliveryRow.state == PENDING, DeliveryRow.next_attempt <= now),
                and_(DeliveryRow.state == SENDING, DeliveryRow.lease_until < now),
            ),
        )
        .values(
            state=SENDING,
            claim=token,
            lease_until=now + timedelta(seconds=lease_s),
            attempts=DeliveryRow.attempts + 1,
        )
    )
    return int(result.rowcount or 0) == 1


def finish(
    session: Session, delivery_id: int, token: str, step: Step, status: int | None, now: datetime
) -> bool:
    """Record an attempt's result under the claim it was made with; False if the claim was lost."""
    values: dict[str, Any] = {"state": step.state, "claim": None, "lease_until": None, "last_status": status}
    if step.state == DELIVERED:
        values["delivered_at"] = now
    else:
        values["last_error"] = step.error[:2000]
    if step.state == PENDING:
        values["next_attempt"] = now + timedelta(seconds=step.delay_s)
    result: Any = session.execute(
        update(DeliveryRow).where(DeliveryRow.id == delivery_id, DeliveryRow.claim == token).values(**values)
    )
    return int(result.rowcount or 0) == 1


@dataclass(frozen=True)
class Delivery:
    id: int
    notice_key: str
    webhook: str
    state: str
    attempts: int
    created: datetime
    next_attempt: datetime
    last_error: str
    last_status: int | None
    delivered_at: datetime | None
    kind: str | None = None
    severity: str | None = None
    title: str | None = None
    link: str | None = None

    def to_json(self) -> dict[str, Any]:
        def iso(t: datetime | None) -> str | None:
            return t.isoformat() if t is not None else None

        return {
            "id": self.id,
            "alert": self.notice_key,
            "webhook": self.webhook,
            "state": self.state,
            "attempts": self.attempts,
            "created": iso(self.created),
            "next_attempt": iso(self.next_attempt) if self.state in (PENDING, SENDING) else None,
            "last_error": self.last_error or None,
            "last_status": self.last_status,
            "delivered_at": iso(self.delivered_at),
            "kind": self.kind,
            "severity": self.severity,
            "title": self.title,
            "link": self.link,
        }


def select_deliveries(
    session: Session,
    webhook: str | None = None,
    state: str | None = None,
    alert: str | None = None,
    limit: int = 100,
) -> list[Delivery]:
    """Deliveries, the newest first, with their notice's kind, severity, title and link."""
    query = select(DeliveryRow, NoticeRow).outerjoin(NoticeRow, NoticeRow.key == DeliveryRow.notice_key)
    if webhook is not None:
        query = query.where(DeliveryRow.webhook == webhook)
    if state is not None:
        query = query.where(DeliveryRow.state == state)
    if alert is not None:
        query = query.where(DeliveryRow.notice_key == alert)
    query = query.order_by(DeliveryRow.id.desc()).limit(limit)
    found = []
    for d, n in session.execute(query):
        found.append(
            Delivery(
                d.id, d.notice_key, d.webhook, d.state, d.attempts, d.created, d.next_attempt,
                d.last_error, d.last_status, d.delivered_at,
                n.kind if n else None, n.severity if n else None, n.title if n else None,
                n.link if n else None,
            )
        )  # fmt: skip
    return found


def get_notice(session: Session, key: str) -> Notice | None:
    row = session.scalar(select(NoticeRow).where(NoticeRow.key == key))
    return None if row is None else to_notice(row)
