"""What each dashboard page shows, built from the hub's data. Pure: values in, view models out.

The routes (hub.dashboard.routes) read the registry and the fleet store (hub.dashboard.data)
and hand the results here; the templates only lay out what these dataclasses hold, so every
number a person sees is decided, and tested, here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from agent.monitor.drift import Method
from hub.fleet import aggregate
from hub.fleet.ledger import Alert
from hub.fleet.runtime import hardware_text, runs_on
from hub.fleet.store import DeviceInfo
from hub.registry import Deployment, VersionInfo

MAX_POINTS = 48  # time buckets per drift chart at most
# Bucket widths (seconds) a drift chart may use: the smallest that keeps it under MAX_POINTS.
BUCKET_WIDTHS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400)
DASH = "\u2013"  # an en dash: nothing to show
PSI_THRESHOLD = 0.25  # the usual reading of PSI: above 0.25 the distribution moved a lot


def when(t: datetime | float | None) -> str:
    """A time as a person reads it, UTC to the second."""
    if t is None:
        return "never"
    moment = t if isinstance(t, datetime) else datetime.fromtimestamp(t, UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def ago(t: datetime | None, now: datetime) -> str:
    if t is None:
        return ""
    s = max(0, int((now - t).total_seconds()))
    if s < 60:
        return f"{s}s ago"
    if s < 3600:
        return f"{s // 60}m ago"
    if s < 86400:
        return f"{s // 3600}h ago"
    return f"{s // 86400}d ago"


def percent(value: float | None, digits: int = 2) -> str:
    return DASH if value is None else f"{value * 100:.{digits}f}%"


def number(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return DASH
    return f"{value:.{digits}g}"


def versions_text(versions: Any) -> str:
    """A device state's {"model": version} as "wine v1, other v3"."""
    if not isinstance(versions, dict) or not versions:
        return DASH
    return ", ".join(f"{m} v{v}" for m, v in sorted(versions.items()) if v is not None) or DASH


def update_text(update: Any) -> str:
    if not isinstance(update, dict) or not update.get("state"):
        return DASH
    text = str(update["state"])
    if update.get("pending") is not None:
        text += f" (v{update['pending']})"
    return text


# -- fleet ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceView:
    device_id: str
    group: str
    online: bool
    versions: str
    update: str
    last_seen: str
    last_seen_ago: str
    rollbacks: int
    runs: str = DASH  # each model's variant and execution providers (hub.fleet.runtime)
    hardware: str = ""  # the device's hardware tags


@dataclass(frozen=True)
class GroupCount:
    group: str
    devices: int
    online: int


@dataclass(frozen=True)
class AlertView:
    kind: str
    severity: str
    device_id: str
    model: str
    last_seen: str
    count: int
    message: str


@dataclass(frozen=True)
class FleetView:
    devices: list[DeviceView]
    groups: list[GroupCount]
    alerts: list[AlertView]

    @property
    def online(self) -> int:
        return sum(1 for d in self.devices if d.online)


def alert_view(a: Alert) -> AlertView:
    model = "" if a.model is None else a.model + ("" if a.version is None else f" v{a.version}")
    return AlertView(a.kind, a.severity, a.device_id or "", model, when(a.last_seen), a.count, a.message)


