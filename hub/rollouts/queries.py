"""Read-only views of rollouts as plain dicts (JSON-ready), for the API and the dashboard.

    list_rollouts(db, model=None, group=None, state=None)  -> [rollout, ...], newest first
    get_rollout(db, rollout_id)                            -> rollout with "decisions", oldest first

A rollout dict: id, group, model, stable, candidate, steps, step (index), percent, step_started,
started, min_seconds, min_requests, gates, state, reason, revision, updated, created_by; a
decision: id, at, action, actor, step, percent, reason, evidence. NotFoundError for an unknown id.
"""

from __future__ import annotations

from typing import Any

from hub.errors import InvalidRequestError, NotFoundError
from hub.registry import Database
from hub.rollouts.plan import State
from hub.rollouts.store import RolloutRow, select_decisions, select_rollouts, to_rollout


def list_rollouts(
    db: Database, model: str | None = None, group: str | None = None, state: str | None = None
) -> list[dict[str, Any]]:
    states = None
    if state is not None:
        try:
            states = (State(state),)
        except ValueError:
            known = ", ".join(s.value for s in State)
            raise InvalidRequestError(f"rollout state {state!r}: expected one of {known}") from None
    with db.session() as s:
        return [r.to_json() for r in select_rollouts(s, model, group, states)]


def get_rollout(db: Database, rollout_id: int) -> dict[str, Any]:
    with db.session() as s:
        row = s.get(RolloutRow, rollout_id)
        if row is None:
            raise NotFoundError(f"there is no rollout {rollout_id}")
        return {
            **to_rollout(row).to_json(),
            "decisions": [d.to_json() for d in select_decisions(s, rollout_id)],
        }
