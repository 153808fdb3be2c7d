"""The life cycle of a model version on this device: a state machine written as data.

Pure (h11's `_state.py`, mender's state machine): `step(record, event)` takes the persisted
`UpdateRecord` and one `Event`, and returns the next record and the `Action`s a runner performs.
Nothing here touches the disk, the network or a clock. The runner's contract:

1. save the record `step()` returned (`StateFile.save`: atomic and durable), THEN
2. perform its actions in order (a REPORT comes first), feeding results back as events.

So a power cut at any point leaves a saved record whose state names the work that was under way,
and `RESUME` at start-up continues from it. At start-up the runner serves `record.current` (and
nothing of `pending`) before it steps `RESUME`.

    IDLE ──▶ DOWNLOADING ──▶ VERIFYING ──▶ STAGED ──▶ PROBATION ──▶ COMMITTED ──┐
              ↺ retry           │ verify       │ load,      │ probation,             │ assignment:
                                │ failed       │ crash      │ crash loop,            │ back to DOWNLOADING
                                ▼              ▼ loop       ▼ hub rollback           │ (or hub rollback)
                             ROLLED_BACK ◀─────────────────────────────────────────────┘

Every pair allowed is in `TRANSITIONS`; any other (state, event) raises RuntimeError (misuse, as in
python-tuf): nothing is silently ignored. Every step emits one REPORT {from, to, event, version,
reason} for telemetry and status, also when the state stays the same.

Events the runner sends (`RUNNER_EVENTS`); `step()` refines two of them using the record, so the
table can state every outcome (the derived kinds are never sent by the runner):

- ASSIGNMENT_CHANGED(target, serial): the signed assignment names `target` for this device (after
  `canary.choose`). Send it when the serial or the target differs from the record's. It becomes
  ASSIGNMENT_UNCHANGED when `target` is what the device runs (or is installing), ASSIGNMENT_REFUSED
  when its hash is marked bad, HUB_ROLLBACK when it names the version kept to fall back to
  (`current` while another version is pending or on probation, `previous` otherwise): the device
  switches to it at once, without download or probation (it was committed on this device before).
- RESUME: the agent started. In PROBATION it is CRASH_DETECTED (load the candidate again, attempt
  n+1) or, once `attempts` reached `Limits.max_attempts`, CRASH_LOOP (fall back, mark bad). In
  STAGED after `max_attempts` loads it is CRASH_LOOP too (a candidate that kills the agent while it
  loads). A restart cannot be told from a crash, so every restart with the candidate loaded counts.

Decisions where the issue is silent:

- Bad hashes. A version that fails on this device (verification, load or self-test, probation,
  crash loop) is marked bad by the SHA-256 of its model file and refused while the assignment keeps
  naming it (new serials from a canary ramp, polls, restarts). When the assignment names a
  different version, every bad mark is forgiven: if the hub later names the bad version again, the
  operator chose to retry it (changed to something else and back) and the device tries once more.
  So the set only ever holds marks against the version last assigned, and stays small.
- A hub rollback (the hub now names the version the device falls back to) is obeyed at once and
  does not mark the version left bad: nothing failed here.
- A new assignment while an update is in flight abandons the pending version (not marked bad) and
  starts over towards the new target.
- `attempts` counts loads of the pending version (entering STAGED), across restarts; `retries`
  counts download retries and in-flight restarts, for the backoff of the next DOWNLOAD.
- A first update on a fresh device that fails falls back to nothing (`FALL_BACK` to None): the
  device serves no hub version until a good one comes, exactly as before the update.
- DOWNLOAD_FAILED means the failure may pass (network, hub, disk full, bytes altered in transit);
  it retries with backoff without end, serving the current version meanwhile. VERIFY_FAILED means
  the signed content itself is unusable (manifest invalid, hashes that do not bind): mark bad.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from agent.errors import StateError

FORMAT = "outpost-update-state/1"
MAX_ATTEMPTS = 3  # loads of a candidate that may end in a restart before it is given up
RETRY_BASE_S = 10.0  # first wait before retrying a failed download
RETRY_MAX_S = 900.0  # longest wait between download retries
_SHA256 = re.compile(r"[0-9a-f]{64}")


class State(StrEnum):
    IDLE = "idle"  # never updated from the hub
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    STAGED = "staged"  # verified; being installed, loaded and self-tested
    PROBATION = "probation"  # serving the candidate; the committed version stays loaded
    COMMITTED = "committed"
    ROLLED_BACK = "rolled_back"


class EventKind(StrEnum):
    # Sent by the runner.
    ASSIGNMENT_CHANGED = "assignment_changed"
    DOWNLOADED = "downloaded"
    DOWNLOAD_FAILED = "download_failed"
    VERIFIED = "verified"
    VERIFY_FAILED = "verify_failed"
    LOADED = "loaded"  # installed, loaded, self-test passed
    LOAD_FAILED = "load_failed"  # load error or self-test mismatch
    PROBATION_PASSED = "probation_passed"
    PROBATION_FAILED = "probation_failed"
    RESUME = "resume"  # the agent started
    # Derived by step() from ASSIGNMENT_CHANGED and RESUME.
    ASSIGNMENT_UNCHANGED = "assignment_unchanged"
    ASSIGNMENT_REFUSED = "assignment_refused"
    HUB_ROLLBACK = "hub_rollback"
    CRASH_DETECTED = "crash_detected"
    CRASH_LOOP = "crash_loop"


DERIVED_EVENTS = frozenset(
    {
        EventKind.ASSIGNMENT_UNCHANGED,
        EventKind.ASSIGNMENT_REFUSED,
        EventKind.HUB_ROLLBACK,
        EventKind.CRASH_DETECTED,
        EventKind.CRASH_LOOP,
    }
)
RUNNER_EVENTS = frozenset(EventKind) - DERIVED_EVENTS


class ActionKind(StrEnum):
    DOWNLOAD = "download"  # version, delay_s: wait, then fetch it into a clean staging area
    VERIFY = "verify"  # version: check the downloaded package against the signed hashes
    INSTALL_AND_LOAD = "install_and_load"  # version: install (if not yet), load, run its self-test
    SWITCH_TO = "switch_to"  # version: new requests go to it; the one serving before stays loaded
    START_PROBATION = "start_probation"  # version: a fresh ProbationTracker for it
    COMMIT = "commit"  # version: it stays serving; `leaving` (the old current) may be unloaded
    FALL_BACK = "fall_back"  # version: serve it (None: no hub version); unload `leaving` and the rest
    MARK_BAD = "mark_bad"  # version: its sha256 is now refused (already in the record)
    REPORT = "report"  # report: the transition, for events, status and metrics
    GC = "gc"  # keep: delete other installed versions of the model, and staging leftovers


PENDING_STATES = frozenset({State.DOWNLOADING, State.VERIFYING, State.STAGED, State.PROBATION})
# States in which the pending version may be loaded, so leaving it needs a FALL_BACK.
_LOADED_STATES = frozenset({State.STAGED, State.PROBATION})

S, E = State, EventKind
TRANSITIONS: dict[tuple[State, EventKind], State] = {
    # IDLE: never updated
    (S.IDLE, E.ASSIGNMENT_CHANGED): S.DOWNLOADING,
    (S.IDLE, E.RESUME): S.IDLE,
    # DOWNLOADING: DOWNLOAD(pending) under way
    (S.DOWNLOADING, E.DOWNLOADED): S.VERIFYING,
    (S.DOWNLOADING, E.DOWNLOAD_FAILED): S.DOWNLOADING,
    (S.DOWNLOADING, E.ASSIGNMENT_CHANGED): S.DOWNLOADING,
    (S.DOWNLOADING, E.ASSIGNMENT_UNCHANGED): S.DOWNLOADING,
    (S.DOWNLOADING, E.HUB_ROLLBACK): S.ROLLED_BACK,
    (S.DOWNLOADING, E.RESUME): S.DOWNLOADING,
    # VERIFYING: VERIFY(pending) under way
    (S.VERIFYING, E.VERIFIED): S.STAGED,
    (S.VERIFYING, E.VERIFY_FAILED): S.ROLLED_BACK,
    (S.VERIFYING, E.ASSIGNMENT_CHANGED): S.DOWNLOADING,
    (S.VERIFYING, E.ASSIGNMENT_UNCHANGED): S.VERIFYING,
    (S.VERIFYING, E.HUB_ROLLBACK): S.ROLLED_BACK,
    (S.VERIFYING, E.RESUME): S.DOWNLOADING,
    # STAGED: INSTALL_AND_LOAD(pending) under way
    (S.STAGED, E.LOADED): S.PROBATION,
    (S.STAGED, E.LOAD_FAILED): S.ROLLED_BACK,
    (S.STAGED, E.ASSIGNMENT_CHANGED): S.DOWNLOADING,
    (S.STAGED, E.ASSIGNMENT_UNCHANGED): S.STAGED,
    (S.STAGED, E.HUB_ROLLBACK): S.ROLLED_BACK,
    (S.STAGED, E.RESUME): S.DOWNLOADING,  # staging is swept at start: fetch again
    (S.STAGED, E.CRASH_LOOP): S.ROLLED_BACK,
    # PROBATION: the candidate serves; the committed version stays loaded
    (S.PROBATION, E.PROBATION_PASSED): S.COMMITTED,
    (S.PROBATION, E.PROBATION_FAILED): S.ROLLED_BACK,
    (S.PROBATION, E.ASSIGNMENT_CHANGED): S.DOWNLOADING,
    (S.PROBATION, E.ASSIGNMENT_UNCHANGED): S.PROBATION,
    (S.PROBATION, E.HUB_ROLLBACK): S.ROLLED_BACK,
    (S.PROBATION, E.CRASH_DETECTED): S.STAGED,  # load and self-test it again, then probation anew
    (S.PROBATION, E.CRASH_LOOP): S.ROLLED_BACK,
    # COMMITTED: resting
    (S.COMMITTED, E.ASSIGNMENT_CHANGED): S.DOWNLOADING,
    (S.COMMITTED, E.ASSIGNMENT_UNCHANGED): S.COMMITTED,
    (S.COMMITTED, E.HUB_ROLLBACK): S.ROLLED_BACK,
    (S.COMMITTED, E.RESUME): S.COMMITTED,
    # ROLLED_BACK: resting
    (S.ROLLED_BACK, E.ASSIGNMENT_CHANGED): S.DOWNLOADING,
    (S.ROLLED_BACK, E.ASSIGNMENT_UNCHANGED): S.ROLLED_BACK,
    (S.ROLLED_BACK, E.ASSIGNMENT_REFUSED): S.ROLLED_BACK,
    (S.ROLLED_BACK, E.HUB_ROLLBACK): S.ROLLED_BACK,
    (S.ROLLED_BACK, E.RESUME): S.ROLLED_BACK,
}
del S, E


@dataclass(frozen=True)
class Limits:
    """The machine's safety limits, as named defaults."""

    max_attempts: int = MAX_ATTEMPTS
    retry_base_s: float = RETRY_BASE_S
    retry_max_s: float = RETRY_MAX_S

    def retry_delay(self, retries: int) -> float:
        """Wait before the `retries`-th retry: doubling from retry_base_s, at most retry_max_s.

        The runner adds jitter; this stays deterministic so tests can state it.
        """
        if retries <= 0:
            return 0.0
        return min(self.retry_max_s, self.retry_base_s * 2.0 ** min(retries - 1, 62))


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class VersionRef:
    """One model version, as the device knows it: identity is all three fields."""

    model: str
    version: int
    sha256: str  # of the model file: what the assignment signs, and what "bad" marks

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"version: model must be a non-empty string, not {self.model!r}")
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 1:
            raise ValueError(f"version: version must be a positive integer, not {self.version!r}")
        if not isinstance(self.sha256, str) or not _SHA256.fullmatch(self.sha256):
            raise ValueError(f"version: sha256 must be 64 lowercase hex digits, not {self.sha256!r}")

    def __str__(self) -> str:
        return f"{self.model} v{self.version} ({self.sha256[:12]})"

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "version": self.version, "sha256": self.sha256}

    @classmethod
    def from_json(cls, doc: Any) -> VersionRef:
        """Raises ValueError on anything but {"model", "version", "sha256"} of the right types."""
        if not isinstance(doc, dict) or set(doc) != {"model", "version", "sha256"}:
            raise ValueError(f"version: expected an object with model, version and sha256, got {doc!r}")
        return cls(doc["model"], doc["version"], doc["sha256"])


