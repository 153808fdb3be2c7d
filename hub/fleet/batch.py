"""What a batch of messages does to the fleet's tables, decided without the database: the pure
half of `FleetStore.apply` (hub.fleet.store reads the devices, writes the rows, and raises the
alerts of what turned out to be new).

    devices = {device_id: DeviceState(...)}       # the batch's devices as stored (row-locked)
    plan = plan_batch(batch, devices, now, capture=True)
    # insert plan.window_rows() and plan.message_rows() in one statement each, learn which
    # (device_id, seq) were new, alert on those in plan.entries order, write back the devices
    # whose `values()` changed, prune the devices in plan.telemetry_devices

Decisions, message by message in batch order (what the store did applying them one at a time):
- a message not retained moves its device's `last_seen` to now and its group to the topic's;
- a state applies when it is not older than the stored one (hub.fleet.rules.state_applies): a
  birth states the whole session, a will is merged over the last state (it says little);
- a summary or drift message is a window (hub.fleet.ledger.window_values) unless its body cannot
  be indexed; a telemetry message at or below the device's `pruned_seq` is too old for
  fleet_messages (its window still counts: windows are kept by age, not by count);
- a (device_id, seq) seen earlier in the batch is a duplicate and adds no row; the database
  dedupes against what is already stored (ON CONFLICT DO NOTHING), so a redelivery, in the batch
  or after it, is stored once and its effects applied once;
- `last_seq` follows the highest telemetry or capture seq seen (a too-old one is below
  `pruned_seq`, so it could not raise it).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from hub.capture.rules import CaptureMsg
from hub.fleet.ledger import WINDOW_KINDS, body_text, window_values
from hub.fleet.rules import Message, StateMsg, TelemetryMsg, state_applies


@dataclass
class DeviceState:
    """A devices row, changed in place while a batch is planned."""

    device_id: str
    group: str
    online: bool = False
    bd_seq: int | None = None
    last_seen: datetime | None = None
    state: str = "{}"  # JSON text of the last applied state
    last_seq: int | None = None
    pruned_seq: int | None = None

    def values(self) -> tuple[Any, ...]:
        """Everything stored, to tell which rows a batch changed."""
        return (
            self.group,
            self.online,
            self.bd_seq,
            self.last_seen,
            self.state,
            self.last_seq,
            self.pruned_seq,
        )


@dataclass(frozen=True)
class Entry:
    """A telemetry message with rows for the tables: its fleet_windows row (None: not a window,
    not indexable, or a repeat in the batch) and its fleet_messages row (None: too old, or a
    repeat in the batch)."""

    msg: TelemetryMsg
    window: dict[str, Any] | None
    message: dict[str, Any] | None


@dataclass
class Plan:
    entries: list[Entry] = field(default_factory=list)
    captures: list[CaptureMsg] = field(default_factory=list)  # for the capture sink, in order
    telemetry_devices: set[str] = field(default_factory=set)  # whose messages retention prunes
    duplicates: int = 0  # telemetry repeated within the batch
    too_old: int = 0
    states_applied: int = 0
    states_ignored: int = 0
    capture_ignored: int = 0

    def window_rows(self) -> list[dict[str, Any]]:
        return [e.window for e in self.entries if e.window is not None]

    def message_rows(self) -> list[dict[str, Any]]:
        return [e.message for e in self.entries if e.message is not None]


def first_groups(messages: Iterable[Message]) -> dict[str, str]:
    """Each device's group as its first message in the batch names it: a new devices row's."""
    groups: dict[str, str] = {}
    for msg in messages:
        groups.setdefault(msg.device_id, msg.group)
    return groups


def apply_state(device: DeviceState, msg: StateMsg) -> bool:
    """Apply a state message to the device; False when it is older than the stored one."""
    stored = None if device.bd_seq is None else (device.online, device.bd_seq)
    if not state_applies(stored, msg):
        return False
    # A birth states the whole session; a will says little, so what the device last told
    # (versions) is kept under it.
    state = dict(msg.state) if msg.online else {**json.loads(device.state or "{}"), **msg.state}
    device.online = msg.online
    device.bd_seq = msg.bd_seq
    device.group = msg.group
    device.state = json.dumps(state, sort_keys=True)
    return True


def plan_batch(
    batch: Sequence[tuple[Message, bool]], devices: dict[str, DeviceState], now: datetime, *, capture: bool
) -> Plan:
    """Plan a batch of (message, retained) pairs; `devices` must hold every device of the batch
    and is updated in place. `capture`: whether a capture sink takes capture messages."""
    plan = Plan()
    windows_seen: set[tuple[str, int]] = set()
    messages_seen: set[tuple[str, int]] = set()
    for msg, retained in batch:
        device = devices[msg.device_id]
        if not retained:
            device.last_seen = now
            device.group = msg.group
        if isinstance(msg, StateMsg):
            if apply_state(device, msg):
                plan.states_applied += 1
            else:
                plan.states_ignored += 1
            continue
        if isinstance(msg, CaptureMsg):
            if not capture:
                plan.capture_ignored += 1
                continue
            plan.captures.append(msg)
        else:
            plan.telemetry_devices.add(msg.device_id)
            too_old = device.pruned_seq is not None and msg.seq <= device.pruned_seq
            entry = _telemetry(msg, now, too_old, windows_seen, messages_seen, plan)
            if entry.window is not None or entry.message is not None:
                plan.entries.append(entry)
            if too_old:
                continue
        if device.last_seq is None or msg.seq > device.last_seq:
            device.last_seq = msg.seq
    return plan


def _telemetry(
    msg: TelemetryMsg,
    now: datetime,
    too_old: bool,
    windows_seen: set[tuple[str, int]],
    messages_seen: set[tuple[str, int]],
    plan: Plan,
) -> Entry:
    key = (msg.device_id, msg.seq)
    body: str | None = None
    window = None
    if msg.kind in WINDOW_KINDS and key not in windows_seen:
        body = body_text(msg)  # encoded (if at all) once for both tables
        window = window_values(msg, now, body)
        if window is not None:
            windows_seen.add(key)
    if too_old:
        plan.too_old += 1
        return Entry(msg, window, None)
    if key in messages_seen:
        plan.duplicates += 1
        return Entry(msg, window, None)
    messages_seen.add(key)
    row = {
        "device_id": msg.device_id,
        "seq": msg.seq,
        "kind": msg.kind,
        "ts": msg.ts,
        "received": now,
        "body": body_text(msg) if body is None else body,
    }
    return Entry(msg, window, row)


def may_need_pruning(device: DeviceState, keep: int) -> bool:
    """Whether the device may hold more than `keep` messages. Every stored message has a seq in
    (pruned_seq, last_seq] (retention refuses those at or below pruned_seq; last_seq follows
    every seq stored), so when that range is at most `keep` wide no count is needed."""
    if device.pruned_seq is None or device.last_seq is None:
        return True
    return device.last_seq - device.pruned_seq > keep
