"""The alerting API (operator token, like every /api/v1 route):

    GET  /api/v1/alerting/webhooks      the configured webhooks (no tokens, no secret URL paths)
    GET  /api/v1/alerting/deliveries    deliveries, newest first (?webhook=&state=&alert=&limit=)
    POST /api/v1/alerting/test          {"webhook": NAME}: send a test alert to it now; answers
                                        with its delivery (delivered, pending a retry, or failed)

Errors: an unknown webhook 404; a state that is not pending|sending|delivered|failed 400.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel

from hub.alerting import AlertingConfig, Dispatcher, RetryPolicy
from hub.alerting.store import STATES
from hub.errors import InvalidRequestError

if TYPE_CHECKING:
    from hub.api.app import Hub


def _operator(request: Request) -> str:
    from hub.api.app import operator

    return operator(request)


Operator = Annotated[str, Depends(_operator)]


class TestRequest(BaseModel):
    webhook: str


def alerting_dispatcher(hub: Hub) -> Dispatcher:
    """The hub's dispatcher, from its settings (SettingsError when they do not fit)."""
    from hub.settings import DEFAULT_LISTEN, SettingsError

    s = hub.settings
    public_url = s.public_url or f"http://{DEFAULT_LISTEN}"
    if not public_url.startswith(("http://", "https://")):
        raise SettingsError(
            f"hub settings: public_url must start with http:// or https://, got {public_url!r}"
        )
    try:
        policy = RetryPolicy(
            max_attempts=s.alert_max_attempts,
            base_s=s.alert_backoff_s,
            max_backoff_s=s.alert_backoff_max_s,
            max_age_s=s.alert_max_age_s,
        )
        config = AlertingConfig(
            s.webhooks,
            public_url,
            offline_after_s=s.alert_offline_after_s,
            interval_s=s.alert_interval_s,
            timeout_s=s.alert_timeout_s,
            policy=policy,
        )
    except ValueError as exc:
        raise SettingsError(f"hub settings: {exc}") from exc
    return Dispatcher(hub.db, config)  # its tables are made by hub.migrations


def add_alerting_routes(app: FastAPI, hub: Hub) -> Dispatcher:
    """Register the routes; the caller starts and stops the dispatcher's loop."""
    dispatcher = alerting_dispatcher(hub)

    @app.get("/api/v1/alerting/webhooks")
    async def webhooks(_actor: Operator) -> list[dict[str, Any]]:
        return dispatcher.webhooks()

    @app.get("/api/v1/alerting/deliveries")
    async def deliveries(
        _actor: Operator,
        webhook: str | None = None,
        state: str | None = None,
        alert: str | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> list[dict[str, Any]]:
        if state is not None and state not in STATES:
            raise InvalidRequestError(f"state must be one of {', '.join(STATES)}, got {state!r}")
        found = await run_in_threadpool(dispatcher.deliveries, webhook, state, alert, limit)
        return [d.to_json() for d in found]

    @app.post("/api/v1/alerting/test")
    async def test(req: TestRequest, actor: Operator) -> dict[str, Any]:
        delivery = await run_in_threadpool(dispatcher.send_test, req.webhook, actor)
        return delivery.to_json()

    return dispatcher