@dataclass(frozen=True)
class Event:
    """What happened. `version`: the target of ASSIGNMENT_CHANGED; for results, optionally the
    pending version they are about (checked: a result about another version is a runner bug)."""

    kind: EventKind
    version: VersionRef | None = None
    serial: int | None = None  # ASSIGNMENT_CHANGED: the assignment's serial
    reason: str = ""  # failures: what went wrong, in words for a person

    @classmethod
    def assignment(cls, target: VersionRef, serial: int) -> Event:
        return cls(EventKind.ASSIGNMENT_CHANGED, version=target, serial=serial)


@dataclass(frozen=True)
class Action:
    """Something for the runner to do; the arguments used depend on `kind` (see ActionKind)."""

    kind: ActionKind
    version: VersionRef | None = None
    leaving: VersionRef | None = None  # COMMIT, FALL_BACK: the version that stops serving
    keep: tuple[VersionRef, ...] = ()  # GC
    delay_s: float = 0.0  # DOWNLOAD
    report: dict[str, Any] = field(default_factory=dict)  # REPORT


@dataclass(frozen=True)
class UpdateRecord:
    """The persisted state of updates on this device; saved before every step's side effects.

    Invariants (checked on construction, so a bug or a doctored file cannot produce others):
    `pending` is set exactly in DOWNLOADING, VERIFYING, STAGED and PROBATION; IDLE knows no
    version; `previous` only with `current`; pending, current and previous differ; a pending
    version is never marked bad; STAGED and PROBATION have loaded it at least once.
    """

    state: State = State.IDLE
    pending: VersionRef | None = None  # the version being brought in
    current: VersionRef | None = None  # the committed version: served, and the fallback
    previous: VersionRef | None = None  # the one before, kept on disk for a hub rollback
    attempts: int = 0  # loads of `pending` (crash-loop counter)
    retries: int = 0  # download retries and in-flight restarts of `pending` (backoff)
    bad: frozenset[str] = frozenset()  # model sha256s refused while the assignment names them
    assigned: VersionRef | None = None  # what the last assignment named for this device
    assignment_serial: int | None = None
    reason: str = ""  # why the last step happened, for status

    def __post_init__(self) -> None:
        if not isinstance(self.state, State):
            raise ValueError(f"record: unknown state {self.state!r}")
        for name in ("pending", "current", "previous", "assigned"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, VersionRef):
                raise ValueError(f"record: {name} must be a version or null")
        if (self.pending is not None) != (self.state in PENDING_STATES):
            which = "has a pending version" if self.pending is not None else "has no pending version"
            raise ValueError(f"record: state {self.state.value} {which}")
        if self.state is State.IDLE and (self.current or self.previous or self.assigned or self.bad):
            raise ValueError("record: idle means never updated, yet versions are recorded")
        if self.previous is not None and self.current is None:
            raise ValueError("record: a previous version without a current one")
        versions = [v for v in (self.pending, self.current, self.previous) if v is not None]
        if len(set(versions)) != len(versions):
            raise ValueError("record: pending, current and previous must be different versions")
        for name in ("attempts", "retries"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"record: {name} must be a non-negative integer")
        if self.state in _LOADED_STATES and self.attempts < 1:
            raise ValueError(f"record: {self.state} with no load attempt counted")
        if not isinstance(self.bad, frozenset) or not all(
            isinstance(h, str) and _SHA256.fullmatch(h) for h in self.bad
        ):
            raise ValueError("record: bad must be a set of SHA-256 hex digests")
        if self.pending is not None and self.pending.sha256 in self.bad:
            raise ValueError("record: the pending version is marked bad")
        serial = self.assignment_serial
        if serial is not None and (isinstance(serial, bool) or not isinstance(serial, int) or serial < 0):
            raise ValueError("record: assignment_serial must be a non-negative integer or null")
        if not isinstance(self.reason, str):
            raise ValueError("record: reason must be a string")

    @property
    def kept(self) -> tuple[VersionRef, ...]:
        """The versions that must stay on disk: current, previous and pending."""
        return tuple(v for v in (self.current, self.previous, self.pending) if v is not None)

    def to_json(self) -> dict[str, Any]:
        def ref(v: VersionRef | None) -> dict[str, Any] | None:
            return v.to_json() if v is not None else None

        return {
            "format": FORMAT,
            "state": self.state.value,
            "pending": ref(self.pending),
            "current": ref(self.current),
            "previous": ref(self.previous),
            "attempts": self.attempts,
            "retries": self.retries,
            "bad": sorted(self.bad),
            "assigned": ref(self.assigned),
            "assignment_serial": self.assignment_serial,
            "reason": self.reason,
        }

    @classmethod
    def from_json(cls, doc: Any) -> UpdateRecord:
        """The record `to_json` wrote; StateError naming what is wrong otherwise.

        Every key of the format is required; unknown keys are ignored (a newer agent's extras).
        """
        if not isinstance(doc, dict):
            raise StateError("update state: the document must be a JSON object")
        if doc.get("format") != FORMAT:
            raise StateError(
                f"update state: format {doc.get('format')!r} is not supported (this agent reads {FORMAT})"
            )
        missing = sorted(set(cls().to_json()) - set(doc))
        if missing:
            raise StateError(f"update state: {missing[0]} is missing")
        try:
            state = State(doc["state"])
        except ValueError:
            raise StateError(f"update state: unknown state {doc['state']!r}") from None

        def ref(key: str) -> VersionRef | None:
            return None if doc[key] is None else VersionRef.from_json(doc[key])

        bad = doc["bad"]
        if not isinstance(bad, list):
            raise StateError("update state: bad must be a list")
        try:
            return cls(
                state=state,
                pending=ref("pending"),
                current=ref("current"),
                previous=ref("previous"),
                attempts=doc["attempts"],
                retries=doc["retries"],
                bad=frozenset(bad),
                assigned=ref("assigned"),
                assignment_serial=doc["assignment_serial"],
                reason=doc["reason"],
            )
        except (ValueError, TypeError) as exc:  # TypeError: unhashable items in `bad`
            raise StateError(f"update state: {exc}") from exc


