"""What a webhook receives: one `Notice` rendered in the webhook's format. Pure: no I/O.

A notice is an alert as it leaves the hub: a fleet alert (drift, error_rate, rollback,
refused), a halted rollout, a device offline for too long (and, later, its resolution), or an
operator's test. Its `id` is stable (the receiver may deduplicate on it; it is also sent as the
`Idempotency-Key` header) and `link` is the dashboard page that explains it (`dashboard_link`).

Formats:

- `json`: our own schema, stable (new keys may be added, none removed or changed):

      {"schema": "outpost.alert/v1", "id": "fleet:drift:dev-7:wine:3:41",
       "status": "firing" | "resolved", "kind": "drift", "severity": "warning",
       "title": "...", "text": "...", "model": "wine", "version": 3, "group": "lab",
       "device": "dev-7", "started": "2026-11-27T14:02:11+00:00", "ended": null,
       "link": "http://hub:8700/drift/wine/3", "details": {...}}

  (`model`, `version`, `group`, `device`, `ended` are null when they do not apply.)
- `slack`: an incoming-webhook message, `{"text": ..., "blocks": [...]}` (section with the
  title and text in mrkdwn, a context line with severity and subject, the dashboard link).
- `alertmanager`: the body of Alertmanager's `POST /api/v2/alerts`, a one-element array of
  `{labels, annotations, startsAt, endsAt?, generatorURL}`; a resolution carries the same labels
  with `endsAt`, so Alertmanager resolves the alert it already has.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import quote

SCHEMA = "outpost.alert/v1"
FIRING, RESOLVED = "firing", "resolved"
# Kinds beyond hub.fleet.alerts' own (drift, error_rate, rollback, refused).
ROLLOUT_HALTED, DEVICE_OFFLINE, TEST = "rollout_halted", "device_offline", "test"
_ALERTNAMES = {
    "drift": "OutpostDrift",
    "error_rate": "OutpostErrorRate",
    "rollback": "OutpostRollback",
    "refused": "OutpostRefusedVersion",
    ROLLOUT_HALTED: "OutpostRolloutHalted",
    DEVICE_OFFLINE: "OutpostDeviceOffline",
    TEST: "OutpostTest",
}
SLACK_TEXT_LIMIT = 3000  # a section block's text is at most 3000 characters


@dataclass(frozen=True)
class Notice:
    id: str
    kind: str
    severity: str
    title: str
    text: str
    started: datetime
    link: str
    status: str = FIRING
    model: str | None = None
    version: int | None = None
    group: str | None = None
    device: str | None = None
    ended: datetime | None = None
    details: Mapping[str, Any] = field(default_factory=dict)


def dashboard_link(public_url: str, kind: str, model: str | None = None, version: int | None = None) -> str:
    """The dashboard page that explains an alert of `kind` (hub.dashboard.routes):
    drift -> /drift/{model}/{version}; error rate, rollbacks, refusals, halted rollouts ->
    /models/{model}; offline devices, tests and anything without a model -> / (the fleet)."""
    base = public_url.rstrip("/")
    if kind == "drift" and model is not None and version is not None:
        return f"{base}/drift/{quote(model, safe='')}/{version}"
    if kind in ("drift", "error_rate", "rollback", "refused", ROLLOUT_HALTED) and model is not None:
        return f"{base}/models/{quote(model, safe='')}"
    return f"{base}/"


def subject(n: Notice) -> str:
    """What the alert is about, in a few words: "wine v3 in lab on dev-7"."""
    parts = []
    if n.model is not None:
        parts.append(n.model + (f" v{n.version}" if n.version is not None else ""))
    if n.group is not None:
        parts.append(f"in {n.group}")
    if n.device is not None:
        parts.append(f"on {n.device}")
    return " ".join(parts) or "the fleet"


def json_payload(n: Notice) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "id": n.id,
        "status": n.status,
        "kind": n.kind,
        "severity": n.severity,
        "title": n.title,
        "text": n.text,
        "model": n.model,
        "version": n.version,
        "group": n.group,
        "device": n.device,
        "started": n.started.isoformat(),
        "ended": n.ended.isoformat() if n.ended is not None else None,
        "link": n.link,
        "details": dict(n.details),
    }


def _mrkdwn(text: str) -> str:
    """Slack's escaping: &, < and > are control characters in message text."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _cut(text: str, limit: int) -> str:
    """At most `limit` characters, ending in "..." when cut (never inside an &...; escape)."""
    if len(text) <= limit:
        return text
    head = text[: limit - 3]
    amp = head.rfind("&")
    if amp > head.rfind(";"):
        head = head[:amp]
    return head + "..."


def slack_payload(n: Notice) -> dict[str, Any]:
    mark = "Resolved" if n.status == RESOLVED else n.severity.upper()
    headline = f"[{mark}] {n.title}"
    section = _cut(f"*{_mrkdwn(headline)}*\n{_mrkdwn(n.text)}", SLACK_TEXT_LIMIT)
    return {
        "text": f"{headline}: {n.text} ({n.link})",  # notifications and clients without blocks
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": section}},
            {
                "type": "context",
                "elements": [
                    {
                        "type": "mrkdwn",
                        "text": _mrkdwn(
                            f"{n.kind} · {n.severity} · {subject(n)} · since {n.started:%Y-%m-%d %H:%M:%S}Z"
                        ),
                    }
                ],
            },
            {
                "type": "section",
                "text": {"type": "mrkdwn", "text": f"<{n.link}|Open in the Outpost dashboard>"},
            },
        ],
    }


def alertmanager_payload(n: Notice) -> list[dict[str, Any]]:
    labels = {"alertname": _ALERTNAMES.get(n.kind, "OutpostAlert"), "severity": n.severity, "kind": n.kind}
    for key, value in (("model", n.model), ("version", n.version), ("group", n.group), ("device", n.device)):
        if value is not None:
            labels[key] = str(value)
    # The alert's identity for Alertmanager is its label set: a resolution must repeat it, and
    # two alerts of one kind about the same subject must differ, hence the firing notice's id.
    labels["alert_id"] = n.details.get("resolves", n.id) if n.status == RESOLVED else n.id
    alert: dict[str, Any] = {
        "labels": labels,
        "annotations": {"summary": n.title, "description": n.text, "dashboard": n.link},
        "startsAt": n.started.isoformat(),
        "generatorURL": n.link,
    }
    if n.ended is not None:
        alert["endsAt"] = n.ended.isoformat()
    return [alert]


def render(fmt: str, n: Notice) -> Any:
    """The JSON body for a webhook of format `fmt` (hub.alerting.webhooks.FORMATS)."""
    if fmt == "slack":
        return slack_payload(n)
    if fmt == "alertmanager":
        return alertmanager_payload(n)
    return json_payload(n)
