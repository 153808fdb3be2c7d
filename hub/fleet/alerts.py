"""Fleet alerts: which telemetry becomes an alert, and what it says. Pure: no I/O, no clock.

Kinds (`KINDS`):

- `drift`       a device's drift message with `alert` true (the device's own k-windows-in-a-row
                rule). One alert per run: the windows of a device and model version whose
                `alert` is true with no `alert` false window between them (ordered by window
                start, so late or out-of-order arrival is fine) are one alert; its `last_seen`,
                count and evidence follow the run. (`hub.fleet.ledger` finds the run.)
- `error_rate`  fleet-wide, per model version: the summary windows whose end falls in one
                bucket of `error_window_s` seconds (device clock) add up to at least
                `error_min_requests` requests, of which at least `error_rate` failed.
                Consecutive buckets over the threshold are one alert (an episode).
- `rollback`    an update event in which the device fell back from a version (verification,
                load or self-test, probation, crash loop failed), or obeyed a rollback the hub
                published. One alert per event message.
- `refused`     a device refused an assignment naming a version it had marked bad: one alert
                per device and version, counting the refusals.

Severity: `critical` for a device falling back and an error rate at or above
`error_rate_critical`; `warning` for drift, an error rate above `error_rate`, a refusal; `info`
for a rollback the hub ordered (nothing failed on the device).

Each rule returns an `AlertDraft` whose `key` identifies the alert: a draft with a key already
stored updates that alert instead of adding one, so a message redelivered (and deduplicated
before it gets here anyway) or seen by two hub workers never makes two alerts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

DRIFT, ERROR_RATE, ROLLBACK, REFUSED = "drift", "error_rate", "rollback", "refused"
KINDS = (DRIFT, ERROR_RATE, ROLLBACK, REFUSED)
INFO, WARNING, CRITICAL = "info", "warning", "critical"

# The update life cycle's transitions (agent/update/lifecycle.py, EventKind) that end in a
# fall-back: the device stops serving the version it was trying and marks it bad.
FALLBACK_TRANSITIONS = frozenset({"verify_failed", "load_failed", "probation_failed", "crash_loop"})
HUB_ROLLBACK = "hub_rollback"
REFUSAL = "assignment_refused"
ROLLED_BACK = "rolled_back"

DEFAULT_ERROR_RATE = 0.05
DEFAULT_ERROR_RATE_CRITICAL = 0.25
DEFAULT_ERROR_MIN_REQUESTS = 100
DEFAULT_ERROR_WINDOW_S = 300.0


@dataclass(frozen=True)
class AlertRules:
    """Thresholds (hub settings `alert_*`)."""

    error_rate: float = DEFAULT_ERROR_RATE
    error_rate_critical: float = DEFAULT_ERROR_RATE_CRITICAL
    error_min_requests: int = DEFAULT_ERROR_MIN_REQUESTS
    error_window_s: float = DEFAULT_ERROR_WINDOW_S

    def __post_init__(self) -> None:
        if not 0.0 < self.error_rate <= 1.0 or not 0.0 < self.error_rate_critical <= 1.0:
            raise ValueError("alert error rates must be in (0, 1]")
        if self.error_min_requests < 1 or not self.error_window_s > 0:
            raise ValueError("alert_error_min_requests must be >= 1 and alert_error_window_s > 0")


@dataclass(frozen=True)
class AlertDraft:
    key: str
    kind: str
    severity: str
    device_id: str | None
    model: str | None
    version: int | None
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)


def _version_ref(body: dict[str, Any]) -> tuple[str | None, int | None]:
    ref = body.get("version")
    if isinstance(ref, dict):
        model, version = ref.get("model"), ref.get("version")
        return (
            model if isinstance(model, str) else None,
            version if isinstance(version, int) and not isinstance(version, bool) else None,
        )
    return None, None


def update_event_alert(device_id: str, seq: int, body: dict[str, Any]) -> AlertDraft | None:
    """The alert an `event` body raises, if any (only update transitions do)."""
    if body.get("event") != "update":
        return None
    transition = body.get("transition")
    model, version = _version_ref(body)
    what = f"{model} v{version}" if model is not None else "no version"
    reason = body.get("reason") or ""
    evidence = {
        k: body.get(k) for k in ("transition", "from", "to", "reason", "at") if body.get(k) is not None
    }
    evidence["seq"] = seq
    tail = f": {reason}" if reason else ""
    if transition in FALLBACK_TRANSITIONS:
        return AlertDraft(
            f"{ROLLBACK}:{device_id}:{seq}",
            ROLLBACK,
            CRITICAL,
            device_id,
            model,
            version,
            f"{device_id} fell back from {what} ({transition}){tail}",
            evidence,
        )
    if transition == HUB_ROLLBACK and body.get("from") != ROLLED_BACK:
        return AlertDraft(
            f"{ROLLBACK}:{device_id}:{seq}",
            ROLLBACK,
            INFO,
            device_id,
            model,
            version,
            f"{device_id} rolled back to {what} as the hub assigned{tail}",
            evidence,
        )
    if transition == REFUSAL:
        return AlertDraft(
            f"{REFUSED}:{device_id}:{model}:{version}",
            REFUSED,
            WARNING,
            device_id,
            model,
            version,
            f"{device_id} refuses {what}, which failed on it before{tail}",
            evidence,
        )
    return None


def drift_alert(device_id: str, seq: int, body: dict[str, Any]) -> AlertDraft | None:
    """The alert a drift body raises when its `alert` level is true; `key` names the run's first
    window seen (the ledger reuses the run's existing key when there is one)."""
    if body.get("alert") is not True:
        return None
    model, version = body.get("model"), body.get("version")
    alerting = [str(f) for f in body.get("alerting") or []]
    features = {str(f.get("name")): f for f in body.get("features") or [] if isinstance(f, dict)}
    prediction = body.get("prediction")
    if isinstance(prediction, dict):
        features.setdefault("prediction", prediction)
    evidence = {
        "window": {"seq": seq, "start": body.get("start"), "end": body.get("end"), "rows": body.get("rows")},
        "alerting": alerting,
        "streak": body.get("streak"),
        "k": body.get("k"),
        "tests": {
            name: {key: features[name].get(key) for key in ("test", "statistic", "p_value", "psi", "streak")}
            for name in alerting
            if name in features
        },
    }
    names = ", ".join(alerting) or "some feature"
    return AlertDraft(
        f"{DRIFT}:{device_id}:{model}:{version}:{seq}",
        DRIFT,
        WARNING,
        device_id,
        model if isinstance(model, str) else None,
        version if isinstance(version, int) and not isinstance(version, bool) else None,
        f"{device_id}: {model} v{version} input drift in {names} ({body.get('streak')} windows in a row)",
        evidence,
    )


def error_bucket(end: float, window_s: float) -> float:
    """The start of the error-rate bucket a window ending at `end` counts in."""
    return math.floor(end / window_s) * window_s


def error_rate_exceeded(requests: int, errors: int, rules: AlertRules) -> bool:
    """Whether one bucket's sums call for the fleet-wide alert."""
    return requests >= rules.error_min_requests and requests > 0 and errors / requests >= rules.error_rate


def error_rate_alert(
    model: str,
    version: int,
    bucket: float,
    requests: int,
    errors: int,
    devices: int,
    rules: AlertRules,
) -> AlertDraft | None:
    """The fleet-wide alert for one bucket's sums, or None while it is under the rule."""
    if not error_rate_exceeded(requests, errors, rules):
        return None
    rate = errors / requests
    severity = CRITICAL if rate >= rules.error_rate_critical else WARNING
    return AlertDraft(
        f"{ERROR_RATE}:{model}:{version}:{bucket:g}",
        ERROR_RATE,
        severity,
        None,
        model,
        version,
        f"{model} v{version}: {rate:.1%} of {requests} requests failed on {devices} devices "
        f"(threshold {rules.error_rate:.1%})",
        {
            "requests": requests,
            "errors": errors,
            "rate": round(rate, 6),
            "devices": devices,
            "bucket_start": bucket,
            "bucket_end": bucket + rules.error_window_s,
            "threshold": rules.error_rate,
            "min_requests": rules.error_min_requests,
        },
    )
