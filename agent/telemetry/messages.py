"""Telemetry topics and payloads: pure functions, no I/O.

The contract (docs/architecture.md, "MQTT topics"): every topic is under
`outpost/v1/{group}/{device_id}/`, every payload is a JSON object carrying
`device_id`, `seq` (per device, unique and increasing, never reused, survives
restarts; not contiguous: state messages take numbers too, and drops are reported
as counts) and `ts` (Unix time in seconds, a float).

- `state`   retained, QoS 1: birth `{"online": true, "bd_seq": N, ...}`, death / last will
            `{"online": false, "bd_seq": N}`. `bd_seq` (Sparkplug's bdSeq) goes up once per
            connection attempt, so a reader keeps the state with the highest `bd_seq` and a late
            will (lower `bd_seq`) cannot mark a reconnected device offline.
- `summary`, `drift`, `event`: QoS 1, not retained.
- `cmd`     the agent subscribes; `{"command": "update", "id": "...", "args": {...}}`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

TOPIC_ROOT = "outpost/v1"
KINDS = ("state", "summary", "drift", "event", "capture")
# What callers may publish; `state` is the client's own.
PUBLISHED_KINDS = ("summary", "drift", "event", "capture")
RESERVED_KEYS = ("device_id", "seq", "ts")
# Commands the agent understands. "rebirth" (Sparkplug) asks for the state to be published again.
COMMANDS = ("update", "rebirth")
MAX_COMMAND_BYTES = 64 * 1024

# A topic level must not hold MQTT's separators or wildcards, or a device could publish into
# another device's (or the whole group's) topics.
_LEVEL = re.compile(r"[A-Za-z0-9._:@-]{1,128}")
_COMMAND_ID = re.compile(r"[\x21-\x7e]{1,128}")


def check_level(name: str, value: str) -> str:
    """`value` as one topic level, or ValueError naming `name`."""
    if not _LEVEL.fullmatch(value):
        raise ValueError(
            f"{name} {value!r} cannot be an MQTT topic level: use 1-128 of A-Z a-z 0-9 . _ : @ -"
        )
    return value


def topic_prefix(group: str, device_id: str) -> str:
    return f"{TOPIC_ROOT}/{check_level('group', group)}/{check_level('device_id', device_id)}/"


def topic(kind: str, group: str, device_id: str) -> str:
    if kind not in KINDS and kind != "cmd":
        raise ValueError(f"unknown telemetry kind {kind!r}; expected one of {', '.join(KINDS)}")
    return topic_prefix(group, device_id) + kind


def state_topic(group: str, device_id: str) -> str:
    return topic("state", group, device_id)


def cmd_topic(group: str, device_id: str) -> str:
    return topic("cmd", group, device_id)


def encode(obj: Mapping[str, Any]) -> bytes:
    # Compact and ASCII-only: payloads are stored and counted in bytes; NaN is not JSON.
    return json.dumps(obj, separators=(",", ":"), allow_nan=False, sort_keys=False).encode()


def envelope(
    kind: str, device_id: str, group: str, seq: int, ts: float, body: Mapping[str, Any]
) -> tuple[str, bytes]:
    """The topic and JSON payload of one message: `device_id`, `seq`, `ts` first, then `body`.

    `body` must not set the envelope's keys (ValueError): a summary cannot claim another seq.
    """
    clash = [k for k in RESERVED_KEYS if k in body]
    if clash:
        raise ValueError(f"the body of a {kind} message must not set {', '.join(clash)}")
    payload: dict[str, Any] = {"device_id": device_id, "seq": seq, "ts": round(ts, 3)}
    payload.update(body)
    return topic(kind, group, device_id), encode(payload)


def state_body(online: bool, bd_seq: int, fields: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The body of a birth (online) or death (offline) `state` message."""
    body: dict[str, Any] = dict(fields or {})
    for key in (*RESERVED_KEYS, "online", "bd_seq"):
        body.pop(key, None)  # the client's own keys win over whatever state_fields() returned
    body["online"] = online
    body["bd_seq"] = bd_seq
    return body


@dataclass(frozen=True)
class Command:
    """A command from the hub, as received on the device's `cmd` topic."""

    command: str
    id: str | None = None
    args: Mapping[str, Any] = field(default_factory=dict)


def parse_command(payload: bytes) -> Command | None:
    """A valid command, or None for anything else (the caller logs it; nothing is raised).

    Valid: a JSON object (at most 64 KiB) with `command` one of COMMANDS, optional `id`
    (printable ASCII, at most 128 characters) and optional `args` (an object). Unknown keys
    are ignored, so the hub may add some without breaking older agents.
    """
    if len(payload) > MAX_COMMAND_BYTES:
        return None
    try:
        doc = json.loads(payload)
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(doc, dict):
        return None
    command = doc.get("command")
    if not isinstance(command, str) or command not in COMMANDS:
        return None
    cid = doc.get("id")
    if cid is not None and not (isinstance(cid, str) and _COMMAND_ID.fullmatch(cid)):
        return None
    args = doc.get("args", {})
    if not isinstance(args, dict):
        return None
    return Command(command=command, id=cid, args=args)


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool


def parse_broker_url(url: str) -> BrokerAddress:
    """`mqtt://host[:port]` (1883) or `mqtts://host[:port]` (TLS, 8883); ValueError otherwise.

    Credentials do not belong in the URL (it is logged): use mqtt.username / mqtt.password.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"not a broker URL: {url!r} ({exc})") from exc
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ValueError(f"expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT], got {url!r}")
    if parts.username is not None or parts.password is not None:
        raise ValueError("put the broker's credentials in mqtt.username and mqtt.password, not in the URL")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"a broker URL has no path, query or fragment: {url!r}")
    tls = parts.scheme == "mqtts"
    return BrokerAddress(parts.hostname, port if port is not None else (8883 if tls else 1883), tls)
