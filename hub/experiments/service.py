"""Starting and stopping experiments: the checks around the group's deployment.

An experiment is started by a deployment that carries one (`PUT /api/v1/groups/{g}/deployment`
with `experiment`, `outpost experiment start`) and stopped by the group's next deployment
without it; `stop_plan` is the one `outpost experiment stop` publishes: the stable version
alone. A live rollout owns its group's assignment (the controller puts its own deployment back
at every evaluation, which would end an experiment without a word), so an experiment is refused
in a group with a live rollout, and hub.rollouts refuses a rollout in a group running an
experiment. Both checks read before they write: two operators racing each other across the two
features can still overlap; the second one's next look shows it.
"""

from __future__ import annotations

from sqlalchemy import select

from hub.errors import ConflictError
from hub.registry import Database, Deployment
from hub.rollouts.store import RolloutRow


def refuse_beside_rollout(db: Database, group: str) -> None:
    """ConflictError (409) when the group has a running or paused rollout."""
    with db.session() as s:
        live = s.scalar(select(RolloutRow).where(RolloutRow.active == group))
        if live is not None:
            raise ConflictError(
                f"group {group!r} has rollout {live.id} {live.state} ({live.model} v{live.stable} -> "
                f"v{live.candidate}), which owns the group's deployment; abort it or let it finish "
                "before starting an experiment"
            )


def stop_plan(current: Deployment) -> tuple[str, int]:
    """(model, stable) to deploy to end the group's experiment; ConflictError without one."""
    if current.experiment is None:
        raise ConflictError(f"group {current.group!r} runs no experiment; nothing was changed")
    return current.model, current.stable