def fleet_view(
    devices: Sequence[DeviceInfo],
    alerts: Sequence[Alert],
    now: datetime,
    rollback_alerts: Sequence[Alert] | None = None,
) -> FleetView:
    """`alerts`: the recent ones shown; `rollback_alerts`: every stored rollback alert, counted per
    device (the shown alerts when not given)."""
    rollbacks: dict[str, int] = {}
    for a in alerts if rollback_alerts is None else rollback_alerts:
        if a.kind == "rollback" and a.device_id:
            rollbacks[a.device_id] = rollbacks.get(a.device_id, 0) + a.count
    rows = [
        DeviceView(
            device_id=d.device_id,
            group=d.group,
            online=d.online,
            versions=versions_text(d.state.get("versions")),
            update=update_text(d.state.get("update")),
            last_seen=when(d.last_seen),
            last_seen_ago=ago(d.last_seen, now),
            rollbacks=rollbacks.get(d.device_id, 0),
            runs="; ".join(f"{m}: {text}" for m, text in runs_on(d.state).items()) or DASH,
            hardware=hardware_text(d.state),
        )
        for d in sorted(devices, key=lambda d: (d.group, d.device_id))
    ]
    groups: dict[str, list[int]] = {}
    for d in devices:
        counts = groups.setdefault(d.group, [0, 0])
        counts[0] += 1
        counts[1] += int(d.online)
    return FleetView(
        devices=rows,
        groups=[GroupCount(g, n, up) for g, (n, up) in sorted(groups.items())],
        alerts=[alert_view(a) for a in alerts],
    )


# -- a model ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class VersionView:
    version: int
    created: str
    task: str
    quantization: str
    size_kib: str
    devices: list[str]  # running it now, by their state
    requests: int
    error_rate: str
    p50_ms: str
    p95_ms: str
    accuracy: str


@dataclass(frozen=True)
class DeploymentView:
    group: str
    stable: int
    candidate: str
    percent: str
    created: str
    created_by: str


@dataclass(frozen=True)
class DecisionView:
    """One gate decision of a rollout step: what was decided, when, and on what evidence."""

    at: str
    step: str
    decision: str
    reason: str
    evidence: str


@dataclass(frozen=True)
class RolloutView:
    id: str
    group: str
    candidate: int
    status: str
    progress: str  # e.g. "step 2 of 4, 25%"
    decisions: list[DecisionView] = field(default_factory=list)


@dataclass(frozen=True)
class ModelView:
    name: str
    versions: list[VersionView]
    deployments: list[DeploymentView]
    unversioned_devices: list[str]  # report the model at a version the registry does not hold
    rollouts: list[RolloutView]
    summary_range: str


MAX_DECISIONS = 50  # per rollout on the page: the newest ones
EVIDENCE_CHARS = 400


def _iso(text: Any) -> str:
    try:
        return when(datetime.fromisoformat(str(text)))
    except ValueError:
        return str(text)


def rollout_view(doc: Mapping[str, Any]) -> RolloutView:
    """A rollout as hub.rollouts.get_rollout gives it (with "decisions", oldest first)."""
    steps = [int(p) for p in doc.get("steps", [])]
    step = int(doc.get("step", 0))
    progress = f"step {step + 1} of {len(steps)} at {doc.get('percent')}% (steps: "
    progress += ", ".join(f"{p}%" for p in steps) + ")"
    status = str(doc.get("state", ""))
    if doc.get("reason"):
        status += f": {doc['reason']}"
    decisions = [
        DecisionView(
            at=_iso(d.get("at")),
            step=f"{int(d.get('step', 0)) + 1} at {d.get('percent')}%",
            decision=f"{d.get('action')} ({d.get('actor')})",
            reason=str(d.get("reason", "")),
            evidence=_evidence(d.get("evidence")),
        )
        for d in list(doc.get("decisions", []))[-MAX_DECISIONS:]
    ]
    return RolloutView(
        id=f"#{doc.get('id')}",
        group=str(doc.get("group", "")),
        candidate=int(doc.get("candidate", 0)),
        status=status,
        progress=progress,
        decisions=decisions,
    )


def _evidence(evidence: Any) -> str:
    if not evidence:
        return ""
    text = json.dumps(evidence, sort_keys=True, separators=(", ", ": "), default=str)
    return text if len(text) <= EVIDENCE_CHARS else text[: EVIDENCE_CHARS - 1] + "\u2026"


def _quantization(q: Mapping[str, Any] | None) -> str:
    if not q:
        return DASH
    kind = q.get("kept") or q.get("method")
    return str(kind) if kind is not None else DASH


