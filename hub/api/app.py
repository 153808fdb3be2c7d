"""The hub's HTTP service (FastAPI on uvicorn).

    /api/v1/...     the operator API; every call needs `Authorization: Bearer <token>`
    /api/v1/experiments, /api/v1/groups/{g}/experiment
                    on-device A/B and shadow experiments and their verdicts (hub.api.experiments)
    /api/v1/capture, /api/v1/groups/{g}/capture
                    data capture for retraining: policies, what was captured, CSV/Parquet
                    exports (hub.api.capture)
    /api/v1/alerting  webhooks, alert deliveries, a test alert (hub.api.alerting)
    /api/v1/fleet   devices as their MQTT state and telemetry left them (hub.fleet; the
                    consumer runs when the settings name a broker: `serve --mqtt URL`);
                    /summary, /drift: a model version's windows summed across devices over a
                    time range; /alerts: drift, error-rate, rollback and refusal alerts
    /tuf/metadata/  TUF metadata, public: devices verify it against their provisioned root
    /tuf/targets/   signed model files and group assignments, public for the same reason
    /healthz        liveness, public
    /, /login, ...  the dashboard (hub.dashboard): server-rendered pages behind a login with
                    an operator token (a session cookie; the API above never reads it)

A push is validated and stored by the registry, then signed into the TUF repository; if
signing fails the stored version is removed again, so the registry never holds a version
devices cannot get. A deployment is recorded, then its assignment is signed as the
group's new target, and the metadata version is recorded with it.

The TUF files are served with ETags (304 on If-None-Match) and cache headers: versioned
metadata and hash-named targets never change (immutable), `timestamp.json` and `root.json`
always revalidate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict
from typing import IO, Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from hub import __version__, migrations, objectstore
from hub.api.alerting import add_alerting_routes
from hub.api.capture import add_capture_routes
from hub.api.experiments import add_experiment_routes
from hub.api.guard import Guard, RequestLimits, Throttle, operator_name, upload_limit
from hub.api.params import INT_MAX, Version, VersionQuery
from hub.api.rollouts import add_rollout_routes
from hub.api.tuffiles import PUBLIC_TREES, REVALIDATE, TufFront, cache_control_for
from hub.api.upload import read_package_tar
from hub.capture.store import CaptureStore
from hub.errors import AuthError, HubError, PackageTooLarge
from hub.experiments.service import refuse_beside_rollout
from hub.fleet import AlertRules, DriftSettings, FleetConsumer, FleetQueries, FleetStore, FleetUnavailable
from hub.registry import Database, Deployment, Limits, Registry, VersionInfo
from hub.registry.deployments import KEEP_CAPTURE, parse_capture, parse_experiment
from hub.registry.variants import files_to_sign, variant_targets
from hub.settings import HubSettings, SettingsError

log = logging.getLogger("outpost-hub")


class DeploymentRequest(BaseModel):
    model: str
    stable: int = Field(ge=1, le=INT_MAX)
    candidate: int | None = Field(default=None, ge=1, le=INT_MAX)
    percent: int = Field(default=0, ge=0, le=100)
    salt: str | None = None
    # {"mode": "ab", "weight": 1..99} or {"mode": "shadow", "sample": 1..100}; see hub.experiments
    experiment: dict[str, Any] | None = None
    # {"sample_bp": 1..10000, "max_rows_per_min": 1..6000} or null (off); not named: the
    # group's current capture is kept when the model stays (hub.capture)
    capture: dict[str, Any] | None = None


class RollbackRequest(BaseModel):
    model: str | None = None


class CommandRequest(BaseModel):
    command: Literal["update", "rebirth"]  # rebirth: the device publishes its state again


def deployment_json(d: Deployment) -> dict[str, Any]:
    return {
        "group": d.group,
        "model": d.model,
        "stable": d.stable,
        "candidate": d.candidate,
        "percent": d.percent,
        "salt": d.salt,
        "serial": d.serial,
        "previous_stable": d.previous_stable,
        "metadata_version": d.metadata_version,
        "created": d.created.isoformat(),
        "created_by": d.created_by,
        "experiment": d.experiment.to_json() if d.experiment is not None else None,
        "capture": d.capture.to_json() if d.capture is not None else None,
    }


def version_json(v: VersionInfo) -> dict[str, Any]:
    m = v.manifest
    return {
        "name": v.model,
        "version": v.version,
        "model_sha256": v.model_sha256,
        "size": v.model_size,
        "manifest_sha256": v.manifest_sha256,
        "created": v.created.isoformat(),
        "task": m.task,
        "labels": list(m.labels),
        "inputs": [asdict(s) for s in m.inputs],
        "outputs": [asdict(s) for s in m.outputs],
        "quantization": m.quantization,
        "targets": [v.manifest_target, v.model_target, *variant_targets(v.model, v.version, m)],
    }


SPOOL_BYTES = 8 * 1024 * 1024  # an upload up to this size stays in memory
# A push's body, read as a stream (not by FastAPI), named in the spec so that clients and the
# API fuzzer (tests/hub/test_api_fuzz.py) know what it is.
_TAR_BODY = {"content": {"application/x-tar": {"schema": {"type": "string", "format": "binary"}}}}


class _TufFiles(StaticFiles):
    """StaticFiles with the cache headers TUF clients and CDNs need. Behind hub.api.tuffiles'
    TufFront, which answers the small files itself: these serve large files, ranges and
    other methods, with the same headers."""

    async def get_response(self, path: str, scope: Any) -> Response:
        response = await super().get_response(path, scope)
        name = path.rsplit("/", 1)[-1]
        if name in REVALIDATE or response.status_code in (200, 304):
            response.headers["Cache-Control"] = cache_control_for(name).decode()
        return response


class Hub:
    """The hub's parts, built from its settings."""

    def __init__(self, settings: HubSettings) -> None:
        self.settings = settings
        self.db = Database(settings.db_url)
        # The schema is upgraded by `outpost-hub migrate`, once, never by each hub process.
        try:
            migrations.require_current(self.db, hint=f"outpost-hub migrate --data {settings.data_dir}")
        except HubError:
            self.db.dispose()
            raise
        # Blobs in DATA/blobs or a bucket; the TUF repository also published there if asked
        # (hub.objectstore), or kept there (tuf_state = "s3": hosts with their own data
        # directories sign in turn). The hub serves /tuf/ from its directory either way.
        bucket = objectstore.bucket(settings) if "s3" in (settings.blob_store, settings.tuf_publish) else None
        if bucket is not None and "s3" in (settings.blob_store, settings.tuf_state):
            bucket.check()  # no pushes without it: say so at start, not at the first push
        blobs = objectstore.blob_store(settings, bucket)
        blobs.sweep()  # put back blobs a crash left in the trash mid-delete
        self.registry = Registry(self.db, blobs, Limits(max_model_bytes=settings.max_upload_bytes))
        self.repo = objectstore.signed_repository(settings, bucket, self.db.engine)
        if self.repo.mirror is not None:
            if self.db.is_sqlite:
                log.warning(
                    'tuf_state = "s3" on SQLite: signing is locked on this host only; hub processes '
                    "on other hosts need a shared PostgreSQL (database_url)"
                )
            try:
                # The bucket's repository, or this directory's published to an empty bucket;
                # and this host's online keys checked against it.
                joined = self.repo.join()
            except HubError:
                self.db.dispose()
                raise
            log.info("TUF repository in the bucket: %s", joined)
        try:
            rules = AlertRules(
                error_rate=settings.alert_error_rate,
                error_rate_critical=settings.alert_error_rate_critical,
                error_min_requests=settings.alert_error_min_requests,
                error_window_s=settings.alert_error_window_s,
            )
            if settings.fleet_drift_method not in ("bh", "bonferroni"):
                raise ValueError("fleet_drift_method must be bh or bonferroni")
            drift = DriftSettings(
                alpha=settings.fleet_drift_alpha,
                method="bonferroni" if settings.fleet_drift_method == "bonferroni" else "bh",
                min_rows=settings.fleet_drift_min_rows,
            )
            self.fleet = FleetStore(
                self.db,
                keep_per_device=settings.fleet_keep_messages_per_device,
                window_retention_s=settings.fleet_window_retention_s,
                rules=rules,
                capture=CaptureStore(settings.capture_max_rows_per_version, settings.capture_retention_s),
            )
        except ValueError as exc:
            raise SettingsError(f"hub settings: {exc}") from exc
        self.fleet_queries = FleetQueries(self.fleet, self.registry, drift)
        self.consumer: FleetConsumer | None = None

    def start_fleet(self) -> None:
        """The MQTT consumer, when the settings name a broker (`serve --mqtt URL`)."""
        if not self.settings.mqtt_url:
            return
        self.consumer = FleetConsumer(
            self.fleet,
            self.settings.mqtt_url,
            self.settings.mqtt_client_name,
            queue_size=self.settings.mqtt_queue_size,
            session_expiry_s=self.settings.mqtt_session_expiry_s,
        )
        self.consumer.start()

    def stop_fleet(self) -> None:
        if self.consumer is not None:
            self.consumer.stop()
            self.consumer = None

    def command(self, device_id: str, req: CommandRequest) -> dict[str, Any]:
        if self.consumer is None:
            raise FleetUnavailable("this hub runs without MQTT (outpost-hub serve --mqtt URL)")
        import uuid

        device = self.fleet.device(device_id)
        doc = {"command": req.command, "id": uuid.uuid4().hex}
        self.consumer.publish_command(device.group, device_id, doc)
        return {"device_id": device_id, "group": device.group, **doc, "published": True}

    def push(self, data: bytes | IO[bytes], actor: str) -> dict[str, Any]:
        upload = read_package_tar(data, self.settings.max_upload_bytes)
        info = self.registry.push_version(upload.manifest, upload.model, upload.files)
        try:
            models_version = self.repo.add_model_version(
                info.model,
                info.version,
                # The hardware variants' files are signed too, each its own target.
                {
                    "manifest.json": upload.manifest,
                    "model.onnx": upload.model,
                    **files_to_sign(info.manifest, upload.files),
                },
            )
        except BaseException:
            log.exception("signing %s version %d failed; removing it again", info.model, info.version)
            with contextlib.suppress(HubError):
                # never published: the version number may be used again
                self.registry.delete_version(info.model, info.version, unpublished=True)
            raise
        log.info(
            "%s pushed %s version %d (models metadata v%d)", actor, info.model, info.version, models_version
        )
        return {**version_json(info), "models_metadata_version": models_version}

    def publish(self, deployment: Deployment) -> Deployment:
        document = self.registry.assignment_document(deployment)
        version = self.repo.set_assignment(deployment.group, document)
        return self.registry.record_metadata_version(deployment, version)

    def deploy(self, group: str, req: DeploymentRequest, actor: str) -> dict[str, Any]:
        experiment = parse_experiment(req.experiment)
        capture = parse_capture(req.capture) if "capture" in req.model_fields_set else KEEP_CAPTURE
        if experiment is not None:
            refuse_beside_rollout(self.db, group)  # a live rollout would overwrite it
        d = self.registry.set_deployment(
            group, req.model, req.stable, req.candidate, req.percent, req.salt, actor=actor,
            experiment=experiment, capture=capture,
        )  # fmt: skip
        if d.metadata_version is None:
            d = self.publish(d)
        log.info(
            "%s deployed %s v%d to %s (candidate %s at %d%%)",
            actor,
            d.model,
            d.stable,
            group,
            d.candidate,
            d.percent,
        )
        return deployment_json(d)

    def rollback(self, group: str, model: str | None, actor: str) -> dict[str, Any]:
        d = self.publish(self.registry.rollback(group, model=model, actor=actor))
        log.info("%s rolled group %s back to %s v%d", actor, group, d.model, d.stable)
        return deployment_json(d)

    def delete_version(self, name: str, version: int) -> None:
        self.registry.delete_version(name, version)
        self.repo.remove_model_version(name, version)

    async def refresher(self) -> None:
        """Re-sign timestamp and snapshot (and delegated roles) before they expire; with the
        repository kept in the bucket, also follow it (`syncer`)."""
        follower = asyncio.ensure_future(self.syncer()) if self.repo.mirror is not None else None
        try:
            await self._refresh_loop()
        finally:
            if follower is not None:
                follower.cancel()

    async def syncer(self) -> None:
        """Every tuf_sync_interval_s: pull what other hosts published into the directory this
        hub's /tuf/ serves (two HEAD requests when nothing changed)."""
        while True:
            try:
                report = await run_in_threadpool(self.repo.sync)
                if report is not None and report.fetched:
                    log.debug("pulled %d TUF files from the bucket", len(report.fetched))
            except HubError as exc:
                log.warning("following the TUF repository in the bucket failed; retrying: %s", exc)
            except Exception:
                log.exception("following the TUF repository in the bucket failed; retrying")
            await asyncio.sleep(self.settings.tuf_sync_interval_s)

    async def _refresh_loop(self) -> None:
        while True:
            try:
                report = await run_in_threadpool(self.repo.refresh)
                if report.resigned:
                    log.info("re-signed %s", ", ".join(report.resigned))
                if report.offline_expiring:
                    log.warning(
                        "offline roles expiring soon, rotate or re-sign them: %s",
                        ", ".join(report.offline_expiring),
                    )
            except Exception:
                log.exception("refreshing the TUF metadata failed; retrying")
            if self.repo.publish_pending:  # at start, and after a publish that failed
                try:
                    published = await run_in_threadpool(self.repo.publish)
                    if published is not None:
                        log.info("TUF repository published: %d files uploaded", len(published.uploaded))
                except HubError as exc:
                    log.warning("publishing the TUF repository failed; retrying: %s", exc)
            await asyncio.sleep(self.settings.refresh_interval_s)


