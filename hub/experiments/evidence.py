"""An experiment arm's totals, read from the fleet's summary windows (hub.fleet.ledger).

An arm is one model version's summary windows from the experiment's group received (hub clock)
since the experiment started and before it stopped, summed with the fleet's own `sum_windows`
(windows that do not fit the version's reference profile are left out and counted) and
`derived`. The hub's clock, as for rollouts, so a device's clock being off does not move a
window in or out.

Besides the ordinary figures a window may carry `"shadow": {"compared": n, "agreed": k}` (shadow
mode: the candidate's answers to copied requests compared with the stable version's); a missing
key or null counts as nothing (older agents). In shadow mode the candidate's requests, errors,
latency and labels are those of its shadow runs; in A/B mode both arms are ordinary windows of the
requests each answered.

When the experiment runs on part of the group (percent < 100), only the windows of devices in the
canary bucket count, in both arms: the stable version's windows from the devices outside it come
from other devices and other traffic, not from the randomized split.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from hub.fleet import aggregate
from hub.fleet.ledger import FleetWindowRow

MAX_WINDOWS = 100_000  # per arm; beyond, the newest are summed (and `truncated` says so)


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def shadow_counts(window: Mapping[str, Any]) -> tuple[int, int]:
    """(compared, agreed) of a window; (0, 0) without a well-formed `shadow`."""
    doc = window.get("shadow")
    if not isinstance(doc, dict):
        return 0, 0
    compared, agreed = _count(doc.get("compared")), _count(doc.get("agreed"))
    return (compared, agreed) if agreed <= compared else (0, 0)


def empty_arm(version: int) -> dict[str, Any]:
    return {
        "version": version,
        "windows": 0,
        "devices": 0,
        "requests": 0,
        "errors": 0,
        "error_rate": None,
        "labelled": 0,
        "correct": 0,
        "accuracy": None,
        "p95_ms": None,
        "shadow": {"compared": 0, "agreed": 0},
        "skipped": 0,
        "truncated": False,
    }


def arm_totals(
    s: Session,
    group: str,
    model: str,
    version: int,
    since: datetime,
    until: datetime | None,
    profile: Mapping[str, Any],
    device_ok: Callable[[str], bool] | None = None,
) -> dict[str, Any]:
    """One version's totals in the group over [since, until) (until None: up to now), from the
    devices `device_ok` accepts (None: every device)."""
    query = select(FleetWindowRow.device_id, FleetWindowRow.seq, FleetWindowRow.body).where(
        FleetWindowRow.kind == "summary",
        FleetWindowRow.group == group,
        FleetWindowRow.model == model,
        FleetWindowRow.version == version,
        FleetWindowRow.received >= since,
    )
    if until is not None:
        query = query.where(FleetWindowRow.received < until)
    rows = s.execute(query.order_by(FleetWindowRow.received.desc()).limit(MAX_WINDOWS)).all()
    bodies = [(str(d), int(q), json.loads(b)) for d, q, b in rows if device_ok is None or device_ok(str(d))]
    total = aggregate.sum_windows(bodies, profile)
    arm = empty_arm(version)
    arm["truncated"] = len(rows) >= MAX_WINDOWS
    arm["skipped"] = len(total.skipped)
    if total.window is None:
        return arm
    left_out = {(x["device_id"], x["seq"]) for x in total.skipped}
    compared = agreed = 0
    for device_id, seq, body in bodies:
        if (device_id, seq) not in left_out:
            c, a = shadow_counts(body)
            compared, agreed = compared + c, agreed + a
    figures = aggregate.derived(total.window)
    feedback = total.window.get("feedback") or {}
    classified = "correct" in feedback  # regression labels have no accuracy to compare
    arm.update(
        windows=sum(d["windows"] for d in total.devices.values()),
        devices=len(total.devices),
        requests=int(total.window["requests"]),
        errors=int(total.window["errors"]),
        error_rate=figures["error_rate"],
        labelled=int(feedback.get("labelled", 0)) if classified else 0,
        correct=int(feedback.get("correct", 0)) if classified else 0,
        accuracy=figures.get("accuracy") if classified else None,
        p95_ms=(figures["latency_ms"] or {}).get("p95"),
        shadow={"compared": compared, "agreed": agreed},
    )
    return arm
