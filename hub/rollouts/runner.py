"""Rollouts at work: starting one, the operator's actions, and the controller's loop that
evaluates every running rollout each `interval_s`, records its decision and applies it.

Applying a decision is publishing the deployment its new state asks for (`plan.desired`)
through the hub's ordinary deploy path (recorded, signed, published), with the actor
"rollout N (who)": advance = the candidate at the next percent (the salt is kept while the
candidate stays the same, so devices already in the canary stay in); complete = the candidate
as the stable version, no canary; halt or abort = the stable version alone.

Order: a decision is first recorded with its state change under the rollout's revision
(`RolloutStore.change`), then published. If publishing fails, the next tick publishes it again:
while a rollout is running or paused it owns its group's assignment, and every tick puts back
what its state asks for (a deployment made by hand meanwhile is replaced: abort first). A final
decision (complete, halt, abort) whose publishing failed, or was cut short by the process dying,
is published by a later tick too, within SETTLE_WINDOW_S of it, as long as the group's current
deployment is still one this rollout published (a deployment made by hand after it is left alone).

A `hold` is recorded only when its reason differs from the rollout's last decision's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from hub.errors import ConflictError, HubError, InvalidRequestError
from hub.registry import Database, Registry
from hub.registry.service import check_name
from hub.rollouts import evidence as gathering
from hub.rollouts.controller import Evidence, decide
from hub.rollouts.plan import (
    CONTROLLER,
    FINAL,
    Action,
    Desired,
    Gates,
    State,
    check_minimums,
    check_steps,
    desired,
    operator_target,
)
from hub.rollouts.store import Rollout, RolloutStore

log = logging.getLogger("outpost-hub.rollouts")

DEFAULT_INTERVAL_S = 10.0
SETTLE_WINDOW_S = 86400.0  # how long after a final decision a tick still checks it was published
CHANGE_ATTEMPTS = 3


class Publisher(Protocol):
    """The hub's deploy path: record, sign and publish a group's deployment."""

    def __call__(
        self, group: str, model: str, stable: int, candidate: int | None, percent: int, actor: str
    ) -> Mapping[str, Any]: ...


def utc_now() -> datetime:
    return datetime.now(UTC)


class RolloutService:
    def __init__(
        self,
        db: Database,
        registry: Registry,
        publish: Publisher,
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.db = db
        self.registry = registry
        self.store = RolloutStore(db)
        self.publish = publish
        self.interval_s = interval_s
        self.clock = clock
        self._profiles: dict[tuple[str, int], Mapping[str, Any]] = {}

    def create_tables(self) -> None:
        self.store.create_tables()

    def profile(self, model: str, version: int) -> Mapping[str, Any]:
        key = (model, version)
        if key not in self._profiles:  # versions are immutable: their profiles too
            self._profiles[key] = dict(self.registry.get_version(model, version).manifest.reference_profile)
        return self._profiles[key]

    def evidence(self, rollout: Rollout, now: datetime | None = None) -> Evidence:
        return gathering.gather(self.db, rollout, now or self.clock(), self.profile)

    # -- operator -----------------------------------------------------------------------------

    def start(
        self,
        group: str,
        model: str,
        candidate: int,
        steps: tuple[int, ...],
        min_seconds: float,
        min_requests: int,
        gates: Gates,
        actor: str,
    ) -> Rollout:
        check_name("group", group)
        steps = check_steps(steps)
        check_minimums(min_seconds, min_requests)
        self.registry.get_version(model, candidate)  # NotFoundError: unknown model or version
        current = self.registry.current_deployment(group)  # NotFoundError: no such group
        if current.model != model:
            raise ConflictError(
                f"group {group!r} deploys {current.model!r}, not {model!r}; deploy a stable version of "
                f"{model!r} there first"
            )
        if current.experiment is not None:  # the controller's deployments would end it silently
            raise ConflictError(
                f"group {group!r} runs a {current.experiment.mode} experiment ({model} v{current.stable} vs "
                f"v{current.candidate}); stop it first (outpost experiment stop --group {group})"
            )
        if candidate == current.stable:
            raise InvalidRequestError(
                f"{model} v{candidate} is already the stable version of group {group!r}"
            )
        now = self.clock()
        draft = Rollout(
            id=0, group=group, model=model, stable=current.stable, candidate=candidate, steps=steps, step=0,
            step_started=now, started=now, min_seconds=float(min_seconds), min_requests=min_requests,
            gates=gates, state=State.RUNNING, reason=f"started by {actor}", revision=1, updated=now,
            created_by=actor,
        )  # fmt: skip
        before = {
            "stable": current.stable,
            "candidate": current.candidate,
            "percent": current.percent,
            "serial": current.serial,
        }
        rollout = self.store.create(draft, {"deployment_before": before, "plan": draft.to_json()})
        try:
            self.apply(rollout, actor)
        except HubError as exc:
            self.store.change(
                rollout, self.clock(), Action.ABORT, CONTROLLER, f"publishing the first step failed: {exc}",
                {}, state=State.ABORTED,
            )  # fmt: skip
            raise
        log.info("%s started rollout %d: %s v%d -> v%d in %s", actor, rollout.id, model, current.stable,
                 candidate, group)  # fmt: skip
        return rollout

    def act(self, rollout_id: int, action: Action, actor: str, reason: str = "") -> Rollout:
        """pause, resume, advance (without gates) or abort, as an operator."""
        for _ in range(CHANGE_ATTEMPTS):
            seen = self.store.get(rollout_id)
            state, step = operator_target(action, seen.state, seen.step, seen.steps)
            now = self.clock()
            ev = self.evidence(seen, now)
            restart = step != seen.step or action is Action.RESUME
            why = reason or _default_reason(action, seen, state, step, actor)
            changed = self.store.change(
                seen, now, action.value, actor, why, {"evidence": ev.to_json()},
                state=state if state is not seen.state else None,
                step=step if step != seen.step else None,
                step_started=now if restart else None,
            )  # fmt: skip
            if changed is not None:
                log.info("%s: rollout %d %s -> %s (%s)", actor, rollout_id, action.value, state.value, why)
                self.apply(changed, actor)
                return changed
        raise ConflictError(
            f"rollout {rollout_id} kept changing while {action.value}-ing it; look again and retry"
        )

    # -- controller ---------------------------------------------------------------------------

    def evaluate(self, rollout: Rollout) -> Rollout:
        """One controller pass over a live rollout: decide, record, apply; the rollout after."""
        if rollout.state is not State.RUNNING:
            self.apply(rollout, CONTROLLER)  # paused: keep its assignment in place
            return rollout
        now = self.clock()
        ev = self.evidence(rollout, now)
        d = decide(rollout.steps, rollout.step, rollout.min_seconds, rollout.min_requests, rollout.gates, ev)
        record = {"evidence": ev.to_json(), "checks": d.checks, "gate": d.gate}
        if d.action is Action.HOLD:
            last = self.store.last_decision(rollout.id)
            if last is not None and last.action == Action.HOLD.value and last.reason == d.reason:
                self.apply(rollout, CONTROLLER)
                return rollout
            changed = self.store.change(rollout, now, d.action.value, CONTROLLER, d.reason, record)
        elif d.action is Action.ADVANCE:
            changed = self.store.change(
                rollout,
                now,
                d.action.value,
                CONTROLLER,
                d.reason,
                record,
                step=rollout.step + 1,
                step_started=now,
            )
        else:
            final = State.COMPLETED if d.action is Action.COMPLETE else State.HALTED
            changed = self.store.change(
                rollout, now, d.action.value, CONTROLLER, d.reason, record, state=final
            )
        if changed is None:  # another hub process acted first; it applies its own decision
            return self.store.get(rollout.id)
        if d.action is not Action.HOLD:
            level = logging.WARNING if d.action is Action.HALT else logging.INFO
            log.log(level, "rollout %d (%s in %s): %s: %s", rollout.id, rollout.model, rollout.group,
                    d.action.value, d.reason)  # fmt: skip
        self.apply(changed, CONTROLLER)
        return changed

    def tick(self) -> list[Rollout]:
        """Evaluate every live rollout once; a failure of one is logged and does not stop the rest.
        Then publish the final decisions whose publishing did not happen (see the module's Order)."""
        done = []
        for rollout in self.store.live():
            try:
                done.append(self.evaluate(rollout))
            except HubError as exc:
                log.error("rollout %d: evaluation failed (retrying next tick): %s", rollout.id, exc)
        since = self.clock() - timedelta(seconds=SETTLE_WINDOW_S)
        for rollout in self.store.ended_since(since):
            try:
                self.settle(rollout)
            except HubError as exc:
                log.error("rollout %d: publishing its %s state failed (retrying next tick): %s",
                          rollout.id, rollout.state.value, exc)  # fmt: skip
        return done

    def settle(self, rollout: Rollout) -> None:
        """Publish a final rollout's deployment if the group still has one this rollout made."""
        current = self.registry.current_deployment(rollout.group)
        if current.model == rollout.model and current.created_by.startswith(f"rollout {rollout.id} ("):
            self.apply(rollout, CONTROLLER)

    async def run(self) -> None:
        """The background task: `tick` every `interval_s`, off the event loop."""
        while True:
            try:
                await asyncio.to_thread(self.tick)
            except Exception:
                log.exception("rollout controller pass failed; retrying")
            await asyncio.sleep(self.interval_s)

    # -- applying -----------------------------------------------------------------------------

    def apply(self, rollout: Rollout, actor: str) -> None:
        """Publish the deployment the rollout's state asks for, unless the group has it already."""
        want = desired(rollout.state, rollout.stable, rollout.candidate, rollout.steps, rollout.step)
        if rollout.state in FINAL and rollout.state is not State.COMPLETED and not self._owns(rollout):
            return
        current = self.registry.current_deployment(rollout.group)
        have = Desired(current.stable, current.candidate, current.percent)
        if current.model == rollout.model and have == want:
            return
        self.publish(
            rollout.group,
            rollout.model,
            want.stable,
            want.candidate,
            want.percent,
            f"rollout {rollout.id} ({actor})",
        )

    def _owns(self, rollout: Rollout) -> bool:
        """Whether the group still runs this rollout's model (a halt or abort then puts the
        stable version back)."""
        return self.registry.current_deployment(rollout.group).model == rollout.model


def _default_reason(action: Action, seen: Rollout, state: State, step: int, actor: str) -> str:
    if action is Action.ADVANCE:
        if state is State.COMPLETED:
            return f"{actor} advanced past the last step: the candidate becomes stable (gates not checked)"
        return f"{actor} advanced to {seen.steps[step]}% (gates not checked)"
    return {
        Action.PAUSE: f"paused by {actor}",
        Action.RESUME: f"resumed by {actor}; the step's minimum time and traffic count again from now",
        Action.ABORT: f"aborted by {actor}: back to the stable version",
    }.get(action, action.value)
