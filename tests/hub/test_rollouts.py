"""Rollouts, pure parts and the store: the controller's decisions on hand-computed evidence, the
plan's checks, the operator's state table, and the revision check that keeps two hub processes
from both acting on one rollout."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest

from hub.errors import ConflictError, InvalidRequestError, NotFoundError
from hub.fleet import FleetStore, Incoming, parse_message
from hub.registry import Database
from hub.rollouts import Action, Evidence, Gates, Rollout, RolloutStore, State, Sums, decide, get_rollout
from hub.rollouts.evidence import gather
from hub.rollouts.plan import Desired, check_steps, desired, operator_target
from hub.rollouts.queries import list_rollouts
from tests.hub.test_fleet_views import PROFILE, summary

STEPS = (5, 25, 100)
GATES = Gates()


def ev(
    cand: tuple[int, int, float | None] = (1000, 10, 2.0),
    stable: tuple[int, int, float | None] = (10000, 100, 2.0),
    seconds: float = 120.0,
    **extra: object,
) -> Evidence:
    c = Sums(cand[0], cand[1], cand[2], 3)
    s = Sums(stable[0], stable[1], stable[2], 30)
    return Evidence(
        candidate=c, stable=s, stable_rollout=s, step_seconds=seconds, candidate_devices=3, **extra
    )  # type: ignore[arg-type]


CASES = [
    # (step, evidence, gates, action, gate, words in the reason)
    pytest.param(0, ev(), GATES, Action.ADVANCE, None, "advancing to 25%", id="pass-advances"),
    pytest.param(2, ev(), GATES, Action.COMPLETE, None, "becomes stable", id="last-step-completes"),
    pytest.param(0, ev(seconds=30), GATES, Action.HOLD, None, "waiting for 60 s in the step", id="too-early"),
    pytest.param(
        0,
        ev(cand=(100, 0, 2.0)),
        GATES,
        Action.HOLD,
        None,
        "waiting for 500 candidate requests",
        id="too-little",
    ),
    pytest.param(
        0, ev(cand=(100, 0, 2.0), seconds=1), GATES, Action.HOLD, None, "60 s in the step and 500", id="both"
    ),
    # stable 1.00%: limit max(1.5%, 2.0%) = 2.0%; 20/1000 = 2.0% passes, 21/1000 halts
    pytest.param(0, ev(cand=(1000, 20, 2.0)), GATES, Action.ADVANCE, None, "", id="error-at-limit"),
    pytest.param(
        0,
        ev(cand=(1000, 21, 2.0)),
        GATES,
        Action.HALT,
        "error_rate",
        "candidate 2.10% of 1000",
        id="error-over",
    ),
    # stable 10%: limit max(15%, 11%) = 15%
    pytest.param(
        0,
        ev(cand=(1000, 151, 2.0), stable=(1000, 100, 2.0)),
        GATES,
        Action.HALT,
        "error_rate",
        "= 15.00%",
        id="error-ratio-limit",
    ),
    # the error gate halts before the step's time is up, once there is enough traffic
    pytest.param(
        0, ev(cand=(1000, 300, 2.0), seconds=1), GATES, Action.HALT, "error_rate", "30.00%", id="early"
    ),
    # p95 3.0 <= 1.5 x 2.0 passes; 3.1 halts
    pytest.param(0, ev(cand=(1000, 10, 3.0)), GATES, Action.ADVANCE, None, "", id="latency-at-limit"),
    pytest.param(
        0, ev(cand=(1000, 10, 3.1)), GATES, Action.HALT, "latency", "p95 3.1 ms vs stable 2 ms", id="slow"
    ),
    pytest.param(
        0,
        ev(fallbacks=({"device_id": "d-1", "transition": "probation_failed"},), seconds=0, cand=(0, 0, None)),
        GATES,
        Action.HALT,
        "fallbacks",
        "d-1 (probation_failed)",
        id="fallback-halts-at-once",
    ),
    pytest.param(
        0,
        ev(fallbacks=({"device_id": "d-1", "transition": "crash_loop"},)),
        Gates(max_fallbacks=1),
        Action.ADVANCE,
        None,
        "",
        id="fallback-allowed",
    ),
    pytest.param(
        0,
        ev(drift_alerts=({"device_id": "d-2", "message": "drift"},)),
        GATES,
        Action.HALT,
        "drift",
        "d-2",
        id="drift-halts",
    ),
    pytest.param(
        0,
        ev(drift_alerts=({"device_id": "d-2", "message": "drift"},)),
        Gates(halt_on_drift=False),
        Action.ADVANCE,
        None,
        "",
        id="drift-ignored",
    ),
]


@pytest.mark.parametrize(("step", "evidence", "gates", "action", "gate", "words"), CASES)
def test_decide(
    step: int, evidence: Evidence, gates: Gates, action: Action, gate: str | None, words: str
) -> None:
    d = decide(STEPS, step, 60.0, 500, gates, evidence)
    assert (d.action, d.gate) == (action, gate), d.reason
    assert words in d.reason


def test_baseline_falls_back_to_the_rollout_then_to_the_absolute_limit() -> None:
    # thin stable traffic in the step (50 < 100 requests): the rollout's stable sums judge
    thin = replace(ev(cand=(1000, 25, 2.0)), stable=Sums(50, 0, 1.0), stable_rollout=Sums(2000, 40, 2.0))
    d = decide(STEPS, 2, 60.0, 500, GATES, thin)  # stable 2%: limit max(3%, 3%) = 3%
    assert d.action is Action.COMPLETE and d.checks["error_rate"]["baseline"] == "rollout"
    none = replace(thin, stable_rollout=Sums())  # no baseline at all: at most 5%, latency not judged
    d = decide(STEPS, 2, 60.0, 500, GATES, replace(none, candidate=Sums(1000, 60, 99.0)))
    assert d.action is Action.HALT and d.gate == "error_rate" and "no stable baseline" in d.reason
    d = decide(STEPS, 2, 60.0, 500, GATES, replace(none, candidate=Sums(1000, 50, 99.0)))
    assert d.action is Action.COMPLETE and d.checks["latency"]["baseline"] == "none"


@pytest.mark.parametrize(
    ("given", "words"),
    [
        pytest.param([], "1 to 20 steps", id="empty"),
        pytest.param([5, 5, 100], "must increase", id="flat"),
        pytest.param([50, 25, 100], "must increase", id="down"),
        pytest.param([0, 100], "from 1 to 100", id="zero"),
        pytest.param([5, 101], "from 1 to 100", id="over"),
        pytest.param([5, 50], "last step must be 100", id="not-to-100"),
    ],
)
def test_bad_steps(given: list[int], words: str) -> None:
    with pytest.raises(InvalidRequestError, match=words):
        check_steps(given)
    assert check_steps([100]) == (100,) and check_steps([1, 2, 100]) == (1, 2, 100)


def test_gates_from_json() -> None:
    assert Gates.from_json(None) == Gates()
    assert Gates.from_json({"max_error_ratio": 2, "halt_on_drift": False}) == Gates(2.0, halt_on_drift=False)
    for bad, words in (
        ({"nope": 1}, "unknown gate"),
        ({"max_fallbacks": 1.5}, "must be a int"),
        ({"halt_on_drift": 1}, "must be a bool"),
        ({"max_latency_ratio": 0.5}, "at least 1"),
    ):
        with pytest.raises(InvalidRequestError, match=words):
            Gates.from_json(bad)


@pytest.mark.parametrize(
    ("action", "state", "step", "expected"),
    [
        pytest.param(Action.PAUSE, State.RUNNING, 1, (State.PAUSED, 1), id="pause"),
        pytest.param(Action.RESUME, State.PAUSED, 1, (State.RUNNING, 1), id="resume"),
        pytest.param(Action.ADVANCE, State.PAUSED, 0, (State.RUNNING, 1), id="advance-paused"),
        pytest.param(Action.ADVANCE, State.RUNNING, 2, (State.COMPLETED, 2), id="advance-last"),
        pytest.param(Action.ABORT, State.PAUSED, 1, (State.ABORTED, 1), id="abort"),
        pytest.param(Action.PAUSE, State.PAUSED, 1, None, id="pause-twice"),
        pytest.param(Action.RESUME, State.RUNNING, 1, None, id="resume-running"),
        pytest.param(Action.ABORT, State.HALTED, 1, None, id="abort-halted"),
        pytest.param(Action.ADVANCE, State.COMPLETED, 2, None, id="advance-completed"),
    ],
)
def test_operator_actions(
    action: Action, state: State, step: int, expected: tuple[State, int] | None
) -> None:
    if expected is None:
        with pytest.raises(ConflictError, match=f"cannot {action.value}"):
            operator_target(action, state, step, STEPS)
    else:
        assert operator_target(action, state, step, STEPS) == expected


def test_desired_deployments() -> None:
    assert desired(State.RUNNING, 3, 4, STEPS, 1) == Desired(3, 4, 25)
    assert desired(State.PAUSED, 3, 4, STEPS, 0) == Desired(3, 4, 5)
    assert desired(State.COMPLETED, 3, 4, STEPS, 2) == Desired(4, None, 0)
    assert desired(State.HALTED, 3, 4, STEPS, 1) == Desired(3, None, 0)
    assert desired(State.ABORTED, 3, 4, STEPS, 1) == Desired(3, None, 0)


# -- the store -------------------------------------------------------------------------------------

T0 = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


def draft(group: str = "lab") -> Rollout:
    return Rollout(
        id=0, group=group, model="wine", stable=3, candidate=4, steps=STEPS, step=0, step_started=T0,
        started=T0, min_seconds=60.0, min_requests=500, gates=GATES, state=State.RUNNING, reason="started",
        revision=1, updated=T0, created_by="ops",
    )  # fmt: skip


# Every store test runs on SQLite and on PostgreSQL (`database_url`, tests/conftest.py).
@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    d = Database(database_url)
    yield d
    d.dispose()


@pytest.fixture
def store(db: Database) -> RolloutStore:
    s = RolloutStore(db)
    s.create_tables()
    return s


def test_store_revision_check_lets_one_writer_win(store: RolloutStore) -> None:
    r = store.create(draft(), {"plan": "x"})
    assert r.id >= 1 and r.revision == 1 and r.percent == 5
    later = T0 + timedelta(seconds=90)
    a = store.change(r, later, "advance", "controller", "gates passed", {"n": 1}, step=1, step_started=later)
    b = store.change(
        r, later, "halt", "controller", "gate x", {"n": 2}, state=State.HALTED
    )  # read rev 1: too late
    assert a is not None and a.revision == 2 and a.percent == 25 and a.step_started == later
    assert b is None
    assert store.get(r.id).state is State.RUNNING
    assert [d.action for d in store.decisions(r.id)] == ["start", "advance"]
    done = store.change(a, later, "abort", "ops", "aborted by ops", {}, state=State.ABORTED)
    assert done is not None and done.state is State.ABORTED and done.reason == "aborted by ops"


def test_one_live_rollout_per_group(store: RolloutStore) -> None:
    r = store.create(draft(), {})
    with pytest.raises(ConflictError, match="abort it first"):
        store.create(draft(), {})
    store.create(draft("yard"), {})  # another group is fine
    final = store.change(r, T0, "halt", "controller", "gate", {}, state=State.HALTED)
    assert final is not None
    again = store.create(draft(), {})  # once final, the group may start another
    assert [x["id"] for x in list_rollouts(store.db, group="lab")] == [again.id, r.id]
    assert [x["state"] for x in list_rollouts(store.db, state="halted")] == ["halted"]
    doc = get_rollout(store.db, r.id)
    assert [d["action"] for d in doc["decisions"]] == ["start", "halt"] and doc["percent"] == 5
    with pytest.raises(NotFoundError):
        get_rollout(store.db, 999)
    with pytest.raises(InvalidRequestError, match="expected one of"):
        list_rollouts(store.db, state="sleeping")


def test_a_final_decision_left_unpublished_is_published_by_a_later_tick(store: RolloutStore) -> None:
    """A halt recorded but not published (the deploy failed, or the process died in between) is
    published by a later tick; a deployment someone made by hand afterwards is left alone."""
    from types import SimpleNamespace

    from hub.rollouts.runner import RolloutService

    r = store.create(draft(), {})
    halted = store.change(r, T0, "halt", "controller", "gate x", {}, state=State.HALTED)
    assert halted is not None
    # The group still runs the rollout's first step: the halt's deploy never happened.
    def deployment(stable: int, candidate: int | None, percent: int, by: str) -> SimpleNamespace:
        return SimpleNamespace(
            model="wine", stable=stable, candidate=candidate, percent=percent, created_by=by
        )

    group = {"lab": deployment(3, 4, 5, f"rollout {r.id} (ops)")}
    published: list[tuple[Any, ...]] = []

    def publish(g: str, model: str, stable: int, candidate: int | None, pct: int, by: str) -> dict[str, int]:
        published.append((g, model, stable, candidate, pct, by))
        group[g] = deployment(stable, candidate, pct, by)
        return {}

    clock = Clock()
    registry = SimpleNamespace(current_deployment=group.__getitem__)
    service = RolloutService(store.db, registry, publish, clock=clock)  # type: ignore[arg-type]
    clock.now = T0 + timedelta(seconds=30)
    service.tick()
    assert published == [("lab", "wine", 3, None, 0, f"rollout {r.id} (controller)")]
    service.tick()  # published: nothing more to do
    assert len(published) == 1
    # An operator deploys by hand after the halt: later ticks leave it alone.
    group["lab"] = deployment(4, None, 0, "ops")
    service.tick()
    assert len(published) == 1


# -- evidence from the fleet's tables ----------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def message(group: str, device: str, kind: str, doc: dict[str, Any]) -> Incoming:
    parsed = parse_message(
        f"outpost/v1/{group}/{device}/{kind}", json.dumps({"device_id": device, **doc}).encode()
    )
    assert parsed is not None
    return Incoming(parsed)


def window(group: str, device: str, seq: int, version: int, requests: int, errors: int) -> Incoming:
    body = summary(version, 1e9, np.random.default_rng(seq), requests=requests, errors=errors)
    return message(group, device, "summary", {"seq": seq, "ts": 1e9, **body})


def test_evidence_is_the_group_s_windows_and_alerts_since_the_step_and_rollout_started(db: Database) -> None:
    clock = Clock()
    fleet = FleetStore(db, clock=clock)
    fleet.create_tables()
    rollout = replace(draft(), model="shapes", stable=1, candidate=2, step_started=T0 + timedelta(seconds=60))
    clock.now = T0 + timedelta(seconds=30)  # before the step: counts only in the rollout's baseline
    fleet.apply([window("lab", "s-1", 1, 1, 1000, 10)])
    clock.now = T0 + timedelta(seconds=90)
    ref = {"model": "shapes", "version": 2, "sha256": "ab" * 32}
    fell = {"event": "update", "transition": "crash_loop", "version": ref, "reason": "3 restarts"}
    hub_ordered = {"event": "update", "transition": "hub_rollback", "from": "committed", "version": ref}
    verdict = {"alert": True, "alerting": ["a"], "streak": 3, "features": [{"name": "a", "drifted": True}]}
    drifting = {"schema": "outpost-drift/1", "model": "shapes", "version": 2, "start": 1e9, "end": 1e9 + 60,
                "rows": 400, **verdict}  # fmt: skip
    fleet.apply(
        [
            message("lab", "c-1", "state", {"online": True, "bd_seq": 1, "versions": {"shapes": 2}}),
            message("lab", "c-2", "state", {"online": True, "bd_seq": 1, "versions": {"shapes": 1}}),
            window("lab", "c-1", 2, 2, 300, 6),
            window("lab", "s-1", 3, 1, 1000, 10),
            window("yard", "y-1", 4, 2, 500, 250),  # another group: not this rollout's
            message("lab", "c-1", "event", {"seq": 5, "ts": 1e9, **fell}),
            message("lab", "c-2", "event", {"seq": 6, "ts": 1e9, **hub_ordered}),  # info: not a fall-back
            message("yard", "y-1", "event", {"seq": 7, "ts": 1e9, **fell}),  # another group
            message("lab", "c-2", "drift", {"seq": 8, "ts": 1e9, **drifting}),
        ]
    )
    ev = gather(db, rollout, T0 + timedelta(seconds=120), lambda _m, _v: PROFILE)
    # summary(): requests - 10 in (1, 2.5] ms and 10 in (10, 25] ms; p95 of 300 = rank 285 -> 2.5 ms
    assert ev.candidate == Sums(300, 6, pytest.approx(2.5 - 1.5 * 5 / 290), 1)  # type: ignore[arg-type]
    assert (ev.stable.requests, ev.stable.errors, ev.stable.devices) == (1000, 10, 1)
    assert (ev.stable_rollout.requests, ev.stable_rollout.errors) == (2000, 20)
    assert ev.step_seconds == 60.0 and ev.candidate_devices == 1
    assert [(f["device_id"], f["transition"], f["reason"]) for f in ev.fallbacks] == [
        ("c-1", "crash_loop", "3 restarts")
    ]
    assert [a["device_id"] for a in ev.drift_alerts] == ["c-2"]
    d = decide(rollout.steps, 0, 60.0, 200, GATES, ev)
    assert d.action is Action.HALT and d.gate == "fallbacks"
