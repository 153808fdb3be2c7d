"""The data capture API (operator token, like every /api/v1 route).

    PUT    /api/v1/groups/{group}/deployment   "capture": {...} or null with any deployment
                                               (not named: kept while the model stays)
    PUT    /api/v1/groups/{group}/capture      {"sample_bp": 1..10000, "max_rows_per_min":
                                               1..6000 (60)}: the current deployment again,
                                               with this capture; answers the deployment
    DELETE /api/v1/groups/{group}/capture      capture off (the current deployment again)
    GET    /api/v1/capture                     per model version and group: rows, labelled
                                               rows, devices, first/last ts, dropped; each
                                               group's live policy (?model=)
    GET    /api/v1/capture/{model}/{version}/export
                                               the captured requests as a file, streamed:
                                               ?format=csv|parquet&group=&labelled_only=
                                               &since=&until=&limit= (requests)

Errors: an unknown group (or one without a deployment), or a version with nothing captured and
no manifest, 404; turning capture off where it is off, 409; a bad policy, format or time, or
Parquet on a hub without pyarrow, 400.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from hub.api.params import BIGINT_MAX, Version
from hub.capture.queries import CaptureQueries, Export, ExportRequest
from hub.errors import ConflictError
from hub.registry.deployments import CAPTURE_MAX_ROWS_PER_MIN, CAPTURE_SAMPLE_BP
from hub.registry.records import CAPTURE_DEFAULT_MAX_ROWS_PER_MIN, Deployment

if TYPE_CHECKING:
    from hub.api.app import Hub


def _operator(request: Request) -> str:
    """The operator token's name, checked as every /api/v1 route checks it (hub.api.app)."""
    from hub.api.app import operator

    return operator(request)


Operator = Annotated[str, Depends(_operator)]


class CaptureRequest(BaseModel):
    sample_bp: int = Field(ge=CAPTURE_SAMPLE_BP[0], le=CAPTURE_SAMPLE_BP[1])
    max_rows_per_min: int = Field(
        default=CAPTURE_DEFAULT_MAX_ROWS_PER_MIN,
        ge=CAPTURE_MAX_ROWS_PER_MIN[0],
        le=CAPTURE_MAX_ROWS_PER_MIN[1],
    )


def set_capture(hub: Hub, group: str, capture: dict[str, Any] | None, actor: str) -> dict[str, Any]:
    """The group's current deployment again, with `capture` (None: off)."""
    from hub.api.app import DeploymentRequest

    current: Deployment = hub.registry.current_deployment(group)
    if capture is None and current.capture is None:
        raise ConflictError(f"data capture is off in group {group!r} already")
    req = DeploymentRequest(
        model=current.model,
        stable=current.stable,
        candidate=current.candidate,
        percent=current.percent,
        salt=current.salt,
        experiment=current.experiment.to_json() if current.experiment is not None else None,
        capture=capture,
    )
    return hub.deploy(group, req, actor)


def add_capture_routes(app: FastAPI, hub: Hub) -> CaptureQueries:
    queries = CaptureQueries(hub.db, hub.registry)

    @app.put("/api/v1/groups/{group}/capture")
    async def start(group: str, req: CaptureRequest, actor: Operator) -> dict[str, Any]:
        result: dict[str, Any] = await run_in_threadpool(set_capture, hub, group, req.model_dump(), actor)
        return result

    @app.delete("/api/v1/groups/{group}/capture")
    async def stop(group: str, actor: Operator) -> dict[str, Any]:
        result: dict[str, Any] = await run_in_threadpool(set_capture, hub, group, None, actor)
        return result

    @app.get("/api/v1/capture")
    async def listing(_actor: Operator, model: str | None = None) -> dict[str, Any]:
        result: dict[str, Any] = await run_in_threadpool(queries.listing, model)
        return result

    @app.get("/api/v1/capture/{model}/{version}/export")
    async def export(
        model: str,
        version: Version,
        _actor: Operator,
        format: str = "csv",
        group: str | None = None,
        labelled_only: bool = False,
        since: str | None = None,
        until: str | None = None,
        limit: Annotated[int | None, Query(ge=1, le=BIGINT_MAX)] = None,
    ) -> StreamingResponse:
        req = ExportRequest(model, version, format, group, labelled_only, since, until, limit)
        return export_response(await run_in_threadpool(queries.export, req))

    return queries


def export_response(found: Export) -> StreamingResponse:
    """The export as an attachment (shared with the dashboard's download)."""
    headers = {"Content-Disposition": f'attachment; filename="{found.filename}"'}
    return StreamingResponse(found.chunks, media_type=found.media_type, headers=headers)
