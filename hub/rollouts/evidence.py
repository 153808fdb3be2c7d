"""What the controller judges, read from the fleet's tables (hub.fleet.ledger, hub.fleet.store):

- the candidate's and the stable version's summary windows in the rollout's group received
  since the step started (and the stable's since the rollout started), summed with the fleet's
  own `sum_windows` and `derived` (so the p95 is the one `outpost fleet summary` shows);
- the group's devices whose retained state says they serve the candidate;
- critical `rollback` alerts (a device fell back: verify, load, probation or crash loop) on
  the candidate from the group's devices first seen since the rollout started, one per device;
- `drift` alerts on the candidate from the group's devices last seen since the rollout started.

Times are the hub's clock (`received`, `first_seen`, `last_seen`), like the rollout's own, so
a device's clock being off does not move a window in or out of a step.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from hub.fleet import aggregate
from hub.fleet.alerts import CRITICAL, DRIFT, ROLLBACK
from hub.fleet.ledger import FleetAlertRow, FleetWindowRow
from hub.fleet.store import DeviceRow
from hub.registry import Database
from hub.rollouts.controller import Evidence, Sums
from hub.rollouts.store import Rollout

MAX_WINDOWS = 50_000  # per version and span; beyond, the newest are summed (and it says so)

Profiles = Callable[[str, int], Mapping[str, Any]]


def _group_devices(s: Session, group: str) -> dict[str, dict[str, Any]]:
    rows = s.execute(select(DeviceRow.device_id, DeviceRow.state).where(DeviceRow.group == group))
    return {str(d): json.loads(state or "{}") for d, state in rows}


def version_sums(
    s: Session, group: str, model: str, version: int, since: datetime, profile: Mapping[str, Any]
) -> Sums:
    rows = s.execute(
        select(FleetWindowRow.device_id, FleetWindowRow.seq, FleetWindowRow.body)
        .where(
            FleetWindowRow.kind == "summary",
            FleetWindowRow.group == group,
            FleetWindowRow.model == model,
            FleetWindowRow.version == version,
            FleetWindowRow.received >= since,
        )
        .order_by(FleetWindowRow.received.desc())
        .limit(MAX_WINDOWS)
    ).all()
    total = aggregate.sum_windows(((str(d), int(q), json.loads(b)) for d, q, b in rows), profile)
    if total.window is None:
        return Sums()
    latency = aggregate.derived(total.window)["latency_ms"] or {}
    return Sums(
        requests=int(total.window["requests"]),
        errors=int(total.window["errors"]),
        p95_ms=latency.get("p95"),
        devices=len(total.devices),
    )


def gather(db: Database, rollout: Rollout, now: datetime, profiles: Profiles) -> Evidence:
    r = rollout
    cand_profile, stable_profile = profiles(r.model, r.candidate), profiles(r.model, r.stable)
    with db.session() as s:
        devices = _group_devices(s, r.group)
        on_candidate = sum(
            1
            for state in devices.values()
            if isinstance(state.get("versions"), dict) and state["versions"].get(r.model) == r.candidate
        )
        alerts = s.scalars(
            select(FleetAlertRow)
            .where(
                FleetAlertRow.model == r.model,
                FleetAlertRow.version == r.candidate,
                FleetAlertRow.kind.in_((ROLLBACK, DRIFT)),
                FleetAlertRow.last_seen >= r.started,
            )
            .order_by(FleetAlertRow.id)
        ).all()
        fallbacks: dict[str, dict[str, Any]] = {}
        drift: list[dict[str, Any]] = []
        for a in alerts:
            if a.device_id is None or a.device_id not in devices:
                continue
            if a.kind == ROLLBACK and a.severity == CRITICAL and a.first_seen >= r.started:
                found = json.loads(a.evidence or "{}")
                fallbacks.setdefault(
                    a.device_id,
                    {
                        "device_id": a.device_id,
                        "transition": found.get("transition"),
                        "reason": found.get("reason"),
                        "at": a.first_seen.isoformat(),
                    },
                )
            elif a.kind == DRIFT:
                drift.append({"device_id": a.device_id, "message": a.message, "at": a.last_seen.isoformat()})
        return Evidence(
            candidate=version_sums(s, r.group, r.model, r.candidate, r.step_started, cand_profile),
            stable=version_sums(s, r.group, r.model, r.stable, r.step_started, stable_profile),
            stable_rollout=version_sums(s, r.group, r.model, r.stable, r.started, stable_profile),
            step_seconds=max(0.0, (now - r.step_started).total_seconds()),
            candidate_devices=on_candidate,
            fallbacks=tuple(fallbacks.values()),
            drift_alerts=tuple(drift),
        )