def step(
    record: UpdateRecord, event: Event, *, limits: Limits = DEFAULT_LIMITS
) -> tuple[UpdateRecord, list[Action]]:
    """The next record and the actions to perform, in order. Save the record first.

    RuntimeError when the event is not valid in the record's state, is a derived kind, or is a
    result about another version than the pending one: all runner bugs, never remote data.
    """
    _check_event(record, event)
    kind = _classify(record, event, limits)
    try:
        to_state = TRANSITIONS[(record.state, kind)]
    except KeyError:
        raise RuntimeError(
            f"update life cycle: event {kind.value!r} is not valid in state {record.state.value!r}"
        ) from None
    effect = _EFFECTS[kind]
    changes, actions, subject, reason = effect(record, event, limits)
    new = replace(record, state=to_state, reason=reason, **changes)
    report = {
        "from": record.state.value,
        "to": to_state.value,
        "event": kind.value,
        "version": subject.to_json() if subject is not None else None,
        "reason": reason,
    }
    return new, [Action(ActionKind.REPORT, report=report), *actions]


def _check_event(record: UpdateRecord, event: Event) -> None:
    if event.kind in DERIVED_EVENTS:
        raise RuntimeError(
            f"update life cycle: {event.kind.value!r} is derived by step(); "
            "send assignment_changed or resume instead"
        )
    if event.kind is EventKind.ASSIGNMENT_CHANGED:
        serial = event.serial
        if event.version is None or not isinstance(serial, int) or isinstance(serial, bool) or serial < 0:
            raise RuntimeError("update life cycle: assignment_changed needs a target version and a serial")
    elif event.version is not None and event.version != record.pending:
        raise RuntimeError(
            f"update life cycle: {event.kind.value!r} is about {event.version}, "
            f"but the pending version is {record.pending}"
        )