def model_view(
    name: str,
    versions: Sequence[VersionInfo],
    deployments: Iterable[Deployment],
    devices: Sequence[DeviceInfo],
    summaries: Mapping[int, Mapping[str, Any]],
    rollouts: Sequence[RolloutView],
    summary_range: str,
) -> ModelView:
    """`summaries`: per version, FleetQueries.summary's answer over `summary_range`."""
    running: dict[int, list[str]] = {}
    for d in devices:
        v = (d.state.get("versions") or {}).get(name) if isinstance(d.state.get("versions"), dict) else None
        if isinstance(v, int):
            running.setdefault(v, []).append(d.device_id)
    known = {v.version for v in versions}
    rows = []
    for v in sorted(versions, key=lambda v: v.version, reverse=True):
        doc = summaries.get(v.version) or {}
        derived = doc.get("derived") or aggregate.derived(None)
        window = doc.get("summary") or {}
        latency = derived.get("latency_ms") or {}
        rows.append(
            VersionView(
                version=v.version,
                created=when(v.created),
                task=v.manifest.task,
                quantization=_quantization(v.manifest.quantization),
                size_kib=f"{v.model_size / 1024:.0f} KiB",
                devices=sorted(running.get(v.version, [])),
                requests=int(window.get("requests", 0)),
                error_rate=percent(derived.get("error_rate")),
                p50_ms=number(latency.get("p50")),
                p95_ms=number(latency.get("p95")),
                accuracy=percent(derived.get("accuracy"))
                + (f" of {derived['labelled']}" if derived.get("labelled") else ""),
            )
        )
    deps = [
        DeploymentView(
            group=d.group,
            stable=d.stable,
            candidate=DASH if d.candidate is None else f"v{d.candidate}",
            percent=DASH if d.candidate is None else f"{d.percent}%",
            created=when(d.created),
            created_by=d.created_by,
        )
        for d in sorted(deployments, key=lambda d: d.group)
        if d.model == name
    ]
    stray = sorted(dev for v, ids in running.items() if v not in known for dev in ids)
    return ModelView(name, rows, deps, stray, list(rollouts), summary_range)


# -- drift over time --------------------------------------------------------------------------


@dataclass(frozen=True)
class DriftPoint:
    t: float  # the bucket's middle, epoch seconds
    rows: int
    devices: int
    p_value: float | None
    psi: float | None
    drifted: bool


@dataclass(frozen=True)
class Timeline:
    bucket_s: int
    features: dict[str, list[DriftPoint]]  # in the profile's order


def bucket_width(first: float, last: float, max_points: int = MAX_POINTS) -> int:
    """The smallest of BUCKET_WIDTHS that splits [first, last] into at most `max_points`."""
    span = max(0.0, last - first)
    for width in BUCKET_WIDTHS:
        if span / width < max_points:
            return width
    return BUCKET_WIDTHS[-1]


def drift_timeline(
    windows: Sequence[tuple[str, int, float, Mapping[str, Any]]],
    profile: Mapping[str, Any],
    *,
    alpha: float = aggregate.DEFAULT_ALPHA,
    method: Method = aggregate.DEFAULT_METHOD,
    min_rows: int = aggregate.DEFAULT_MIN_ROWS,
    max_points: int = MAX_POINTS,
) -> Timeline:
    """Drift per feature per time bucket: the (device_id, seq, end, window) summary windows whose
    end falls in a bucket are summed and tested against the profile, as the fleet drift query
    does for a whole range (same statistics, same correction); a bucket under `min_rows` rows
    has no p-value or PSI (a gap in the chart)."""
    names = [str(f.get("name")) for f in profile.get("features", [])]
    if not windows:
        return Timeline(BUCKET_WIDTHS[0], {n: [] for n in names})
    ends = [end for _, _, end, _ in windows]
    width = bucket_width(min(ends), max(ends), max_points)
    buckets: dict[int, list[tuple[str, int, Mapping[str, Any]]]] = {}
    for device_id, seq, end, body in windows:
        buckets.setdefault(math.floor(end / width), []).append((device_id, seq, body))
    series: dict[str, list[DriftPoint]] = {n: [] for n in names}
    for index in sorted(buckets):
        total = aggregate.sum_windows(buckets[index], profile)
        tested = aggregate.fleet_drift(total.window, profile, alpha=alpha, method=method, min_rows=min_rows)
        enough = bool(tested["enough_rows"])
        for f in tested["features"]:
            if f["name"] not in series:
                continue
            series[f["name"]].append(
                DriftPoint(
                    t=(index + 0.5) * width,
                    rows=int(f["rows"]),
                    devices=len(total.devices),
                    p_value=f.get("p_value") if enough else None,
                    psi=f.get("psi") if enough else None,
                    drifted=bool(f["drifted"]),
                )
            )
    return Timeline(width, series)


