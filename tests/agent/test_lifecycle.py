"""agent.update.lifecycle and state_file: the update state machine, driven by tables of cases.

Mender's habit: each case names a starting point, the events in order, the chain of states
expected after each, and the side effects (actions) that matter. A second table injects a power
loss in each named state: the record goes through StateFile (disk, JSON) and the agent resumes.
Every (state, event) pair of TRANSITIONS is exercised by these tables (checked below), and every
other pair raises.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import StateError, UpdateError
from agent.update import (
    TRANSITIONS,
    Action,
    ActionKind,
    Event,
    EventKind,
    Limits,
    State,
    StateFile,
    UpdateRecord,
    VersionRef,
    step,
)
from agent.update.lifecycle import DERIVED_EVENTS, FORMAT, RUNNER_EVENTS

K = EventKind
S = State


def ver(n: int) -> VersionRef:
    return VersionRef("iris", n, hashlib.sha256(b"iris model v%d" % n).hexdigest())


V1, V2, V3, V4 = ver(1), ver(2), ver(3), ver(4)


def assign(v: VersionRef, serial: int) -> Event:
    return Event.assignment(v, serial)


def ev(kind: EventKind, reason: str = "") -> Event:
    return Event(kind, reason=reason)


def fmt(action: Action) -> str:
    """An action in a few characters: 'download v2', 'fall_back v1', 'gc[v2,v1]'."""
    if action.kind is ActionKind.GC:
        return "gc[" + ",".join(f"v{v.version}" for v in action.keep) + "]"
    name = f"v{action.version.version}" if action.version is not None else "-"
    return f"{action.kind.value} {name}"


def run(
    record: UpdateRecord, events: list[Event]
) -> tuple[UpdateRecord, list[State], list[str], list[Action]]:
    """Feed events in order; the states after each, the non-REPORT actions (short), all actions."""
    states, short, every = [], [], []
    for event in events:
        record, actions = step(record, event)
        assert actions[0].kind is ActionKind.REPORT  # every step reports, first
        assert all(a.kind is not ActionKind.REPORT for a in actions[1:])
        states.append(record.state)
        short += [fmt(a) for a in actions[1:]]
        every += actions
    return record, states, short, every


def updated(n: int) -> list[str]:
    """The actions of an update to v<n> from the assignment to its probation."""
    return [
        f"download v{n}",
        f"verify v{n}",
        f"install_and_load v{n}",
        f"switch_to v{n}",
        f"start_probation v{n}",
    ]


FRESH = UpdateRecord()
UPDATE = [ev(K.DOWNLOADED), ev(K.VERIFIED), ev(K.LOADED)]  # after an assignment: up to PROBATION
TO_PROBATION = [S.DOWNLOADING, S.VERIFYING, S.STAGED, S.PROBATION]


def committed(current: VersionRef, previous: VersionRef | None = None, serial: int = 1) -> UpdateRecord:
    return UpdateRecord(
        state=S.COMMITTED, current=current, previous=previous, assigned=current, assignment_serial=serial
    )


ON_V1 = committed(V1)
ON_V2 = committed(V2, V1, serial=2)
# v3 failed on probation while v2 was committed (v1 before it): resting, v3 marked bad
V3_FAILED = replace(ON_V2, state=S.ROLLED_BACK, assigned=V3, assignment_serial=3, bad=frozenset({V3.sha256}))


@dataclass(frozen=True)
class Case:
    id: str
    start: UpdateRecord
    events: list[Event]
    states: list[State]  # after each event
    actions: list[str]  # every action but REPORT, in order (see fmt)
    current: VersionRef | None  # what the device serves at the end
    bad: frozenset[str] = frozenset()


CASES = [
    Case(
        "happy-path-first-install",
        FRESH,
        [assign(V1, 1), *UPDATE, ev(K.PROBATION_PASSED)],
        [*TO_PROBATION, S.COMMITTED],
        [*updated(1), "commit v1", "gc[v1]"],
        current=V1,
    ),
    Case(
        "happy-path-update-keeps-previous",
        ON_V1,
        [assign(V2, 2), *UPDATE, ev(K.PROBATION_PASSED)],
        [*TO_PROBATION, S.COMMITTED],
        [*updated(2), "commit v2", "gc[v2,v1]"],
        current=V2,
    ),
    Case(
        "third-version-gc-drops-the-oldest",
        ON_V2,
        [assign(V3, 3), *UPDATE, ev(K.PROBATION_PASSED)],
        [*TO_PROBATION, S.COMMITTED],
        [*updated(3), "commit v3", "gc[v3,v2]"],
        current=V3,
    ),
    Case(
        "download-failure-stays-on-current-and-retries",
        ON_V1,
        [assign(V2, 2), ev(K.DOWNLOAD_FAILED, "hub unreachable"), ev(K.DOWNLOAD_FAILED), *UPDATE],
        [S.DOWNLOADING, S.DOWNLOADING, S.DOWNLOADING, *TO_PROBATION[1:]],
        ["download v2", "download v2", *updated(2)],
        current=V1,
    ),
    Case(
        "verify-failure-marks-bad",
        ON_V1,
        [assign(V2, 2), ev(K.DOWNLOADED), ev(K.VERIFY_FAILED, "manifest does not bind the model")],
        [S.DOWNLOADING, S.VERIFYING, S.ROLLED_BACK],
        ["download v2", "verify v2", "mark_bad v2", "gc[v1]"],
        current=V1,
        bad=frozenset({V2.sha256}),
    ),
    Case(
        "load-failure-falls-back-and-marks-bad",
        ON_V1,
        [assign(V2, 2), ev(K.DOWNLOADED), ev(K.VERIFIED), ev(K.LOAD_FAILED, "onnxruntime: invalid graph")],
        [S.DOWNLOADING, S.VERIFYING, S.STAGED, S.ROLLED_BACK],
        ["download v2", "verify v2", "install_and_load v2", "fall_back v1", "mark_bad v2", "gc[v1]"],
        current=V1,
        bad=frozenset({V2.sha256}),
    ),
    Case(
        "self-test-mismatch-falls-back-and-marks-bad",
        ON_V2,
        [assign(V3, 3), ev(K.DOWNLOADED), ev(K.VERIFIED), ev(K.LOAD_FAILED, "self-test: output y differs")],
        [S.DOWNLOADING, S.VERIFYING, S.STAGED, S.ROLLED_BACK],
        ["download v3", "verify v3", "install_and_load v3", "fall_back v2", "mark_bad v3", "gc[v2,v1]"],
        current=V2,
        bad=frozenset({V3.sha256}),
    ),
    Case(
        "probation-error-rate-falls-back",
        ON_V1,
        [assign(V2, 2), *UPDATE, ev(K.PROBATION_FAILED, "error rate 7.0% over 2.0% after 120 requests")],
        [*TO_PROBATION, S.ROLLED_BACK],
        [*updated(2), "fall_back v1", "mark_bad v2", "gc[v1]"],
        current=V1,
        bad=frozenset({V2.sha256}),
    ),
    Case(
        "probation-latency-falls-back",
        ON_V2,
        [
            assign(V3, 3),
            *UPDATE,
            ev(K.PROBATION_FAILED, "p50 latency 3.1x the previous version's (max 2.0x)"),
        ],
        [*TO_PROBATION, S.ROLLED_BACK],
        [*updated(3), "fall_back v2", "mark_bad v3", "gc[v2,v1]"],
        current=V2,
        bad=frozenset({V3.sha256}),
    ),
    Case(
        "first-install-fails-falls-back-to-nothing",
        FRESH,
        [assign(V1, 1), *UPDATE, ev(K.PROBATION_FAILED, "error rate")],
        [*TO_PROBATION, S.ROLLED_BACK],
        [*updated(1), "fall_back -", "mark_bad v1", "gc[]"],
        current=None,
        bad=frozenset({V1.sha256}),
    ),
    Case(
        "hub-rollback-during-probation",
        ON_V1,
        [assign(V2, 2), *UPDATE, assign(V1, 3)],
        [*TO_PROBATION, S.ROLLED_BACK],
        [*updated(2), "fall_back v1", "gc[v1]"],
        current=V1,  # and v2 is not marked bad: nothing failed here
    ),
    Case(
        "hub-rollback-after-commit-swaps-to-previous",
        ON_V2,
        [assign(V1, 3)],
        [S.ROLLED_BACK],
        ["fall_back v1", "gc[v1,v2]"],
        current=V1,
    ),
    Case(
        "hub-rollback-while-downloading",
        ON_V1,
        [assign(V2, 2), assign(V1, 3)],
        [S.DOWNLOADING, S.ROLLED_BACK],
        ["download v2", "gc[v1]"],
        current=V1,
    ),
    Case(
        "hub-rollback-while-verifying",
        ON_V1,
        [assign(V2, 2), ev(K.DOWNLOADED), assign(V1, 3)],
        [S.DOWNLOADING, S.VERIFYING, S.ROLLED_BACK],
        ["download v2", "verify v2", "gc[v1]"],
        current=V1,
    ),
    Case(
        "hub-rollback-while-staged",
        ON_V1,
        [assign(V2, 2), ev(K.DOWNLOADED), ev(K.VERIFIED), assign(V1, 3)],
        [S.DOWNLOADING, S.VERIFYING, S.STAGED, S.ROLLED_BACK],
        ["download v2", "verify v2", "install_and_load v2", "fall_back v1", "gc[v1]"],
        current=V1,
    ),
    Case(
        "hub-rollback-to-previous-while-downloading",
        ON_V2,
        [assign(V3, 3), assign(V1, 4)],
        [S.DOWNLOADING, S.ROLLED_BACK],
        ["download v3", "fall_back v1", "gc[v1,v2]"],
        current=V1,
    ),
    Case(
        "hub-rollback-after-a-local-failure",
        V3_FAILED,
        [assign(V1, 4)],
        [S.ROLLED_BACK],
        ["fall_back v1", "gc[v1,v2]"],
        current=V1,  # the assignment moved away from v3: its mark is forgiven
    ),
    Case(
        "crash-loop-in-probation",
        ON_V1,
        [assign(V2, 2), *UPDATE, ev(K.RESUME), ev(K.LOADED), ev(K.RESUME), ev(K.LOADED), ev(K.RESUME)],
        [*TO_PROBATION, S.STAGED, S.PROBATION, S.STAGED, S.PROBATION, S.ROLLED_BACK],
        [
            *updated(2),
            *["install_and_load v2", "switch_to v2", "start_probation v2"] * 2,
            *["fall_back v1", "mark_bad v2", "gc[v1]"],
        ],
        current=V1,
        bad=frozenset({V2.sha256}),
    ),
    Case(
        "crash-loop-while-loading",
        ON_V1,
        [assign(V2, 2)] + [ev(K.DOWNLOADED), ev(K.VERIFIED), ev(K.RESUME)] * 3,
        [S.DOWNLOADING] + [S.VERIFYING, S.STAGED, S.DOWNLOADING] * 2 + [S.VERIFYING, S.STAGED, S.ROLLED_BACK],
        ["download v2"]
        + ["verify v2", "install_and_load v2", "download v2"] * 2
        + ["verify v2", "install_and_load v2", "fall_back v1", "mark_bad v2", "gc[v1]"],
        current=V1,
        bad=frozenset({V2.sha256}),
    ),
    Case(
        "bad-hash-refused-until-the-assignment-changes-and-back",
        V3_FAILED,
        [assign(V3, 4), assign(V3, 5), assign(V2, 6), assign(V3, 7)],
        [S.ROLLED_BACK, S.ROLLED_BACK, S.ROLLED_BACK, S.DOWNLOADING],
        ["download v3"],  # refused twice (no download), then tried again after v2 was assigned
        current=V2,
    ),
    Case(
        "bad-hash-a-different-target-is-tried",
        V3_FAILED,
        [assign(V4, 4), *UPDATE, ev(K.PROBATION_PASSED)],
        [*TO_PROBATION, S.COMMITTED],
        [*updated(4), "commit v4", "gc[v4,v2]"],
        current=V4,
    ),
    Case(
        "new-serial-same-version-is-unchanged",
        ON_V1,
        [assign(V1, 2), ev(K.RESUME)],
        [S.COMMITTED, S.COMMITTED],
        [],
        current=V1,
    ),
    Case(
        "same-target-while-in-flight-is-unchanged",
        ON_V1,
        [
            assign(V2, 2),
            assign(V2, 3),
            ev(K.DOWNLOADED),
            assign(V2, 4),
            ev(K.VERIFIED),
            assign(V2, 5),
            ev(K.LOADED),
            assign(V2, 6),
            ev(K.PROBATION_PASSED),
        ],
        [
            S.DOWNLOADING,
            S.DOWNLOADING,
            S.VERIFYING,
            S.VERIFYING,
            S.STAGED,
            S.STAGED,
            S.PROBATION,
            S.PROBATION,
            S.COMMITTED,
        ],
        [*updated(2), "commit v2", "gc[v2,v1]"],
        current=V2,
    ),
    Case(
        "new-target-while-downloading-starts-over",
        ON_V1,
        [assign(V2, 2), assign(V3, 3), ev(K.DOWNLOADED)],
        [S.DOWNLOADING, S.DOWNLOADING, S.VERIFYING],
        ["download v2", "gc[v1]", "download v3", "verify v3"],
        current=V1,
    ),
    Case(
        "new-target-while-verifying-starts-over",
        ON_V1,
        [assign(V2, 2), ev(K.DOWNLOADED), assign(V3, 3)],
        [S.DOWNLOADING, S.VERIFYING, S.DOWNLOADING],
        ["download v2", "verify v2", "gc[v1]", "download v3"],
        current=V1,
    ),
    Case(
        "new-target-while-staged-starts-over",
        ON_V1,
        [assign(V2, 2), ev(K.DOWNLOADED), ev(K.VERIFIED), assign(V3, 3)],
        [S.DOWNLOADING, S.VERIFYING, S.STAGED, S.DOWNLOADING],
        ["download v2", "verify v2", "install_and_load v2", "fall_back v1", "gc[v1]", "download v3"],
        current=V1,
    ),
    Case(
        "new-target-during-probation-abandons-it-unmarked",
        ON_V1,
        [assign(V2, 2), *UPDATE, assign(V3, 3)],
        [*TO_PROBATION, S.DOWNLOADING],
        [*updated(2), "fall_back v1", "gc[v1]", "download v3"],
        current=V1,
    ),
    Case(
        "hub-rollback-during-probation-to-previous",
        ON_V2,
        [assign(V3, 3), *UPDATE, assign(V1, 4)],
        [*TO_PROBATION, S.ROLLED_BACK],
        [*updated(3), "fall_back v1", "gc[v1,v2]"],
        current=V1,
    ),
    Case(
        "after-a-failure-the-current-version-assigned-is-unchanged",
        V3_FAILED,
        [assign(V2, 4), ev(K.RESUME)],
        [S.ROLLED_BACK, S.ROLLED_BACK],
        [],
        current=V2,
    ),
    Case(
        "after-a-failure-a-new-version-goes-through",
        V3_FAILED,
        [assign(V4, 4)],
        [S.DOWNLOADING],
        ["download v4"],
        current=V2,
    ),
    Case(
        "idle-resume-does-nothing",
        FRESH,
        [ev(K.RESUME)],
        [S.IDLE],
        [],
        current=None,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_chain(case: Case) -> None:
    record, states, actions, _ = run(case.start, case.events)
    assert states == case.states
    assert actions == case.actions
    assert record.current == case.current
    assert record.bad == case.bad


def test_a_hub_rollback_after_commit_keeps_the_version_left_as_previous() -> None:
    record, _, _, every = run(ON_V2, [assign(V1, 3)])
    assert (record.current, record.previous, record.assigned) == (V1, V2, V1)
    fall_back = next(a for a in every if a.kind is ActionKind.FALL_BACK)
    assert (fall_back.version, fall_back.leaving) == (V1, V2)


def test_commit_names_the_version_that_becomes_previous() -> None:
    record, _, _, every = run(ON_V1, [assign(V2, 2), *UPDATE, ev(K.PROBATION_PASSED)])
    commit = next(a for a in every if a.kind is ActionKind.COMMIT)
    assert (commit.version, commit.leaving) == (V2, V1)
    assert (record.current, record.previous, record.pending, record.attempts) == (V2, V1, None, 0)


def test_download_retries_back_off_and_the_counter_resets_on_success() -> None:
    limits = Limits(retry_base_s=10.0, retry_max_s=60.0)
    record, _ = step(ON_V1, assign(V2, 2), limits=limits)
    delays = []
    for _ in range(5):
        record, actions = step(record, ev(K.DOWNLOAD_FAILED, "timeout"), limits=limits)
        delays.append(actions[1].delay_s)
    assert delays == [10.0, 20.0, 40.0, 60.0, 60.0]
    assert record.retries == 5 and record.current == V1
    assert "timeout" in record.reason
    record, _ = step(record, ev(K.DOWNLOADED), limits=limits)
    assert record.retries == 0


def test_reports_carry_from_to_event_version_and_reason() -> None:
    _, _, _, every = run(ON_V1, [assign(V2, 2), *UPDATE, ev(K.PROBATION_FAILED, "error rate 7.0% over 2.0%")])
    reports = [a.report for a in every if a.kind is ActionKind.REPORT]
    assert [(r["from"], r["to"], r["event"]) for r in reports] == [
        ("committed", "downloading", "assignment_changed"),
        ("downloading", "verifying", "downloaded"),
        ("verifying", "staged", "verified"),
        ("staged", "probation", "loaded"),
        ("probation", "rolled_back", "probation_failed"),
    ]
    assert all(set(r) == {"from", "to", "event", "version", "reason"} for r in reports)
    assert all(r["version"] == V2.to_json() for r in reports)
    assert "error rate 7.0% over 2.0%" in reports[-1]["reason"]
    json.dumps(reports)  # plain JSON values, ready for MQTT


def test_a_refused_assignment_is_reported() -> None:
    record, actions = step(V3_FAILED, assign(V3, 4))
    assert [a.kind for a in actions] == [ActionKind.REPORT]
    assert actions[0].report["event"] == "assignment_refused"
    assert "refused" in record.reason and record.assignment_serial == 4
    assert record.bad == frozenset({V3.sha256})


# ---- power loss in each named state: persist through StateFile, restart, RESUME -----------------


@dataclass(frozen=True)
class PowerLoss:
    id: str
    start: UpdateRecord
    before: list[Event]  # the events that lead to the state where power is lost
    lost_in: State
    resume_to: State
    resume_actions: list[str]
    after: list[Event]  # the rest, after the restart
    end: State
    current: VersionRef | None


POWER_LOSSES = [
    PowerLoss("idle", FRESH, [], S.IDLE, S.IDLE, [], [assign(V1, 1), *UPDATE], S.PROBATION, None),
    PowerLoss(
        "downloading",
        ON_V1,
        [assign(V2, 2)],
        S.DOWNLOADING,
        S.DOWNLOADING,
        ["download v2"],
        [*UPDATE, ev(K.PROBATION_PASSED)],
        S.COMMITTED,
        V2,
    ),
    PowerLoss(
        "verifying",
        ON_V1,
        [assign(V2, 2), ev(K.DOWNLOADED)],
        S.VERIFYING,
        S.DOWNLOADING,
        ["download v2"],
        [*UPDATE, ev(K.PROBATION_PASSED)],
        S.COMMITTED,
        V2,
    ),
    PowerLoss(
        "staged",
        ON_V1,
        [assign(V2, 2), ev(K.DOWNLOADED), ev(K.VERIFIED)],
        S.STAGED,
        S.DOWNLOADING,
        ["download v2"],
        [*UPDATE, ev(K.PROBATION_PASSED)],
        S.COMMITTED,
        V2,
    ),
    PowerLoss(
        "probation",
        ON_V1,
        [assign(V2, 2), *UPDATE],
        S.PROBATION,
        S.STAGED,
        ["install_and_load v2"],
        [ev(K.LOADED), ev(K.PROBATION_PASSED)],
        S.COMMITTED,
        V2,
    ),
    PowerLoss(
        "committed",
        ON_V1,
        [assign(V2, 2), *UPDATE, ev(K.PROBATION_PASSED)],
        S.COMMITTED,
        S.COMMITTED,
        [],
        [assign(V1, 3)],
        S.ROLLED_BACK,
        V1,
    ),
    PowerLoss(
        "rolled-back",
        ON_V1,
        [assign(V2, 2), *UPDATE, ev(K.PROBATION_FAILED, "latency")],
        S.ROLLED_BACK,
        S.ROLLED_BACK,
        [],
        [assign(V2, 3)],  # still refused after the restart: the mark survived
        S.ROLLED_BACK,
        V1,
    ),
    PowerLoss(
        "probation-then-load-fails",
        ON_V1,
        [assign(V2, 2), *UPDATE],
        S.PROBATION,
        S.STAGED,
        ["install_and_load v2"],
        [ev(K.LOAD_FAILED, "self-test mismatch")],
        S.ROLLED_BACK,
        V1,
    ),
]


@pytest.mark.parametrize("case", POWER_LOSSES, ids=lambda c: c.id)
def test_power_loss(case: PowerLoss, tmp_path: Path) -> None:
    record, _, _, _ = run(case.start, case.before)
    assert record.state is case.lost_in
    state = StateFile(tmp_path / "update-state.json")
    state.save(record)
    # ... power cut; the agent starts, serves record.current and resumes
    restored = StateFile(tmp_path / "update-state.json").load()
    assert restored == record
    if case.lost_in not in (S.IDLE,):
        assert restored.current is not None  # something verified to serve while resuming
    record, states, actions, _ = run(restored, [ev(K.RESUME)])
    assert states == [case.resume_to]
    assert actions == case.resume_actions
    record, states, _, _ = run(record, case.after)
    assert (states[-1] if states else record.state) is case.end
    assert record.current == case.current


def test_restarts_before_the_update_ends_back_off() -> None:
    record, _ = step(ON_V1, assign(V2, 2))
    delays = []
    for _ in range(3):
        record, actions = step(record, ev(K.RESUME))
        delays.append(actions[1].delay_s)
    assert delays == [10.0, 20.0, 40.0]  # a reboot loop while downloading does not hammer the hub


# ---- the table: every pair exercised, every other pair refused --------------------------------


def test_every_transition_is_exercised_by_the_tables() -> None:
    seen: set[tuple[State, EventKind]] = set()
    chains = [(c.start, c.events) for c in CASES]
    chains += [(p.start, [*p.before, ev(K.RESUME), *p.after]) for p in POWER_LOSSES]
    for start, events in chains:
        _, _, _, every = run(start, events)
        for action in every:
            if action.kind is ActionKind.REPORT:
                pair = (State(action.report["from"]), EventKind(action.report["event"]))
                assert TRANSITIONS[pair].value == action.report["to"]
                seen.add(pair)
    assert sorted(set(TRANSITIONS) - seen) == []


# One record in each state, to try every event on.
IN_STATE = {
    S.IDLE: FRESH,
    S.DOWNLOADING: run(ON_V1, [assign(V2, 2)])[0],
    S.VERIFYING: run(ON_V1, [assign(V2, 2), ev(K.DOWNLOADED)])[0],
    S.STAGED: run(ON_V1, [assign(V2, 2), ev(K.DOWNLOADED), ev(K.VERIFIED)])[0],
    S.PROBATION: run(ON_V1, [assign(V2, 2), *UPDATE])[0],
    S.COMMITTED: ON_V2,
    S.ROLLED_BACK: V3_FAILED,
}
RESULTS = sorted(RUNNER_EVENTS - {K.ASSIGNMENT_CHANGED, K.RESUME})
INVALID = [(s, k) for s in State for k in RESULTS if (s, k) not in TRANSITIONS]


def test_the_records_in_state_are_in_their_state() -> None:
    assert all(record.state is state for state, record in IN_STATE.items())


@pytest.mark.parametrize(("state", "kind"), INVALID, ids=[f"{s.value}-{k.value}" for s, k in INVALID])
def test_invalid_pairs_raise(state: State, kind: EventKind) -> None:
    with pytest.raises(RuntimeError, match=f"{kind.value}.*not valid in state '{state.value}'"):
        step(IN_STATE[state], ev(kind))


@pytest.mark.parametrize("kind", sorted(DERIVED_EVENTS), ids=str)
def test_derived_events_cannot_be_sent(kind: EventKind) -> None:
    with pytest.raises(RuntimeError, match="derived"):
        step(IN_STATE[S.PROBATION], Event(kind, version=V1, serial=3))


def test_assignment_and_resume_are_valid_in_every_state() -> None:
    for record in IN_STATE.values():
        step(record, ev(K.RESUME))
        step(record, assign(V4, 9))


def test_a_result_about_another_version_raises() -> None:
    with pytest.raises(RuntimeError, match="pending version is iris v2"):
        step(IN_STATE[S.DOWNLOADING], Event(K.DOWNLOADED, version=V3))
    step(IN_STATE[S.DOWNLOADING], Event(K.DOWNLOADED, version=V2))  # the right one is fine


def test_an_assignment_without_target_or_serial_raises() -> None:
    with pytest.raises(RuntimeError, match="target version and a serial"):
        step(ON_V1, Event(K.ASSIGNMENT_CHANGED, version=V2))
    with pytest.raises(RuntimeError, match="target version and a serial"):
        step(ON_V1, Event(K.ASSIGNMENT_CHANGED, serial=2))


def test_step_does_not_change_its_input() -> None:
    before = IN_STATE[S.PROBATION]
    snapshot = before.to_json()
    step(before, ev(K.PROBATION_FAILED))
    assert before.to_json() == snapshot


# ---- the record: invariants and JSON -------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"state": S.DOWNLOADING},  # no pending
        {"state": S.COMMITTED, "current": V1, "pending": V2},  # pending while resting
        {"state": S.IDLE, "current": V1},
        {"state": S.COMMITTED, "previous": V1},  # previous without current
        {"state": S.COMMITTED, "current": V1, "previous": V1},
        {"state": S.DOWNLOADING, "current": V1, "pending": V1},
        {"state": S.PROBATION, "current": V1, "pending": V2, "attempts": 0},
        {"state": S.DOWNLOADING, "current": V1, "pending": V2, "bad": frozenset({V2.sha256})},
        {"state": S.ROLLED_BACK, "current": V1, "bad": frozenset({"not-a-hash"})},
        {"state": S.COMMITTED, "current": V1, "attempts": -1},
        {"state": S.COMMITTED, "current": V1, "assignment_serial": True},
    ],
    ids=[
        "downloading-without-pending",
        "pending-while-committed",
        "idle-with-a-version",
        "previous-without-current",
        "current-is-previous",
        "pending-is-current",
        "probation-without-a-load",
        "pending-marked-bad",
        "bad-not-a-hash",
        "negative-attempts",
        "boolean-serial",
    ],
)
def test_inconsistent_records_are_refused(fields: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="record"):
        UpdateRecord(**fields)  # type: ignore[arg-type]


def test_version_ref_is_checked() -> None:
    with pytest.raises(ValueError, match="sha256"):
        VersionRef("iris", 1, "ABC")
    with pytest.raises(ValueError, match="version"):
        VersionRef("iris", 0, V1.sha256)
    assert str(V1) == f"iris v1 ({V1.sha256[:12]})"


@pytest.mark.parametrize("record", [FRESH, *IN_STATE.values(), V3_FAILED], ids=lambda r: r.state.value)
def test_json_round_trip(record: UpdateRecord) -> None:
    doc = json.loads(json.dumps(record.to_json()))
    assert doc["format"] == FORMAT
    assert UpdateRecord.from_json(doc) == record


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(format="outpost-update-state/2"), "format"),
        (lambda d: d.pop("attempts"), "attempts is missing"),
        (lambda d: d.update(state="paused"), "unknown state"),
        (lambda d: d.update(pending={"model": "iris"}), "model, version and sha256"),
        (lambda d: d.update(bad="x"), "bad must be a list"),
        (lambda d: d.update(bad=[["x"]]), "update state"),
        (lambda d: d.update(attempts="1"), "attempts"),
        (lambda d: d.update(state="idle"), "pending"),
    ],
    ids=[
        "unknown-format",
        "missing-key",
        "unknown-state",
        "bad-version",
        "bad-type",
        "unhashable",
        "string-attempts",
        "inconsistent",
    ],
)
def test_from_json_refuses_what_it_did_not_write(change: object, message: str) -> None:
    doc = IN_STATE[S.PROBATION].to_json()
    change(doc)  # type: ignore[operator]
    with pytest.raises(StateError, match=message):
        UpdateRecord.from_json(doc)


def test_from_json_ignores_unknown_keys() -> None:
    doc = ON_V2.to_json() | {"added_by_a_newer_agent": 1}
    assert UpdateRecord.from_json(doc) == ON_V2


# Random event sequences: whatever the order, the machine never builds an inconsistent record
# (the constructor checks), never serves a version it marked bad, and every record round-trips.
EVENTS = st.one_of(
    st.builds(assign, st.sampled_from([V1, V2, V3, V4]), st.integers(1, 20)),
    st.sampled_from([ev(k) for k in sorted(RUNNER_EVENTS - {K.ASSIGNMENT_CHANGED})]),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(EVENTS, max_size=40))
def test_random_event_sequences_keep_the_invariants(events: list[Event]) -> None:
    record = FRESH
    for event in events:
        try:
            new, actions = step(record, event)
        except RuntimeError:
            assert (record.state, event.kind) not in TRANSITIONS
            continue
        assert new.current is None or new.current.sha256 not in new.bad
        if any(a.kind is ActionKind.MARK_BAD for a in actions):
            assert new.state is S.ROLLED_BACK
        assert UpdateRecord.from_json(json.loads(json.dumps(new.to_json()))) == new
        record = new


# ---- StateFile -----------------------------------------------------------------------------------


def test_state_file_missing_is_a_fresh_record(tmp_path: Path) -> None:
    assert StateFile(tmp_path / "none.json").load() == UpdateRecord()
    assert StateFile(tmp_path / "none.json").load_or_reset() == UpdateRecord()


def test_state_file_save_replaces_atomically(tmp_path: Path) -> None:
    state = StateFile(tmp_path / "sub" / "state.json")
    state.save(ON_V1)
    state.save(ON_V2)
    assert state.load() == ON_V2
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["state.json"]  # no temp file left


@pytest.mark.parametrize(
    "content",
    [b"", b"{not json", b"\xff\xfe", b"[]", b'{"format": "outpost-update-state/9"}', b"{" * 100_000],
    ids=["empty", "torn", "not-utf8", "not-an-object", "unknown-format", "deeply-nested"],
)
def test_state_file_corrupt_raises_or_resets(
    content: bytes, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(content)
    state = StateFile(path, clock=lambda: 0.0)
    with pytest.raises(StateError, match=re.escape(str(path))) as info:
        state.load()
    assert isinstance(info.value, UpdateError)
    assert state.load_or_reset() == UpdateRecord()
    assert not path.exists()
    aside = tmp_path / "state.json.corrupt-19700101T000000Z"
    assert aside.read_bytes() == content  # kept for a person to look at
    assert "update state reset" in caplog.text
    path.write_bytes(content)  # a second reset in the same second keeps both files
    state.load_or_reset()
    assert (tmp_path / "state.json.corrupt-19700101T000000Z-2").read_bytes() == content


def test_state_file_too_large_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(b" " * (2 * 1024 * 1024))
    with pytest.raises(StateError, match="larger than"):
        StateFile(path).load()


def test_state_file_unreadable_is_not_reset(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.mkdir()  # reading a directory fails with an OSError, not with bad content
    with pytest.raises(StateError, match="cannot read"):
        StateFile(path).load_or_reset()
    assert path.is_dir()


def test_state_file_is_readable_json(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    StateFile(path).save(V3_FAILED)
    doc = json.loads(path.read_text())
    assert doc["state"] == "rolled_back" and doc["bad"] == [V3.sha256]
