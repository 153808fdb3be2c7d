"""Pure rules of the fleet consumer: topics, payloads, and which state wins. No I/O here.

Topics: `outpost/v1/{group}/{device_id}/{kind}`, kind one of state, summary, drift, event
(what devices publish) or cmd (what the hub publishes to a device; ignored when read back).
The topic is authoritative for group and device (the broker's ACL lets a device publish only
under its own topics); a payload naming another device is refused.

State ordering (Sparkplug's bdSeq rule): every state carries the device's birth/death
sequence `bd_seq`, which goes up with each MQTT session. States are ordered by
(bd_seq, birth before death); an incoming state is applied when it is not older than the
stored one. So a late will from an older session (lower bd_seq) cannot mark a device that
has since reborn offline, a will with the current bd_seq does, a birth that arrives after the
will of its own session is ignored, and a birth repeated with the same bd_seq (the agent
republishing versions) refreshes the state. A device whose bd_seq goes backwards (its data
directory wiped) stays offline until its bd_seq passes the stored one; `bd_seq` is meant to
survive restarts.

Capture (`capture`: sampled requests with predictions, and labels, for retraining) carries
`seq` in the same sequence; its body is checked by hub.capture.rules and kept in its own
tables, not with the telemetry.

Telemetry (summary, drift, event) carries `seq`, per device, increasing and never reused:
(device_id, seq) identifies a message, so a QoS 1 redelivery is stored once.

Payloads are parsed with orjson (strict RFC 8259, several times faster than the stdlib on the
hub's hot path); what it refuses is parsed again by the stdlib, which accepts a little more
(NaN, a UTF-8 BOM, integers past 64 bits), so the hub accepts exactly what it did. A telemetry
body orjson accepted keeps its text (`TelemetryMsg.text`): the store keeps that instead of
encoding the body again.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from hub.capture.rules import KIND as CAPTURE
from hub.capture.rules import CaptureMsg, InvalidCapture, parse_capture

TOPIC_ROOT = "outpost/v1"
SHARE_GROUP = "outpost-hub"
# Everything devices publish, split across hub workers by the broker.
SHARED_FILTER = f"$share/{SHARE_GROUP}/{TOPIC_ROOT}/#"
# Retained states are not sent to shared subscriptions (MQTT 5, 4.8.2): subscribe to them
# directly as well; every worker sees every state, and applying one twice changes nothing.
STATE_FILTER = f"{TOPIC_ROOT}/+/+/state"
TELEMETRY_KINDS = frozenset({"summary", "drift", "event"})
STATE = "state"
CMD = "cmd"
COMMANDS = ("update", "rebirth")  # what the agent understands
MAX_ID_LEN = 128  # the agent's limit on a topic level (agent.telemetry.messages)
MAX_SEQ = 2**63 - 1  # the columns are BIGINT


class Invalid(ValueError):
    """A message the consumer cannot use (counted and logged, never stored)."""


@dataclass(frozen=True)
class StateMsg:
    group: str
    device_id: str
    online: bool
    bd_seq: int
    state: dict[str, Any]


@dataclass(frozen=True)
class TelemetryMsg:
    group: str
    device_id: str
    kind: str
    seq: int
    ts: float | None
    body: dict[str, Any]
    # The body's JSON text as received, when it is strict JSON (UTF-8, no NaN): what the store
    # keeps, so the body is never encoded again. None: the store encodes `body`.
    text: str | None = field(default=None, compare=False, repr=False)


Message = StateMsg | TelemetryMsg | CaptureMsg


def _ident(value: str, what: str) -> str:
    if not value or len(value) > MAX_ID_LEN or any(c in value for c in "+#/\x00"):
        raise Invalid(f"bad {what} {value!r} in topic")
    return value


def parse_topic(topic: str) -> tuple[str, str, str] | None:
    """(group, device_id, kind) of an Outpost topic; None for a topic that is not ours or `cmd`."""
    parts = topic.split("/")
    if len(parts) != 5 or f"{parts[0]}/{parts[1]}" != TOPIC_ROOT:
        raise Invalid(f"not an outpost/v1/{{group}}/{{device}}/{{kind}} topic: {topic!r}")
    group, device_id, kind = parts[2], parts[3], parts[4]
    if kind == CMD:
        return None
    if kind not in (STATE, CAPTURE) and kind not in TELEMETRY_KINDS:
        raise Invalid(f"unknown kind {kind!r} in {topic!r}")
    return _ident(group, "group"), _ident(device_id, "device id"), kind


def _int(doc: dict[str, Any], key: str) -> int:
    value = doc.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_SEQ:
        raise Invalid(f"{key} must be an integer from 0 to 2**63-1, got {value!r}")
    return value


def parse_ts(value: Any) -> float | None:
    """Seconds since the epoch from a number or an ISO 8601 string; None when absent."""
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise Invalid(f"ts is not finite: {value!r}")
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            raise Invalid(f"ts is not ISO 8601: {value!r}") from None
    raise Invalid(f"ts must be a number or an ISO 8601 string, got {value!r}")


def parse_message(topic: str, payload: bytes) -> Message | None:
    """The message a device published; None for ours (`cmd`); Invalid when unusable."""
    where = parse_topic(topic)
    if where is None:
        return None
    group, device_id, kind = where
    text: str | None = None
    try:
        doc = orjson.loads(payload)
        if kind in TELEMETRY_KINDS:
            text = payload.decode()  # valid UTF-8: orjson checked it
    except orjson.JSONDecodeError:
        try:
            doc = json.loads(payload)
        except (ValueError, UnicodeDecodeError) as exc:
            raise Invalid(f"{topic}: payload is not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise Invalid(f"{topic}: payload is not a JSON object")
    named = doc.get("device_id")
    if named is not None and named != device_id:
        raise Invalid(f"{topic}: payload names device {named!r}")
    if kind == STATE:
        online = doc.get("online")
        if not isinstance(online, bool):
            raise Invalid(f"{topic}: state needs online true/false")
        return StateMsg(group, device_id, online, _int(doc, "bd_seq"), doc)
    if kind == CAPTURE:
        try:
            return parse_capture(group, device_id, _int(doc, "seq"), parse_ts(doc.get("ts")), doc)
        except InvalidCapture as exc:
            raise Invalid(f"{topic}: {exc}") from None
    return TelemetryMsg(group, device_id, kind, _int(doc, "seq"), parse_ts(doc.get("ts")), doc, text)


def state_key(online: bool, bd_seq: int) -> tuple[int, int]:
    """The order of states: by session, and within a session the birth before the death."""
    return (bd_seq, 0 if online else 1)


def state_applies(stored: tuple[bool, int] | None, incoming: StateMsg) -> bool:
    """Whether `incoming` replaces the stored (online, bd_seq); None: no state stored yet."""
    if stored is None:
        return True
    return state_key(incoming.online, incoming.bd_seq) >= state_key(*stored)


def cmd_topic(group: str, device_id: str) -> str:
    return f"{TOPIC_ROOT}/{_ident(group, 'group')}/{_ident(device_id, 'device id')}/{CMD}"
