"""The experiments API (operator token, like every /api/v1 route).

    PUT    /api/v1/groups/{group}/deployment   start (or change) one: the deployment with
                                               "experiment": {"mode": "ab", "weight": W} or
                                               {"mode": "shadow", "sample": S} (hub.api.app)
    DELETE /api/v1/groups/{group}/experiment   stop: the group's stable version alone; answers
                                               {"deployment", "experiment" (stopped, its verdict)}
    GET    /api/v1/groups/{group}/experiment   the live experiment, its arms, tests and verdict
    GET    /api/v1/experiments                 every experiment, newest first
                                               (?model=&group=&live=true|false)

Errors: an unknown group, or no live experiment in it, 404; stopping where none runs, or
starting one beside a live rollout, 409; a bad experiment (mode, weight 1..99, sample 1..100,
no candidate, percent 0) 400.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool

from hub.experiments import Thresholds, experiments, group_experiment
from hub.experiments.service import stop_plan
from hub.settings import SettingsError

if TYPE_CHECKING:
    from hub.api.app import Hub


def _operator(request: Request) -> str:
    """The operator token's name, checked as every /api/v1 route checks it (hub.api.app)."""
    from hub.api.app import operator

    return operator(request)


Operator = Annotated[str, Depends(_operator)]


def thresholds(hub: Hub) -> Thresholds:
    st = hub.settings
    try:
        return Thresholds(
            alpha=st.experiment_alpha,
            min_labelled=st.experiment_min_labelled,
            min_requests=st.experiment_min_requests,
            min_compared=st.experiment_min_compared,
        )
    except ValueError as exc:
        raise SettingsError(f"hub settings: {exc}") from exc


def add_experiment_routes(app: FastAPI, hub: Hub) -> None:
    limits = thresholds(hub)

    def stop(group: str, actor: str) -> dict[str, Any]:
        from hub.api.app import DeploymentRequest

        model, stable = stop_plan(hub.registry.current_deployment(group))
        deployment = hub.deploy(group, DeploymentRequest(model=model, stable=stable), actor)
        stopped = experiments(hub.db, group=group, live=False, thresholds=limits)[0]  # the newest
        return {"deployment": deployment, "experiment": stopped}

    @app.get("/api/v1/experiments")
    async def list_experiments(
        _actor: Operator, model: str | None = None, group: str | None = None, live: bool | None = None
    ) -> list[dict[str, Any]]:
        found = await run_in_threadpool(experiments, hub.db, model, group, live, limits)
        result: list[dict[str, Any]] = found
        return result

    @app.get("/api/v1/groups/{group}/experiment")
    async def one(group: str, _actor: Operator) -> dict[str, Any]:
        result: dict[str, Any] = await run_in_threadpool(group_experiment, hub.db, group, limits)
        return result

    @app.delete("/api/v1/groups/{group}/experiment")
    async def delete(group: str, actor: Operator) -> dict[str, Any]:
        result: dict[str, Any] = await run_in_threadpool(stop, group, actor)
        return result
