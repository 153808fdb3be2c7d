"""The hub's front door: request size limits, the operator token checked first, rate limits.

An ASGI middleware in front of every route (FastAPI's own parsing included):

1. Bodies. A request whose Content-Length is over its limit is answered 413 before a byte of
   it is read; a body without a length (chunked) is counted as it streams in and cut off with
   413 when it passes the limit. The limit is `max_request_bytes` (1 MiB) for everything but a
   package upload (`POST /api/v1/models/{name}/versions`), whose limit is the hub's
   `max_upload_bytes` plus room for the tar archive around the files.
2. `/api/...`: the bearer token is checked here, before the route reads, parses or validates
   anything (FastAPI parses a JSON body before it runs dependencies, so a request without a
   token used to get 400/422 for a bad body rather than 401). No token or a bad one: 401.
   The route's own `operator` dependency reads the name found here (`scope["state"]`).
3. Rate limits (hub.api.ratelimit, in memory per hub process): a token bucket per operator
   token (`api_rate_per_s`, `api_burst`) for `/api`, and one per client address for what
   comes without a valid token: `/api` requests that get 401 and failed dashboard logins
   (`anon_rate_per_s`, `anon_burst`). An address whose bucket is empty gets 429 before its
   token is even looked up, so guessing tokens costs the hub nothing. Every 429 carries
   Retry-After. The TUF files (`/tuf/...`) and the dashboard's pages are not limited here.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.exceptions import HTTPException

from hub.api.ratelimit import RateLimiter, retry_after
from hub.errors import HubError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MiB = 1024 * 1024
DEFAULT_MAX_REQUEST_BYTES = 1 * MiB
TAR_ROOM_BYTES = 8 * MiB  # the archive's headers and the manifest around a model of max_upload_bytes
_UPLOAD = re.compile(r"/api/v1/models/[^/]+/versions/?")


class RequestTooLarge(HTTPException):
    """A request body over the hub's limit for its route (413). An HTTPException, because
    FastAPI turns anything else raised while it reads a body into a 400."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is over the hub's limit of {limit} bytes")


@dataclass(frozen=True)
class RequestLimits:
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_upload_bytes: int = 256 * MiB  # the model file (hub settings' max_upload_bytes)
    api_rate_per_s: float = 50.0  # per operator token; 0: no limit
    api_burst: int = 200
    anon_rate_per_s: float = 1.0  # per client address, requests without a valid token; 0: no limit
    anon_burst: int = 30

    def __post_init__(self) -> None:
        if self.max_request_bytes < 1 or self.max_upload_bytes < 1:
            raise ValueError("max_request_bytes and max_upload_bytes must be at least 1")

    def body_limit(self, method: str, path: str) -> int:
        if method == "POST" and _UPLOAD.fullmatch(path):
            return upload_limit(self.max_upload_bytes)
        return self.max_request_bytes


def upload_limit(max_upload_bytes: int) -> int:
    """The most bytes a package upload's body may have (the model plus the archive around it)."""
    return max_upload_bytes + TAR_ROOM_BYTES


def client_address(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def bearer_token(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            token = token.strip()
            return token if scheme.lower() == "bearer" and token else None
    return None


def operator_name(scope: Scope) -> str | None:
    """The operator token's name the guard found for this request, if it did."""
    state = scope.get("state")
    name = state.get("operator") if isinstance(state, dict) else None
    return name if isinstance(name, str) else None


async def _answer(send: Send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    body = orjson.dumps({"detail": detail})
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    if status == 413:
        raw.append((b"connection", b"close"))  # the rest of the body is not read
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class Throttle:
    """The hub process's rate limits: per operator token, and per address for what comes
    without a valid token (shared by the guard and the dashboard's login)."""

    def __init__(self, limits: RequestLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.per_token = RateLimiter(limits.api_rate_per_s, limits.api_burst)
        self.per_address = RateLimiter(limits.anon_rate_per_s, limits.anon_burst)

    def anonymous(self, address: str, spend: bool) -> float:
        """Seconds `address` must wait (0.0: go on); `spend` charges one request or failure."""
        now = self.clock()
        return self.per_address.take(address, now) if spend else self.per_address.peek(address, now)

    def operator(self, name: str) -> float:
        """Seconds the operator token `name` must wait (0.0: go on, one request spent)."""
        return self.per_token.take(name, self.clock())


class Guard:
    """The middleware. `authenticate(token)` is the registry's check (the name, or None)."""

    def __init__(
        self,
        app: ASGIApp,
        limits: RequestLimits,
        throttle: Throttle,
        authenticate: Callable[[str], Awaitable[str | None]],
    ) -> None:
        self.app = app
        self.limits = limits
        self.throttle = throttle
        self.authenticate = authenticate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        limit = self.limits.body_limit(method, path)
        length = _content_length(scope)
        if length is not None and length > limit:
            await _answer(send, 413, f"the request body is over the hub's limit of {limit} bytes")
            return
        if path.startswith("/api/") and not await self._admit(scope, send):
            return
        await self._counted(scope, receive, send, limit)

    async def _admit(self, scope: Scope, send: Send) -> bool:
        """Checks the token and the rate limits; False when an answer was sent instead."""
        address = client_address(scope)
        wait = self.throttle.anonymous(address, spend=False)
        if wait > 0:
            await _answer(send, 429, "too many requests without a valid token from this address",
                          {"Retry-After": retry_after(wait)})  # fmt: skip
            return False
        token = bearer_token(scope)
        try:
            name = await self.authenticate(token) if token else None
        except HubError as exc:  # outside FastAPI's handlers: answered here (a database down: 503)
            await _answer(send, int(getattr(exc, "status", 500)), str(exc))
            return False
        if name is None:
            wait = self.throttle.anonymous(address, spend=True)
            if wait > 0:
                await _answer(send, 429, "too many requests without a valid token from this address",
                              {"Retry-After": retry_after(wait)})  # fmt: skip
                return False
            detail = (
                "the operator token is unknown or revoked"
                if token
                else "this API needs an operator token: Authorization: Bearer <token>"
            )
            await _answer(send, 401, detail, {"WWW-Authenticate": "Bearer"})
            return False
        wait = self.throttle.operator(name)
        if wait > 0:
            await _answer(
                send, 429, f"too many requests with token {name!r}", {"Retry-After": retry_after(wait)}
            )
            return False
        scope.setdefault("state", {})["operator"] = name
        return True

    async def _counted(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        """The app, with the body counted as it streams in and cut off past `limit`. The
        answer to a request cut off closes the connection: the rest of its body is not read."""
        seen = 0
        started = False

        async def counted_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise RequestTooLarge(limit)
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if seen > limit:
                    message = {**message, "headers": [*message.get("headers", ()), (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except RequestTooLarge as exc:
            if started:
                raise
            await _answer(send, 413, exc.detail)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server refuses a malformed length itself
    return None