@dataclass(frozen=True)
class FeatureDrift:
    name: str
    test: str
    p_value: str
    psi: str
    drifted: bool
    chart: str  # inline SVG


@dataclass(frozen=True)
class DeviceDrift:
    device_id: str
    group: str
    alert: bool
    alerting: str
    drifted: str
    window_end: str


@dataclass(frozen=True)
class DriftView:
    model: str
    version: int
    range: str
    rows: int
    enough_rows: bool
    bucket_s: int
    features: list[FeatureDrift]  # drifted first
    devices: list[DeviceDrift]

    @property
    def alerting(self) -> list[str]:
        return [d.device_id for d in self.devices if d.alert]


def hhmmss(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%H:%M:%S")


def drift_view(
    model: str, version: int, fleet_drift: Mapping[str, Any], timeline: Timeline, range_text: str
) -> DriftView:
    """`fleet_drift`: FleetQueries.drift's answer for the range (the verdict per feature and each
    device's latest window); `timeline`: the same range bucketed (drift_timeline)."""
    from hub.dashboard.svg import Series, line_chart

    fleet = fleet_drift.get("fleet") or {}
    features = []
    for f in fleet.get("features", []):
        points = timeline.features.get(f["name"], [])
        labels = [
            f"{hhmmss(p.t)}: PSI {number(p.psi)}, p {number(p.p_value)}, {p.rows} rows from {p.devices} "
            f"device{'s' if p.devices != 1 else ''}"
            for p in points
        ]
        chart = line_chart(
            [Series(f["name"], [(p.t, p.psi) for p in points], labels)],
            title=f"{f['name']}: PSI per {timeline.bucket_s} s",
            y_label="PSI",
            threshold=PSI_THRESHOLD,
            threshold_label=f"PSI {PSI_THRESHOLD}",
            x_format=hhmmss,
        )
        features.append(
            FeatureDrift(
                name=f["name"],
                test=f.get("test") or DASH,
                p_value=number(f.get("p_value")),
                psi=number(f.get("psi")),
                drifted=bool(f.get("drifted")),
                chart=chart,
            )
        )
    features.sort(key=lambda f: not f.drifted)  # stable: the profile's order otherwise
    devices = [
        DeviceDrift(
            device_id=d["device_id"],
            group=d.get("group") or "",
            alert=bool(d.get("alert")),
            alerting=", ".join(d.get("alerting") or []) or DASH,
            drifted=", ".join(d.get("drifted") or []) or DASH,
            window_end=when(d.get("end")),
        )
        for d in sorted(fleet_drift.get("devices", []), key=lambda d: (not d.get("alert"), d["device_id"]))
    ]
    return DriftView(
        model=model,
        version=version,
        range=range_text,
        rows=int(fleet.get("rows") or 0),
        enough_rows=bool(fleet.get("enough_rows")),
        bucket_s=timeline.bucket_s,
        features=features,
        devices=devices,
    )