def _forgiven(record: UpdateRecord, target: VersionRef) -> frozenset[str]:
    """The bad set once the assignment names `target`: marks last only while it names the same."""
    return record.bad if target == record.assigned else frozenset()


def _classify(record: UpdateRecord, event: Event, limits: Limits) -> EventKind:
    if event.kind is EventKind.ASSIGNMENT_CHANGED:
        target = _target(event)
        if target == (record.pending if record.pending is not None else record.current):
            return EventKind.ASSIGNMENT_UNCHANGED
        if target.sha256 in _forgiven(record, target):
            return EventKind.ASSIGNMENT_REFUSED
        fallback = record.current if record.pending is not None else None
        if target in (fallback, record.previous):
            return EventKind.HUB_ROLLBACK
        return EventKind.ASSIGNMENT_CHANGED
    if event.kind is EventKind.RESUME and record.state in _LOADED_STATES:
        if record.attempts >= limits.max_attempts:
            return EventKind.CRASH_LOOP
        if record.state is State.PROBATION:
            return EventKind.CRASH_DETECTED
    return event.kind


# An effect returns: the record's changed fields, the actions (REPORT is added by step), the
# version the transition is about, and the reason, in words.
Effect = tuple[dict[str, Any], list[Action], VersionRef | None, str]


