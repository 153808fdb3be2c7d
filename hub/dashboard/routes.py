"""The dashboard's routes, mounted on the hub's FastAPI app at `/`.

    GET  /login, POST /login     the operator token in a form; a session cookie on success
    POST /logout                 the cookie removed
    GET  /                       the fleet: devices, groups, recent alerts
    GET  /models, /models/{m}    versions, deployments, who runs what, fleet figures, rollouts,
                                 data capture
    GET  /drift, /drift/{m}/{v}  drift per feature over time (inline SVG), devices alerting
    GET  /experiments            A/B and shadow experiments: arms, tests, verdicts
    GET  /models/{m}/versions/{v}/capture.csv
                                 captured requests (hub.capture) as CSV, for the session
    GET  /dashboard.css          the one stylesheet

Pages are rendered on the server (Jinja2, autoescaped); no JavaScript. Without a valid session
every page answers 303 to /login. The cookie is HttpOnly and SameSite=Strict (Secure when the
hub is reached over https) and holds no token (hub.dashboard.session). The JSON API under
/api keeps its bearer tokens and never reads this cookie.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import TYPE_CHECKING, Annotated, Any, TypeVar
from urllib.parse import quote

from fastapi import FastAPI, Form, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader, select_autoescape

from hub import __version__
from hub.api.guard import Throttle, client_address
from hub.api.params import Version
from hub.api.ratelimit import retry_after
from hub.dashboard import data, session
from hub.errors import HubError
from hub.registry import tokens

if TYPE_CHECKING:
    from hub.api.app import Hub

T = TypeVar("T")
_CSS = resources.files("hub.dashboard").joinpath("static/dashboard.css").read_text(encoding="utf-8")


class LoginRequired(Exception):
    """No valid session: the handler sends the browser to the login page."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.path = path


class PageError(Exception):
    """A page cannot be shown (unknown model, bad range): an HTML page says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def load(fn: Callable[..., T], *args: Any) -> T:
    """`fn` in the thread pool (database reads block); the hub's errors become a PageError."""
    try:
        return await run_in_threadpool(fn, *args)
    except HubError as exc:
        raise PageError(int(getattr(exc, "status", 500)), str(exc)) from exc


