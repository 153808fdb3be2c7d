"""Progressive rollouts: a candidate version ramped through canary percents per group, advanced
by the hub when gates computed from telemetry pass, halted when one fails.

    service = RolloutService(db, registry, publish, interval_s=10); service.create_tables()
    service.start("lab", "wine", 4, (5, 25, 100), 600, 500, Gates(), actor="ops")
    service.tick()                        # the controller: evaluate, record, apply
    service.act(1, Action.PAUSE, "ops")   # pause | resume | advance | abort
    list_rollouts(db); get_rollout(db, 1) # plain dicts, for the API and the dashboard

Modules: `plan` (pure: gates, checks, the state table, the deployment a state asks for),
`controller` (pure: evidence -> hold | advance | complete | halt), `store` (tables, the
revision check), `evidence` (reads the fleet's windows and alerts), `runner` (start, operator
actions, the controller loop), `queries` (read-only dicts), `cli` (`outpost rollout ...`).
"""

from hub.rollouts.controller import Decision, Evidence, Sums, decide
from hub.rollouts.plan import CONTROLLER, Action, Gates, State
from hub.rollouts.queries import get_rollout, list_rollouts
from hub.rollouts.runner import RolloutService
from hub.rollouts.store import Rollout, RolloutStore

__all__ = [
    "CONTROLLER",
    "Action",
    "Decision",
    "Evidence",
    "Gates",
    "Rollout",
    "RolloutService",
    "RolloutStore",
    "State",
    "Sums",
    "decide",
    "get_rollout",
    "list_rollouts",
]
