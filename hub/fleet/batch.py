"""What a batch of messages does to the fleet's tables, decided without the database: the pure
half of `FleetStore.apply` (hub.fleet.store reads the devices, writes the rows, and raises the
alerts of what turned out to be new).

    prepared = [prepare(msg, retained) for ...]     # per message, as soon as it is parsed
    devices = {device_id: DeviceState(...)}         # the batch's devices as stored (row-locked)
    plan = plan_batch(prepared, devices, now, capture=True)
    # insert plan.window_rows() and plan.message_rows() in one statement each, learn which
    # (device_id, seq) were new, alert on those in plan.entries order, write back the devices
    # whose `values()` changed, prune the devices in plan.telemetry_devices

`prepare` reduces a parsed message to its rows and drops the body unless something after the
insert needs it (a state, a capture, an event, a drift window whose alert is on). A batch of
parsed bodies held until the batch was written (35 dicts and lists per summary) made Python's
garbage collector promote them and walk the whole heap every few batches: 45 us per message,
a third of the writer's CPU; bodies dropped as soon as their rows are made cost it nothing.

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
from hub.fleet.rules import STATE, Message, StateMsg, state_applies


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


@dataclass(frozen=True, slots=True)
class Prepared:
    """A parsed message reduced to what the store writes: its rows (without `received`, the
    batch's clock) and, only when needed after the insert, the message itself (`keep`)."""

    device_id: str
    group: str
    kind: str
    seq: int | None  # None: a state
    retained: bool
    window: dict[str, Any] | None  # its fleet_windows row: a summary or drift that can be indexed
    message: dict[str, Any] | None  # its fleet_messages row: telemetry
    keep: Message | None  # states, captures, events, drift windows whose alert is on


def prepare(msg: Message, retained: bool = False) -> Prepared:
    """The message's rows, made once. The body's text (hub.fleet.ledger.body_text: as the device
    sent it, or encoded once) is stored once: in the window row when there is one, else in the
    message row."""
    if isinstance(msg, StateMsg):
        return Prepared(msg.device_id, msg.group, STATE, None, retained, None, None, msg)
    if isinstance(msg, CaptureMsg):
        return Prepared(msg.device_id, msg.group, msg.kind, msg.seq, retained, None, None, msg)
    text = body_text(msg)
    window = window_values(msg, None, text) if msg.kind in WINDOW_KINDS else None
    # The body once: a window's message leaves it to fleet_windows (hub.fleet.store).
    body = None if window is not None else text
    row = {"device_id": msg.device_id, "seq": msg.seq, "kind": msg.kind, "ts": msg.ts, "body": body}
    keep = msg if msg.kind == "event" or (window is not None and window["alert"]) else None
    return Prepared(msg.device_id, msg.group, msg.kind, msg.seq, retained, window, row, keep)


@dataclass(frozen=True, slots=True)
class Entry:
    """A telemetry message's rows for this batch: fleet_windows (None: not a window, or a repeat
    in the batch) and fleet_messages (None: too old, or a repeat in the batch)."""

    item: Prepared
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


def first_groups(batch: Iterable[Prepared]) -> dict[str, str]:
    """Each device's group as its first message in the batch names it: a new devices row's."""
    groups: dict[str, str] = {}
    for item in batch:
        groups.setdefault(item.device_id, item.group)
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
    batch: Sequence[Prepared], devices: dict[str, DeviceState], now: datetime, *, capture: bool
) -> Plan:
    """Plan a batch; `devices` must hold every device of the batch and is updated in place.
    `capture`: whether a capture sink takes capture messages. The rows of the plan carry
    `received` = now."""
    plan = Plan()
    windows_seen: set[tuple[str, int]] = set()
    messages_seen: set[tuple[str, int]] = set()
    for item in batch:
        device = devices[item.device_id]
        if not item.retained:
            device.last_seen = now
            device.group = item.group
        if isinstance(item.keep, StateMsg):
            if apply_state(device, item.keep):
                plan.states_applied += 1
            else:
                plan.states_ignored += 1
            continue
        assert item.seq is not None  # only states have none
        if isinstance(item.keep, CaptureMsg):
            if not capture:
                plan.capture_ignored += 1
                continue
            plan.captures.append(item.keep)
        else:
            plan.telemetry_devices.add(item.device_id)
            key = (item.device_id, item.seq)
            too_old = device.pruned_seq is not None and item.seq <= device.pruned_seq
            window = message = None
            if item.window is not None and key not in windows_seen:
                windows_seen.add(key)
                window = item.window
                window["received"] = now
            if too_old:
                plan.too_old += 1
            elif key in messages_seen:
                plan.duplicates += 1
            else:
                messages_seen.add(key)
                message = item.message
                assert message is not None  # telemetry always has one
                message["received"] = now
            if window is not None or message is not None:
                plan.entries.append(Entry(item, window, message))
            if too_old:
                continue  # below pruned_seq, so it could not raise last_seq either
        if device.last_seq is None or item.seq > device.last_seq:
            device.last_seq = item.seq
    return plan


def may_need_pruning(device: DeviceState, keep: int) -> bool:
    """Whether the device may hold more than `keep` messages. Every stored message has a seq in
    (pruned_seq, last_seq] (retention refuses those at or below pruned_seq; last_seq follows
    every seq stored), so when that range is at most `keep` wide no count is needed."""
    if device.pruned_seq is None or device.last_seq is None:
        return True
    return device.last_seq - device.pruned_seq > keep
