"""What the dashboard reads from the hub: the registry, the fleet store and its queries.

Blocking (database) calls; the routes run them in the thread pool. Each function gathers one
page's data and hands it to the pure builders in hub.dashboard.views.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from sqlalchemy import select

from hub.dashboard import views
from hub.errors import NotFoundError
from hub.fleet.queries import TimeRange
from hub.registry.db import TokenRow

if TYPE_CHECKING:
    from hub.api.app import Hub

DEFAULT_RANGE = "24h"
ALERTS_SHOWN = 50
ROLLBACK_ALERTS = 1000  # counted per device on the fleet page (alerts are kept 30 days)
VERSIONS_SUMMED = 10
ROLLOUTS_SHOWN = 10  # the model page sums the fleet's windows for the newest versions only


def session_key(hub: Hub, name: str) -> str | None:
    """The stored SHA-256 of the live token `name` (the key its sessions are signed with)."""
    with hub.db.session() as s:
        row = s.scalar(select(TokenRow).where(TokenRow.name == name, TokenRow.revoked.is_(None)))
        return None if row is None else row.sha256


def fleet_page(hub: Hub) -> views.FleetView:
    devices = hub.fleet.devices()
    alerts = hub.fleet.alerts(limit=ALERTS_SHOWN)
    rollbacks = hub.fleet.alerts(kind="rollback", limit=ROLLBACK_ALERTS)
    return views.fleet_view(devices, alerts, datetime.now(UTC), rollbacks)


DELIVERIES_SHOWN = 10


def alert_deliveries(hub: Hub) -> dict[str, Any]:
    """For the fleet page: the configured webhooks and the newest alert deliveries that have not
    arrived (failed, or waiting for a retry), as the API gives them (hub.alerting)."""
    from hub.alerting.store import DELIVERED, select_deliveries

    with hub.db.session() as s:
        recent = select_deliveries(s, limit=200)
    waiting = [d.to_json() for d in recent if d.state != DELIVERED][:DELIVERIES_SHOWN]
    return {"webhooks": [w.name for w in hub.settings.webhooks], "undelivered": waiting}


def models_page(hub: Hub) -> list[tuple[str, list[int]]]:
    return [(m.name, list(m.versions)) for m in hub.registry.list_models()]


def rollouts_for_model(hub: Hub, model: str) -> list[views.RolloutView]:
    """The newest rollouts of `model` with their gate decisions (hub.rollouts), for the model page."""
    from hub.rollouts import get_rollout, list_rollouts

    found = list_rollouts(hub.db, model=model)[:ROLLOUTS_SHOWN]
    return [views.rollout_view(get_rollout(hub.db, int(r["id"]))) for r in found]


EXPERIMENTS_SHOWN = 20


def experiments_page(hub: Hub) -> list[dict[str, Any]]:
    """The newest experiments with their arms, tests and verdicts (hub.experiments, as the API's)."""
    from hub.api.experiments import thresholds
    from hub.experiments import experiments

    return experiments(hub.db, thresholds=thresholds(hub))[:EXPERIMENTS_SHOWN]


def model_page(hub: Hub, name: str) -> views.ModelView:
    hub.registry.get_model(name)  # NotFoundError (404) for an unknown model
    versions = hub.registry.list_versions(name)
    deployments = [g.deployment for g in hub.registry.list_groups() if g.deployment is not None]
    summaries: dict[int, dict[str, Any]] = {}
    for v in sorted((v.version for v in versions), reverse=True)[:VERSIONS_SUMMED]:
        summaries[v] = hub.fleet_queries.summary(name, v, since=DEFAULT_RANGE)
    return views.model_view(
        name,
        versions,
        deployments,
        hub.fleet.devices(),
        summaries,
        rollouts_for_model(hub, name),
        f"the last {DEFAULT_RANGE}",
    )


def capture_section(hub: Hub, name: str) -> dict[str, Any]:
    """The model page's data capture: each group's policy, and per version and group what was
    captured, with a CSV download (the dashboard's own route, authorised by the session)."""
    from hub.capture.cli import policy_text
    from hub.capture.queries import CaptureQueries

    doc = CaptureQueries(hub.db, hub.registry).listing(name)
    groups = [
        {
            "group": g["group"],
            "policy": policy_text(g["capture"]),
            "dropped": "{rate} / {size} / {full}".format(**g["dropped"]),
        }
        for g in doc["groups"]
    ]
    versions = [
        {
            **v,
            "first": (v["first_ts"] or "")[:19].replace("T", " "),
            "last": (v["last_ts"] or "")[:19].replace("T", " "),
            "over_limit": v["dropped"]["limit"],
            "csv": f"/models/{quote(name, safe='')}/versions/{v['version']}/capture.csv"
            f"?group={quote(v['group'])}",
        }
        for v in doc["versions"]
    ]
    return {"groups": groups, "versions": versions}


def drift_page(hub: Hub, name: str, version: int, since: str | None) -> views.DriftView:
    queries = hub.fleet_queries
    since = since or DEFAULT_RANGE
    span = TimeRange.parse(since, None, queries.clock())
    fleet = queries.drift(name, version, since=str(span.since), until=str(span.until))
    profile = dict(hub.registry.get_version(name, version).manifest.reference_profile)
    windows = queries.store.windows("summary", name, version, span.since, span.until)
    cfg = queries.drift_settings
    timeline = views.drift_timeline(
        [(w.device_id, w.seq, w.end, w.body) for w in windows],
        profile,
        alpha=cfg.alpha,
        method=cfg.method,
        min_rows=cfg.min_rows,
    )
    shown = f"{views.when(span.since)} .. {views.when(span.until)}"
    return views.drift_view(name, version, fleet, timeline, shown)


def drift_versions(hub: Hub, name: str) -> list[int]:
    info = hub.registry.get_model(name)
    if not info.versions:
        raise NotFoundError(f"model {name!r} has no versions")
    return list(info.versions)