def safe_next(target: str | None) -> str:
    """Where to go after login: a path on this hub only (never another site)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def _capture_download(app: FastAPI, hub: Hub, operator: Callable[[Request], Awaitable[str]]) -> None:
    @app.get("/models/{name}/versions/{version}/capture.csv", include_in_schema=False)
    async def capture_csv(
        request: Request, name: str, version: Version, group: str | None = None, labelled_only: bool = False
    ) -> Response:
        """The API's CSV export (hub.api.capture), authorised by the dashboard's session."""
        from hub.api.capture import export_response
        from hub.capture.queries import CaptureQueries, ExportRequest

        await operator(request)
        req = ExportRequest(name, version, "csv", group, labelled_only)
        return export_response(await load(CaptureQueries(hub.db, hub.registry).export, req))


def _session_routes(app: FastAPI, hub: Hub, render: Callable[..., HTMLResponse]) -> None:
    """POST /login and /logout."""

    @app.post("/login", include_in_schema=False)
    async def login(
        request: Request, token: Annotated[str, Form()] = "", next: Annotated[str, Form()] = "/"
    ) -> Response:
        # Failed logins spend the address's budget (hub.api.guard); once it is spent, no token
        # is even looked up until it refills, so guessing tokens here does not pay.
        throttle: Throttle | None = getattr(request.app.state, "throttle", None)
        address = client_address(request.scope)
        wait = throttle.anonymous(address, spend=False) if throttle is not None else 0.0
        if wait > 0:
            error = f"Too many failed logins from your address: try again in {retry_after(wait)} s."
            page = render("login.html", status=429, next=safe_next(next), error=error)
            page.headers["Retry-After"] = retry_after(wait)
            return page
        token = token.strip()
        name = await run_in_threadpool(hub.registry.verify_token, token)
        if name is None:
            if throttle is not None:
                throttle.anonymous(address, spend=True)
            error = "That token is unknown or revoked."
            return render("login.html", status=401, next=safe_next(next), error=error)
        value = session.issue(name, tokens.token_hash(token), time.time())
        response = RedirectResponse(safe_next(next), status_code=303)
        response.set_cookie(
            session.COOKIE,
            value,
            max_age=session.SESSION_S,
            path="/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    @app.post("/logout", include_in_schema=False)
    async def logout() -> Response:
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(session.COOKIE, path="/", httponly=True, samesite="strict")
        return response


def mount(app: FastAPI, hub: Hub) -> None:
    env = Environment(
        loader=PackageLoader("hub.dashboard", "templates"),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )

    def render(name: str, status: int = 200, **context: Any) -> HTMLResponse:
        html = env.get_template(name).render(version=__version__, **context)
        return HTMLResponse(html, status_code=status, headers={"Cache-Control": "no-store"})

    async def operator(request: Request) -> str:
        found = session.parse(request.cookies.get(session.COOKIE))
        if found is not None:
            key = await run_in_threadpool(data.session_key, hub, found.name)
            if session.valid(found, key, time.time()):
                return found.name
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise LoginRequired(path)

    @app.exception_handler(LoginRequired)
    async def to_login(_request: Request, exc: LoginRequired) -> Response:
        target = "/login" if exc.path == "/" else f"/login?next={quote(exc.path, safe='')}"
        return RedirectResponse(target, status_code=303)

    @app.exception_handler(PageError)
    async def page_error(_request: Request, exc: PageError) -> HTMLResponse:
        return render("error.html", status=exc.status, message=exc.message)

    @app.get("/dashboard.css", include_in_schema=False)
    async def css() -> Response:
        return Response(_CSS, media_type="text/css", headers={"Cache-Control": "public, max-age=3600"})

    @app.get("/login", include_in_schema=False)
    async def login_form(next: str | None = None) -> HTMLResponse:
        return render("login.html", next=safe_next(next), error=None)

    _session_routes(app, hub, render)

    @app.get("/", include_in_schema=False)
    async def fleet(request: Request) -> HTMLResponse:
        who = await operator(request)
        view = await load(data.fleet_page, hub)
        out = await load(data.alert_deliveries, hub)
        return render("fleet.html", page="fleet", who=who, fleet=view, alerts_out=out)

    @app.get("/models", include_in_schema=False)
    async def models(request: Request) -> HTMLResponse:
        who = await operator(request)
        found = await load(data.models_page, hub)
        return render("models.html", page="models", who=who, models=found)

    @app.get("/models/{name}", include_in_schema=False)
    async def model(request: Request, name: str) -> HTMLResponse:
        who = await operator(request)
        view = await load(data.model_page, hub, name)
        capture = await load(data.capture_section, hub, name)
        return render("model.html", page="models", who=who, model=view, capture=capture)

    _capture_download(app, hub, operator)

    @app.get("/drift", include_in_schema=False)
    async def drift_index(request: Request) -> HTMLResponse:
        who = await operator(request)
        found = await load(data.models_page, hub)
        return render("drift_index.html", page="drift", who=who, models=found)

    @app.get("/drift/{name}/{version}", include_in_schema=False)
    async def drift(request: Request, name: str, version: Version, since: str | None = None) -> HTMLResponse:
        who = await operator(request)
        view = await load(data.drift_page, hub, name, version, since)
        return render("drift.html", page="drift", who=who, drift=view)

    @app.get("/experiments", include_in_schema=False)
    async def experiments(request: Request) -> HTMLResponse:
        who = await operator(request)
        found = await load(data.experiments_page, hub)
        return render("experiments.html", page="experiments", who=who, experiments=found)