def _pending(record: UpdateRecord) -> VersionRef:
    if record.pending is None:  # pragma: no cover - the table only routes here with a pending version
        raise RuntimeError("update life cycle: no pending version")
    return record.pending


def _gc(*keep: VersionRef | None) -> Action:
    return Action(ActionKind.GC, keep=tuple(v for v in keep if v is not None))


def _target(event: Event) -> VersionRef:
    if event.version is None:  # pragma: no cover - _check_event refuses such an assignment
        raise RuntimeError("update life cycle: an assignment without a target")
    return event.version


def _assignment_fields(record: UpdateRecord, event: Event) -> dict[str, Any]:
    target = _target(event)
    return {"assigned": target, "assignment_serial": event.serial, "bad": _forgiven(record, target)}


def _assignment_changed(record: UpdateRecord, event: Event, limits: Limits) -> Effect:
    target = _target(event)
    actions: list[Action] = []
    reason = f"assignment {event.serial} names {target}"
    if record.pending is not None:
        reason += f"; abandoning {record.pending}"
        if record.state in _LOADED_STATES:
            actions.append(Action(ActionKind.FALL_BACK, version=record.current, leaving=record.pending))
        actions.append(_gc(record.current, record.previous))
    actions.append(Action(ActionKind.DOWNLOAD, version=target))
    changes = {**_assignment_fields(record, event), "pending": target, "attempts": 0, "retries": 0}
    return changes, actions, target, reason


