"""The rollouts API (operator token, like every /api/v1 route):

    POST /api/v1/rollouts                    start: {"model", "candidate", "group", "steps",
                                             "min_seconds", "min_requests", "gates": {...}}
    GET  /api/v1/rollouts                    list, newest first (?model=&group=&state=)
    GET  /api/v1/rollouts/{id}               one, with its decision log and its evidence now
    POST /api/v1/rollouts/{id}/pause|resume|advance|abort   {"reason": "..."} optional

Errors: unknown model, version, group or rollout 404; a live rollout in the group already, or
an action the rollout's state does not allow, 409; bad steps, minimums or gates 400.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from hub.api.params import BIGINT_MAX, INT_MAX, RowId
from hub.rollouts import Action, Gates, RolloutService, get_rollout, list_rollouts
from hub.rollouts.plan import DEFAULT_MIN_REQUESTS, DEFAULT_MIN_SECONDS, DEFAULT_STEPS

if TYPE_CHECKING:
    from hub.api.app import Hub


def _operator(request: Request) -> str:
    """The operator token's name, checked as every /api/v1 route checks it (hub.api.app)."""
    from hub.api.app import operator

    return operator(request)


Operator = Annotated[str, Depends(_operator)]


class RolloutRequest(BaseModel):
    model: str
    candidate: int = Field(ge=1, le=INT_MAX)
    group: str
    steps: list[int] = Field(default_factory=lambda: list(DEFAULT_STEPS))
    min_seconds: float = Field(default=DEFAULT_MIN_SECONDS, ge=0)
    min_requests: int = Field(default=DEFAULT_MIN_REQUESTS, ge=0, le=BIGINT_MAX)
    gates: dict[str, Any] = Field(default_factory=dict)


class ActionRequest(BaseModel):
    reason: str = Field(default="", max_length=500)


def rollout_service(hub: Hub) -> RolloutService:
    """The hub's rollouts, publishing through `Hub.deploy`."""
    from hub.api.app import DeploymentRequest

    def publish(
        group: str, model: str, stable: int, candidate: int | None, percent: int, actor: str
    ) -> Mapping[str, Any]:
        req = DeploymentRequest(model=model, stable=stable, candidate=candidate, percent=percent)
        return hub.deploy(group, req, actor)

    if not hub.settings.rollout_interval_s > 0:
        from hub.settings import SettingsError

        raise SettingsError("hub settings: rollout_interval_s must be positive")
    return RolloutService(hub.db, hub.registry, publish, interval_s=hub.settings.rollout_interval_s)


def add_rollout_routes(app: FastAPI, hub: Hub) -> RolloutService:
    """Register the routes; the caller runs `service.run()` as a background task."""
    service = rollout_service(hub)

    def start(req: RolloutRequest, actor: str) -> dict[str, Any]:
        gates = Gates.from_json(req.gates)
        r = service.start(
            req.group,
            req.model,
            req.candidate,
            tuple(req.steps),
            req.min_seconds,
            req.min_requests,
            gates,
            actor,
        )
        return get_rollout(hub.db, r.id)

    def one(rollout_id: int) -> dict[str, Any]:
        doc = get_rollout(hub.db, rollout_id)
        if doc["state"] in ("running", "paused"):
            doc["evidence_now"] = service.evidence(service.store.get(rollout_id)).to_json()
        return doc

    def act(rollout_id: int, action: Action, actor: str, reason: str) -> dict[str, Any]:
        service.act(rollout_id, action, actor, reason)
        return get_rollout(hub.db, rollout_id)

    @app.post("/api/v1/rollouts", status_code=201)
    async def create(req: RolloutRequest, actor: Operator) -> dict[str, Any]:
        result: dict[str, Any] = await run_in_threadpool(start, req, actor)
        return result

    @app.get("/api/v1/rollouts")
    async def rollouts(
        _actor: Operator, model: str | None = None, group: str | None = None, state: str | None = None
    ) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await run_in_threadpool(list_rollouts, hub.db, model, group, state)
        return result

    @app.get("/api/v1/rollouts/{rollout_id}")
    async def rollout(rollout_id: RowId, _actor: Operator) -> dict[str, Any]:
        result: dict[str, Any] = await run_in_threadpool(one, rollout_id)
        return result

    for action in (Action.PAUSE, Action.RESUME, Action.ADVANCE, Action.ABORT):

        def route(action: Action = action) -> None:
            async def handler(
                rollout_id: RowId, actor: Operator, req: ActionRequest | None = None
            ) -> dict[str, Any]:
                reason = req.reason if req is not None else ""
                result: dict[str, Any] = await run_in_threadpool(act, rollout_id, action, actor, reason)
                return result

            app.post(f"/api/v1/rollouts/{{rollout_id}}/{action.value}", name=f"rollout_{action.value}")(
                handler
            )

        route()
    return service
