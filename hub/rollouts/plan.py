"""A rollout's plan and life cycle, pure: the gate settings, the checks on a new plan, the
operator actions allowed in each state (one table) and the deployment each state asks for.

States:

    running ──pause──▶ paused ──resume──▶ running
    running|paused ──advance (operator, no gates)──▶ running at the next step, or completed
    running ──controller: advance──▶ running at the next step;  ──complete──▶ completed
    running ──controller: halt──▶ halted;  running|paused ──abort──▶ aborted

`completed`, `halted` and `aborted` are final. What the group's assignment should be in each
state (`desired`): running or paused at step i: the stable version plus the candidate at
steps[i] percent; completed: the candidate as the only (stable) version; halted or aborted:
the stable version alone (percent 0).
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from hub.errors import ConflictError, InvalidRequestError

DEFAULT_STEPS = (5, 25, 100)
DEFAULT_MIN_SECONDS = 600.0
DEFAULT_MIN_REQUESTS = 500
MAX_STEPS = 20
CONTROLLER = "controller"  # the actor of the hub's own decisions


class State(enum.StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    HALTED = "halted"
    ABORTED = "aborted"


FINAL = frozenset({State.COMPLETED, State.HALTED, State.ABORTED})


class Action(enum.StrEnum):
    START = "start"
    ADVANCE = "advance"
    HOLD = "hold"
    HALT = "halt"
    COMPLETE = "complete"
    PAUSE = "pause"
    RESUME = "resume"
    ABORT = "abort"


# Operator actions: the states they are allowed in, and the state they lead to (ADVANCE on
# the last step leads to COMPLETED instead; see `operator_target`).
OPERATOR_ACTIONS: dict[Action, tuple[frozenset[State], State]] = {
    Action.PAUSE: (frozenset({State.RUNNING}), State.PAUSED),
    Action.RESUME: (frozenset({State.PAUSED}), State.RUNNING),
    Action.ADVANCE: (frozenset({State.RUNNING, State.PAUSED}), State.RUNNING),
    Action.ABORT: (frozenset({State.RUNNING, State.PAUSED}), State.ABORTED),
}


@dataclass(frozen=True)
class Gates:
    """When the controller halts a rollout (per rollout; these defaults otherwise).

    error rate: the candidate's may be at most max(stable x max_error_ratio, stable +
    max_error_increase); without a stable baseline, at most max_error_rate.
    latency: the candidate's p95 at most max_latency_ratio x the stable's p95 (skipped without
    a baseline). fallbacks: more candidate devices falling back than max_fallbacks halts.
    drift: any drift alert on the candidate halts when halt_on_drift.
    A baseline is the stable version's traffic since the step started, or since the rollout
    started when the step has fewer than min_baseline_requests.
    """

    max_error_ratio: float = 1.5
    max_error_increase: float = 0.01
    max_error_rate: float = 0.05
    max_latency_ratio: float = 1.5
    max_fallbacks: int = 0
    halt_on_drift: bool = True
    min_baseline_requests: int = 100

    def __post_init__(self) -> None:
        if not self.max_error_ratio >= 1.0 or not self.max_latency_ratio >= 1.0:
            raise InvalidRequestError("max_error_ratio and max_latency_ratio must be at least 1")
        if not 0.0 <= self.max_error_increase <= 1.0 or not 0.0 <= self.max_error_rate <= 1.0:
            raise InvalidRequestError("max_error_increase and max_error_rate must be between 0 and 1")
        if self.max_fallbacks < 0 or self.min_baseline_requests < 1:
            raise InvalidRequestError("max_fallbacks must be >= 0 and min_baseline_requests >= 1")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any] | None) -> Gates:
        doc = dict(doc or {})
        known = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(doc) - set(known))
        if unknown:
            raise InvalidRequestError(
                f"unknown gate settings {', '.join(unknown)}; known: {', '.join(known)}"
            )
        defaults = cls()
        for key, value in doc.items():
            default = getattr(defaults, key)
            ok = (
                isinstance(value, bool)
                if isinstance(default, bool)
                else isinstance(value, int) and not isinstance(value, bool)
                if isinstance(default, int)
                else isinstance(value, int | float) and not isinstance(value, bool)
            )
            if not ok:
                raise InvalidRequestError(f"gate {key} must be a {type(default).__name__}, not {value!r}")
        values: dict[str, Any] = {
            k: float(v) if isinstance(getattr(defaults, k), float) else v for k, v in doc.items()
        }
        return cls(**values)


def check_steps(steps: Sequence[int]) -> tuple[int, ...]:
    """Percents that only increase, each 1..100, ending at 100."""
    if not steps or len(steps) > MAX_STEPS:
        raise InvalidRequestError(f"a rollout needs 1 to {MAX_STEPS} steps, not {len(steps)}")
    for p in steps:
        if isinstance(p, bool) or not isinstance(p, int) or not 1 <= p <= 100:
            raise InvalidRequestError(f"a step is a percent from 1 to 100, not {p!r}")
    if any(b <= a for a, b in itertools.pairwise(steps)):
        raise InvalidRequestError(f"steps must increase: {', '.join(map(str, steps))}")
    if steps[-1] != 100:
        raise InvalidRequestError(f"the last step must be 100 (the whole group), not {steps[-1]}")
    return tuple(steps)


def check_minimums(min_seconds: float, min_requests: int) -> None:
    if not 0.0 <= min_seconds <= 30 * 86400.0:
        raise InvalidRequestError(f"min_seconds must be between 0 and 30 days, not {min_seconds!r}")
    if isinstance(min_requests, bool) or not isinstance(min_requests, int) or min_requests < 0:
        raise InvalidRequestError(f"min_requests must be a non-negative integer, not {min_requests!r}")


def operator_target(action: Action, state: State, step: int, steps: Sequence[int]) -> tuple[State, int]:
    """The (state, step index) an operator action leads to; ConflictError when not allowed."""
    allowed = OPERATOR_ACTIONS.get(action)
    if allowed is None:
        raise InvalidRequestError(f"{action} is not an operator action")
    sources, target = allowed
    if state not in sources:
        can = ", ".join(sorted(s.value for s in sources))
        raise ConflictError(f"cannot {action.value} a rollout that is {state.value} (only when {can})")
    if action is Action.ADVANCE:
        if step + 1 >= len(steps):
            return State.COMPLETED, step
        return State.RUNNING, step + 1
    return target, step


@dataclass(frozen=True)
class Desired:
    """The deployment a rollout state asks of its group."""

    stable: int
    candidate: int | None
    percent: int


def desired(state: State, stable: int, candidate: int, steps: Sequence[int], step: int) -> Desired:
    if state is State.COMPLETED:
        return Desired(candidate, None, 0)
    if state in (State.HALTED, State.ABORTED):
        return Desired(stable, None, 0)
    return Desired(stable, candidate, steps[step])