def _assignment_unchanged(record: UpdateRecord, event: Event, limits: Limits) -> Effect:
    what = "being installed" if record.pending is not None else "the current version"
    reason = f"assignment {event.serial} names {event.version}, {what}"
    return _assignment_fields(record, event), [], event.version, reason


def _assignment_refused(record: UpdateRecord, event: Event, limits: Limits) -> Effect:
    reason = (
        f"assignment {event.serial} names {event.version}, which failed on this device: refused "
        "until the hub assigns another version"
    )
    return _assignment_fields(record, event), [], event.version, reason


def _hub_rollback(record: UpdateRecord, event: Event, limits: Limits) -> Effect:
    target = _target(event)
    changes = {**_assignment_fields(record, event), "pending": None, "attempts": 0, "retries": 0}
    actions: list[Action] = []
    reason = f"hub rollback: assignment {event.serial} names {target}"
    serving = record.pending if record.state in _LOADED_STATES else record.current
    if target == record.previous:  # swap: the current version becomes the previous one
        changes.update(current=record.previous, previous=record.current)
        actions.append(Action(ActionKind.FALL_BACK, version=target, leaving=serving))
    elif record.state in _LOADED_STATES:  # back to current, which still serves or stays loaded
        actions.append(Action(ActionKind.FALL_BACK, version=target, leaving=serving))
    if record.pending is not None:
        reason += f"; abandoning {record.pending}"
    actions.append(_gc(changes.get("current", record.current), changes.get("previous", record.previous)))
    return changes, actions, target, reason


def _downloaded(record: UpdateRecord, event: Event, limits: Limits) -> Effect:
    pending = _pending(record)
    return {"retries": 0}, [Action(ActionKind.VERIFY, version=pending)], pending, f"downloaded {pending}"


def _download_failed(record: UpdateRecord, event: Event, limits: Limits) -> Effect:
    pending = _pending(record)
    retries = record.retries + 1
    delay = limits.retry_delay(retries)
    reason = (
        f"download of {pending} failed ({event.reason or 'no reason given'}); retry {retries} in {delay:g}s"
    )
    return (
        {"retries": retries},
        [Action(ActionKind.DOWNLOAD, version=pending, delay_s=delay)],
        pending,
        reason,
    )


