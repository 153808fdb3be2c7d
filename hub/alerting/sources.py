"""Where notices come from: the hub's own tables, read in the dispatcher's transaction.

- `fleet`: every fleet_alerts row (hub.fleet.ledger: drift, error_rate, rollback, refused),
  once, when it is first raised. A drift run or error-rate episode renewed later is the same
  alert: it is not notified again.
  If it turns critical later (an error rate getting worse), it is notified once more as
  critical (`fleet_escalations`), so a pager taking only critical alerts hears of it.
- `rollout`: every `halt` decision of a rollout (hub.rollouts.store), once.
- `offline`: a device whose MQTT state says offline and whose last live message is older than
  `offline_after_s`: one notice per offline period (the device's birth/death sequence `bd_seq`
  names the period: a will and the birth after it carry the same one, the next session a new
  one), resolved by a second notice when the device is back online or in a new session.

Only what was raised within the last `since` (the dispatcher passes its retry age limit) is
looked at, so a hub started on an old database does not notify history. Each function adds at
most `limit` notices per call; the rest come on the next tick.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import String, and_, cast, exists, select
from sqlalchemy.orm import Session, aliased

from hub.alerting import store
from hub.alerting.payloads import DEVICE_OFFLINE, RESOLVED, ROLLOUT_HALTED, Notice, dashboard_link
from hub.alerting.store import NoticeRow
from hub.fleet.ledger import FleetAlertRow
from hub.fleet.store import DeviceRow
from hub.rollouts.store import DecisionRow, RolloutRow

FLEET, ROLLOUT, OFFLINE = "fleet", "rollout", "offline"
ESCALATED = "#critical"  # the ref suffix of a fleet alert's escalation to critical
CRITICAL = "critical"
_TITLES = {
    "drift": "Input drift",
    "error_rate": "Error rate over the threshold",
    "rollback": "Device rolled back",
    "refused": "Device refuses a version",
}


@dataclass(frozen=True)
class SourceConfig:
    public_url: str
    offline_after_s: float  # 0: no offline notices
    limit: int = 100


def _fleet_notice(r: FleetAlertRow, group: str | None, cfg: SourceConfig, evidence: str) -> Notice:
    title = _TITLES.get(r.kind, r.kind)
    if r.kind == "rollback" and r.severity == "critical":
        title = "Device fell back from a version"
    what = r.model + (f" v{r.version}" if r.version is not None else "") if r.model else None
    about = " ".join(p for p in (what, f"on {r.device_id}" if r.device_id else None) if p)
    return Notice(
        id=f"{FLEET}:{r.key}",
        kind=r.kind,
        severity=r.severity,
        title=f"{title}: {about}" if about else title,
        text=r.message,
        started=r.first_seen,
        link=dashboard_link(cfg.public_url, r.kind, r.model, r.version),
        model=r.model,
        version=r.version,
        group=group,
        device=r.device_id,
        details={"fleet_alert": r.id, "count": r.count, "evidence": json.loads(evidence or "{}")},
    )


def fleet_alerts(session: Session, since: datetime, now: datetime, cfg: SourceConfig) -> int:
    noticed = exists().where(and_(NoticeRow.source == FLEET, NoticeRow.ref == FleetAlertRow.key))
    query = (
        select(FleetAlertRow, DeviceRow.group)
        .outerjoin(DeviceRow, DeviceRow.device_id == FleetAlertRow.device_id)
        # last_seen >= first_seen: the condition on it lets the query use its index
        .where(FleetAlertRow.last_seen >= since, FleetAlertRow.first_seen >= since, ~noticed)
        .order_by(FleetAlertRow.id)
        .limit(cfg.limit)
    )
    added = 0
    for row, group in session.execute(query):
        added += store.add_notice(session, _fleet_notice(row, group, cfg, row.evidence), FLEET, row.key, now)
    return added


def fleet_escalations(session: Session, since: datetime, now: datetime, cfg: SourceConfig) -> int:
    """A fleet alert that turned critical after it was notified at a lower severity (an error-rate
    episode getting worse) is notified once more, as critical: a pager that takes only critical
    alerts hears of it."""
    first = aliased(NoticeRow)
    again = exists().where(
        and_(NoticeRow.source == FLEET, NoticeRow.ref == FleetAlertRow.key.concat(ESCALATED))
    )
    query = (
        select(FleetAlertRow, DeviceRow.group)
        .join(first, and_(first.source == FLEET, first.ref == FleetAlertRow.key))
        .outerjoin(DeviceRow, DeviceRow.device_id == FleetAlertRow.device_id)
        .where(
            FleetAlertRow.last_seen >= since,
            FleetAlertRow.severity == CRITICAL,
            first.severity != CRITICAL,
            ~again,
        )
        .order_by(FleetAlertRow.id)
        .limit(cfg.limit)
    )
    added = 0
    for row, group in session.execute(query):
        n = _fleet_notice(row, group, cfg, row.evidence)
        n = replace(n, id=n.id + ESCALATED, title=f"Now critical: {n.title}")
        added += store.add_notice(session, n, FLEET, row.key + ESCALATED, now)
    return added


def rollout_halts(session: Session, since: datetime, now: datetime, cfg: SourceConfig) -> int:
    noticed = exists().where(and_(NoticeRow.source == ROLLOUT, NoticeRow.ref == cast(DecisionRow.id, String)))
    query = (
        select(DecisionRow, RolloutRow)
        .join(RolloutRow, RolloutRow.id == DecisionRow.rollout_id)
        .where(DecisionRow.action == "halt", DecisionRow.at >= since, ~noticed)
        .order_by(DecisionRow.id)
        .limit(cfg.limit)
    )
    added = 0
    for d, r in session.execute(query):
        n = Notice(
            id=f"{ROLLOUT}:{d.id}",
            kind=ROLLOUT_HALTED,
            severity="warning",
            title=f"Rollout halted: {r.model} v{r.candidate} in {r.group}",
            text=f"Rollout {r.id} of {r.model} v{r.stable} -> v{r.candidate} in group {r.group} was halted "
            f"at {d.percent}% by {d.actor}: {d.reason}. The group is back on v{r.stable}.",
            started=d.at,
            link=dashboard_link(cfg.public_url, ROLLOUT_HALTED, r.model),
            model=r.model,
            version=r.candidate,
            group=r.group,
            details={"rollout": r.id, "stable": r.stable, "candidate": r.candidate, "percent": d.percent,
                     "reason": d.reason},
        )  # fmt: skip
        added += store.add_notice(session, n, ROLLOUT, str(d.id), now)
    return added


def _offline_text(device: str, group: str, last_seen: datetime, now: datetime, after_s: float) -> str:
    minutes = (now - last_seen).total_seconds() / 60
    return (
        f"{device} (group {group}) has been offline since {last_seen:%Y-%m-%d %H:%M:%S}Z, "
        f"{minutes:.0f} min (threshold {after_s / 60:g} min)"
    )


def offline_devices(session: Session, since: datetime, now: datetime, cfg: SourceConfig) -> int:
    """Raise a notice per device offline past the threshold, once per period; resolve the open
    ones whose device came back. The number of notices added (raised or resolved)."""
    added = resolve_offline(session, now, cfg)
    if cfg.offline_after_s <= 0:
        return added
    cutoff = now - timedelta(seconds=cfg.offline_after_s)
    rows = session.scalars(
        select(DeviceRow)
        .where(
            DeviceRow.online.is_(False),
            DeviceRow.bd_seq.is_not(None),
            DeviceRow.last_seen.is_not(None),
            DeviceRow.last_seen <= cutoff,
            DeviceRow.last_seen >= since,
        )
        .order_by(DeviceRow.last_seen)
    ).all()
    refs = {f"{r.device_id}@{r.bd_seq}": r for r in rows}
    new = [ref for ref in refs if ref not in store.known_refs(session, OFFLINE, list(refs))][: cfg.limit]
    for ref in new:
        r = refs[ref]
        assert r.last_seen is not None
        n = Notice(
            id=f"{OFFLINE}:{ref}",
            kind=DEVICE_OFFLINE,
            severity="warning",
            title=f"Device offline: {r.device_id}",
            text=_offline_text(r.device_id, r.group, r.last_seen, now, cfg.offline_after_s),
            started=r.last_seen,
            link=dashboard_link(cfg.public_url, DEVICE_OFFLINE),
            group=r.group,
            device=r.device_id,
            details={"last_seen": r.last_seen.isoformat(), "offline_after_s": cfg.offline_after_s},
        )
        added += store.add_notice(session, n, OFFLINE, ref, now, open_=True)
    return added


def resolve_offline(session: Session, now: datetime, cfg: SourceConfig) -> int:
    """Resolve the open offline notices whose device is online again or in a newer session."""
    open_rows = session.scalars(
        select(NoticeRow).where(NoticeRow.source == OFFLINE, NoticeRow.open.is_(True)).limit(cfg.limit * 10)
    ).all()
    if not open_rows:
        return 0
    devices: Mapping[str, Any] = {
        d.device_id: d
        for d in session.scalars(
            select(DeviceRow).where(DeviceRow.device_id.in_([n.device for n in open_rows if n.device]))
        )
    }
    added = 0
    for n in open_rows:
        d = devices.get(n.device or "")
        back = d is None or d.online or f"{d.device_id}@{d.bd_seq}" != n.ref
        if not back or not store.close_notice(session, n.key):
            continue
        firing = store.to_notice(n)
        resolved = Notice(
            id=f"{n.key}:resolved",
            kind=DEVICE_OFFLINE,
            severity=n.severity,
            title=f"Device back online: {n.device}",
            text=f"{n.device} is back online (offline since {n.started:%Y-%m-%d %H:%M:%S}Z)"
            if d is not None
            else f"{n.device} is no longer known to the hub",
            started=firing.started,
            link=firing.link,
            status=RESOLVED,
            group=n.group,
            device=n.device,
            ended=now,
            details={"resolves": n.key},
        )
        added += store.add_notice(session, resolved, OFFLINE, f"{n.ref}:resolved", now)
    return added