def operator(request: Request) -> str:
    """The name of the operator token the request carries; AuthError (401) otherwise."""
    checked = operator_name(request.scope)  # hub.api.guard checked it before the body was read
    if checked is not None:
        return checked
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise AuthError("this API needs an operator token: Authorization: Bearer <token>")
    hub: Hub = request.app.state.hub
    name = hub.registry.verify_token(token.strip())
    if name is None:
        raise AuthError("the operator token is unknown or revoked")
    return name


Operator = Annotated[str, Depends(operator)]


def threaded(fn: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
    """`fn` run in the thread pool: validation and signing block, the event loop must not."""

    async def call(*args: Any) -> Any:
        return await run_in_threadpool(fn, *args)

    return call


def _group_routes(app: FastAPI, hub: Hub) -> None:
    @app.put("/api/v1/groups/{group}/deployment")
    async def deploy(group: str, req: DeploymentRequest, actor: Operator) -> dict[str, Any]:
        result: dict[str, Any] = await threaded(hub.deploy)(group, req, actor)
        return result

    @app.post("/api/v1/groups/{group}/rollback")
    async def rollback(group: str, actor: Operator, req: RollbackRequest | None = None) -> dict[str, Any]:
        result: dict[str, Any] = await threaded(hub.rollback)(group, req.model if req else None, actor)
        return result

    @app.get("/api/v1/groups")
    async def groups(_actor: Operator) -> list[dict[str, Any]]:
        found = await threaded(hub.registry.list_groups)()
        return [deployment_json(g.deployment) for g in found if g.deployment is not None]

    @app.get("/api/v1/groups/{group}")
    async def group(group: str, _actor: Operator) -> dict[str, Any]:
        history = await threaded(hub.registry.deployment_history)(group)
        if not history:
            raise HTTPException(404, f"group {group!r} has no deployment")
        return {"current": deployment_json(history[0]), "history": [deployment_json(d) for d in history]}


def _fleet_routes(app: FastAPI, hub: Hub) -> None:
    @app.get("/api/v1/fleet")
    async def fleet(_actor: Operator, group: str | None = None) -> list[dict[str, Any]]:
        found = await threaded(hub.fleet.devices)(group)
        return [d.to_json() for d in found]

    # Before /api/v1/fleet/{device_id}: these names are not device ids.
    @app.get("/api/v1/fleet/summary")
    async def fleet_summary(
        _actor: Operator,
        model: str,
        version: VersionQuery = None,
        since: str | None = None,
        until: str | None = None,
        group: str | None = None,
    ) -> dict[str, Any]:
        """A model version's windows over a time range summed across devices (windows whose end is
        in (since, until]; times as epoch seconds, ISO 8601 or a duration ago such as 1h), with
        error rate, latency percentiles and accuracy (or MAE/RMSE) from label feedback."""
        result: dict[str, Any] = await threaded(hub.fleet_queries.summary)(
            model, version, since, until, group
        )
        return result

    @app.get("/api/v1/fleet/drift")
    async def fleet_drift(
        _actor: Operator,
        model: str,
        version: VersionQuery = None,
        since: str | None = None,
        until: str | None = None,
        group: str | None = None,
    ) -> dict[str, Any]:
        """Drift of the summed counts against the version's reference profile, per feature and
        for the predictions, and each device's latest drift verdict in the range."""
        query = hub.fleet_queries.drift
        result: dict[str, Any] = await threaded(query)(model, version, since, until, group)
        return result

    @app.get("/api/v1/fleet/alerts")
    async def fleet_alerts(
        _actor: Operator,
        since: str | None = None,
        kind: str | None = None,
        model: str | None = None,
        version: VersionQuery = None,
        device: str | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 200,
    ) -> list[dict[str, Any]]:
        """Alerts (drift, error_rate, rollback, refused) last seen since `since` (default 7 days
        ago), the most recent first."""
        result: list[dict[str, Any]] = await threaded(hub.fleet_queries.alerts)(
            since, kind, model, version, device, limit
        )
        return result

    @app.get("/api/v1/fleet/{device_id}")
    async def device(device_id: str, _actor: Operator, limit: int = 50) -> dict[str, Any]:
        info = await threaded(hub.fleet.device)(device_id)
        recent = await threaded(hub.fleet.messages)(device_id, max(1, min(limit, 1000)))
        return {**info.to_json(), "recent": [m.to_json() for m in recent]}

    @app.post("/api/v1/fleet/{device_id}/command", status_code=202)
    async def command(device_id: str, req: CommandRequest, actor: Operator) -> dict[str, Any]:
        result: dict[str, Any] = await threaded(hub.command)(device_id, req)
        log.info("%s sent %s to device %s", actor, req.command, device_id)
        return result


def _guard(app: FastAPI, hub: Hub) -> None:
    """Size limits, the token checked before anything is read, rate limits (hub.api.guard)."""
    s = hub.settings
    try:
        limits = RequestLimits(
            max_request_bytes=s.max_request_bytes,
            max_upload_bytes=s.max_upload_bytes,
            api_rate_per_s=s.api_rate_per_s,
            api_burst=s.api_burst,
            anon_rate_per_s=s.anon_rate_per_s,
            anon_burst=s.anon_burst,
        )
        throttle = Throttle(limits)
    except ValueError as exc:
        raise SettingsError(f"hub settings: {exc}") from exc
    app.state.throttle = throttle  # the dashboard's login spends from it too

    async def authenticate(token: str) -> str | None:
        name: str | None = await run_in_threadpool(hub.registry.verify_token, token)
        return name

    app.add_middleware(Guard, limits=limits, throttle=throttle, authenticate=authenticate)


def create_app(settings: HubSettings) -> TufFront:
    hub = Hub(settings)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.ensure_future(hub.refresher())
        controller = asyncio.ensure_future(rollouts.run())  # hub.rollouts: the rollout controller
        hub.start_fleet()
        alerting.start()  # hub.alerting: alerts out to webhooks, on a thread of its own
        try:
            yield
        finally:
            task.cancel()
            controller.cancel()
            await run_in_threadpool(alerting.stop)
            await run_in_threadpool(hub.stop_fleet)

    app = FastAPI(
        title="Outpost hub",
        version=__version__,
        lifespan=lifespan,
        description="Model registry, signed TUF distribution and per-group deployments.",
    )
    app.state.hub = hub
    _guard(app, hub)

    @app.exception_handler(HubError)
    async def hub_error(_request: Request, exc: HubError) -> JSONResponse:
        status = int(getattr(exc, "status", 500))
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, AuthError) else None
        return JSONResponse({"detail": str(exc)}, status_code=status, headers=headers)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"ok": True, "version": __version__}

    @app.post("/api/v1/models/{name}/versions", status_code=201, openapi_extra={"requestBody": _TAR_BODY})
    async def push(name: str, request: Request, actor: Operator) -> dict[str, Any]:
        limit = upload_limit(settings.max_upload_bytes)  # hub.api.guard counts the body too
        size = 0
        # On disk past SPOOL_BYTES: the archive is never held in memory whole, only the files
        # read out of it (a 256 MiB upload used to be held three times: chunks, joined, model).
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as spool:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PackageTooLarge(f"the upload is over the hub's limit of {limit} bytes")
                spool.write(chunk)
            result: dict[str, Any] = await threaded(hub.push)(spool, actor)
        if result["name"] != name:
            # Signed already; say so rather than pretend the path decides the name.
            result["note"] = f"the package names itself {result['name']!r}, not {name!r}"
        return result

    @app.get("/api/v1/models")
    async def models(_actor: Operator) -> list[dict[str, Any]]:
        found = await threaded(hub.registry.list_models)()
        return [
            {"name": m.name, "versions": list(m.versions), "latest_version": m.latest_version} for m in found
        ]

    @app.get("/api/v1/models/{name}")
    async def model(name: str, _actor: Operator) -> dict[str, Any]:
        versions = await threaded(hub.registry.list_versions)(name)
        return {"name": name, "versions": [version_json(v) for v in versions]}

    @app.get("/api/v1/models/{name}/versions/{version}")
    async def version(name: str, version: Version, _actor: Operator) -> dict[str, Any]:
        info = await threaded(hub.registry.get_version)(name, version)
        return {**version_json(info), "manifest": info.manifest.to_json()}

    @app.delete("/api/v1/models/{name}/versions/{version}", status_code=204)
    async def delete_version(name: str, version: Version, _actor: Operator) -> Response:
        await threaded(hub.delete_version)(name, version)
        return Response(status_code=204)

    _group_routes(app, hub)
    _fleet_routes(app, hub)
    rollouts = add_rollout_routes(app, hub)
    add_experiment_routes(app, hub)
    add_capture_routes(app, hub)
    alerting = add_alerting_routes(app, hub)
    from hub.dashboard import mount as mount_dashboard

    mount_dashboard(app, hub)
    # Only the two public trees: the repository's lock file and anything else stay private.
    # The mounts serve what TufFront passes on: large files (streamed), ranges, other methods.
    for sub in PUBLIC_TREES:
        (settings.tuf_dir / sub).mkdir(parents=True, exist_ok=True)
        app.mount(f"/tuf/{sub}", _TufFiles(directory=settings.tuf_dir / sub), name=f"tuf-{sub}")
    # Devices' polls are answered ahead of the middleware and routing (hub.api.tuffiles).
    return TufFront(app, settings.tuf_dir)
