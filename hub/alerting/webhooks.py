"""Where alerts go: the webhooks named in hub.toml, parsed and checked. Pure: no I/O.

    [[webhooks]]                      # TOML array of tables, after every top-level key
    name = "ops-slack"                # unique; deliveries are recorded per name
    url = "https://hooks.slack.com/services/..."
    format = "slack"                  # "json" (ours) | "slack" | "alertmanager"
    min_severity = "warning"          # "info" (default) | "warning" | "critical"
    token = ""                        # optional: sent as Authorization: Bearer <token>
    headers = { X-Scope = "edge" }    # optional extra request headers

Renaming a webhook makes it a new one (it receives the recent alerts again); its old name's
deliveries stay recorded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from hub.errors import HubError

FORMATS = ("json", "slack", "alertmanager")
SEVERITIES = ("info", "warning", "critical")
MAX_NAME_LEN = 64
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_HEADER = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP token (RFC 9110)
_KEYS = frozenset({"name", "url", "format", "min_severity", "token", "headers"})


class WebhookConfigError(HubError):
    """A [[webhooks]] entry in hub.toml is invalid; the message names the entry and the key."""


def severity_rank(severity: str) -> int:
    """0 info, 1 warning, 2 critical (unknown severities count as info)."""
    return SEVERITIES.index(severity) if severity in SEVERITIES else 0


@dataclass(frozen=True)
class Webhook:
    name: str
    url: str
    format: str = "json"
    min_severity: str = "info"
    token: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)

    def severities(self) -> tuple[str, ...]:
        """The severities this webhook receives."""
        return SEVERITIES[severity_rank(self.min_severity) :]

    def to_toml(self) -> str:
        lines = ["[[webhooks]]"]
        for key in ("name", "url", "format", "min_severity", "token"):
            lines.append(f'{key} = "{getattr(self, key)}"')
        if self.headers:
            inner = ", ".join(f'"{k}" = "{v}"' for k, v in self.headers.items())
            lines.append(f"headers = {{ {inner} }}")
        return "\n".join(lines)

    def describe(self) -> dict[str, Any]:
        """For the API and logs: no token, no header values (they may be secrets)."""
        parts = urlsplit(self.url)
        port = f":{parts.port}" if parts.port else ""
        first, _, rest = parts.path.lstrip("/").partition("/")
        path = f"/{first}" + ("/..." if rest else "")  # a Slack URL's path is its secret
        return {
            "name": self.name,
            "url": f"{parts.scheme}://{parts.hostname}{port}{path}",
            "format": self.format,
            "min_severity": self.min_severity,
            "headers": sorted(self.headers) + (["Authorization"] if self.token else []),
        }


def _text(where: str, entry: Mapping[str, Any], key: str, default: str | None = None) -> str:
    value = entry.get(key, default)
    if value is None:
        raise WebhookConfigError(f"{where}: `{key}` is missing")
    if not isinstance(value, str):
        raise WebhookConfigError(f"{where}: `{key}` must be a string")
    return value


def parse_webhook(entry: Any, index: int = 0) -> Webhook:
    where = f"webhooks[{index}]"
    if not isinstance(entry, Mapping):
        raise WebhookConfigError(f"{where}: expected a table ([[webhooks]] with name, url, format)")
    name = _text(where, entry, "name")
    if not _NAME.fullmatch(name) or len(name) > MAX_NAME_LEN:
        raise WebhookConfigError(
            f"{where}: name {name!r} must be letters, digits, '_', '.', '-' (at most {MAX_NAME_LEN})"
        )
    where = f"webhook {name!r}"
    unknown = sorted(set(entry) - _KEYS)
    if unknown:
        raise WebhookConfigError(f"{where}: unknown key {unknown[0]}; known keys: {', '.join(sorted(_KEYS))}")
    url = _text(where, entry, "url")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookConfigError(f"{where}: url must be an http:// or https:// URL, got {url!r}")
    fmt = _text(where, entry, "format", "json")
    if fmt not in FORMATS:
        raise WebhookConfigError(f"{where}: format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    minimum = _text(where, entry, "min_severity", "info")
    if minimum not in SEVERITIES:
        raise WebhookConfigError(
            f"{where}: min_severity must be one of {', '.join(SEVERITIES)}, got {minimum!r}"
        )
    token = _text(where, entry, "token", "")
    raw = entry.get("headers", {})
    if not isinstance(raw, Mapping):
        raise WebhookConfigError(f"{where}: headers must be a table of strings")
    headers: dict[str, str] = {}
    for key, value in raw.items():
        if not _HEADER.fullmatch(str(key)) or not isinstance(value, str) or "\n" in value or "\r" in value:
            raise WebhookConfigError(f"{where}: header {key!r} must be a header name with a one-line string")
        headers[str(key)] = value
    return Webhook(name, url, fmt, minimum, token, headers)


def parse_webhooks(value: Any) -> tuple[Webhook, ...]:
    """The `webhooks` value of hub.toml (a list of tables) as Webhooks; names must be unique."""
    if not isinstance(value, list | tuple):
        raise WebhookConfigError("webhooks must be an array of tables: [[webhooks]] name = ... url = ...")
    hooks = tuple(parse_webhook(entry, i) for i, entry in enumerate(value))
    seen: set[str] = set()
    for hook in hooks:
        if hook.name in seen:
            raise WebhookConfigError(f"webhook {hook.name!r} is named twice; names must be unique")
        seen.add(hook.name)
    return hooks