def _verified(record: UpdateRecord, event: Event, limits: Limits) -> Effect:
    pending = _pending(record)
    attempts = record.attempts + 1
    reason = f"verified {pending}; loading it (attempt {attempts} of {limits.max_attempts})"
    return {"attempts": attempts}, [Action(ActionKind.INSTALL_AND_LOAD, version=pending)], pending, reason


def _loaded(record: UpdateRecord, event: Event, limits: Limits) -> Effect:
    pending = _pending(record)
    actions = [
        Action(ActionKind.SWITCH_TO, version=pending),
        Action(ActionKind.START_PROBATION, version=pending),
    ]
    return {}, actions, pending, f"{pending} loaded and passed its self-test; on probation"


def _probation_passed(record: UpdateRecord, event: Event, limits: Limits) -> Effect:
    pending = _pending(record)
    changes = {"pending": None, "current": pending, "previous": record.current, "attempts": 0, "retries": 0}
    actions = [
        Action(ActionKind.COMMIT, version=pending, leaving=record.current),
        _gc(pending, record.current),
    ]
    reason = f"{pending} passed probation" + (f": {event.reason}" if event.reason else "")
    return changes, actions, pending, reason


def _failed(what: str) -> Callable[[UpdateRecord, Event, Limits], Effect]:
    """A local failure of the pending version: back to current, mark it bad, clean up."""

    def effect(record: UpdateRecord, event: Event, limits: Limits) -> Effect:
        pending = _pending(record)
        actions = [Action(ActionKind.MARK_BAD, version=pending), _gc(record.current, record.previous)]
        if record.state in _LOADED_STATES:
            actions.insert(0, Action(ActionKind.FALL_BACK, version=record.current, leaving=pending))
        detail = event.reason or "no reason given"
        if event.kind is EventKind.RESUME:
            detail = f"the agent restarted {record.attempts} times with it loaded"
        changes = {"pending": None, "attempts": 0, "retries": 0, "bad": record.bad | {pending.sha256}}
        return changes, actions, pending, f"{pending} {what}: {detail}"

    return effect


def _crash_detected(record: UpdateRecord, event: Event, limits: Limits) -> Effect:
    pending = _pending(record)
    attempts = record.attempts + 1
    reason = (
        f"restarted during the probation of {pending}; loading it again ({attempts} of {limits.max_attempts})"
    )
    return {"attempts": attempts}, [Action(ActionKind.INSTALL_AND_LOAD, version=pending)], pending, reason


def _resume(record: UpdateRecord, event: Event, limits: Limits) -> Effect:
    if record.pending is None:  # a resting state: nothing to redo
        return {}, [], record.current, f"started in state {record.state.value}"
    retries = record.retries + 1
    delay = limits.retry_delay(retries)
    reason = f"restarted in state {record.state.value}: downloading {record.pending} again"
    action = Action(ActionKind.DOWNLOAD, version=record.pending, delay_s=delay)
    return {"retries": retries}, [action], record.pending, reason


_EFFECTS: dict[EventKind, Callable[[UpdateRecord, Event, Limits], Effect]] = {
    EventKind.ASSIGNMENT_CHANGED: _assignment_changed,
    EventKind.ASSIGNMENT_UNCHANGED: _assignment_unchanged,
    EventKind.ASSIGNMENT_REFUSED: _assignment_refused,
    EventKind.HUB_ROLLBACK: _hub_rollback,
    EventKind.DOWNLOADED: _downloaded,
    EventKind.DOWNLOAD_FAILED: _download_failed,
    EventKind.VERIFIED: _verified,
    EventKind.VERIFY_FAILED: _failed("failed verification"),
    EventKind.LOADED: _loaded,
    EventKind.LOAD_FAILED: _failed("failed to load or failed its self-test"),
    EventKind.PROBATION_PASSED: _probation_passed,
    EventKind.PROBATION_FAILED: _failed("failed probation"),
    EventKind.CRASH_DETECTED: _crash_detected,
    EventKind.CRASH_LOOP: _failed("is in a crash loop"),
    EventKind.RESUME: _resume,
}
