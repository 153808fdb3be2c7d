"""HTTP/1.1 server framing on asyncio, with httptools (llhttp) doing the parsing.

Why not uvicorn: the agent answers one small request in tens of microseconds,
and an ASGI stack costs more than that per request; the benchmark (`make bench`)
measures the difference. Parsing stays in llhttp, a well-kept parser, so what is
written here is only the connection life cycle:

- keep-alive per HTTP/1.0 and 1.1 rules (llhttp's `should_keep_alive`);
- pipelining: requests on one connection are answered in order, even when a
  later one finishes first; past `max_pipelined` waiting requests, reading
  pauses (bounded memory per connection);
- chunked bodies (llhttp decodes them), `Expect: 100-continue` (answered before
  the body is read, or refused with 413 when the declared body is too large),
  HEAD (headers of the GET answer, no body);
- limits: header bytes (431), body bytes (413), idle and slow-request timeouts
  enforced by the server's sweeper, not per-request timers.

A handler receives a `Request` and returns a `Response`, or an awaitable of one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any, Final, cast

import httptools
import orjson

from agent.serving.busypoll import BusyPoll

log = logging.getLogger(__name__)
# Bound once (Final: a C static when compiled): `time.monotonic()` looks the attribute up per call.
_monotonic: Final = time.monotonic

_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
LINGER_S = 2.0  # how long a refused client may go on sending before we hang up
_JSON = b"application/json"


class Request:
    __slots__ = ("body", "headers", "keep_alive", "method", "path", "query")

    def __init__(
        self, method: str, path: str, query: str, headers: dict[bytes, bytes], body: bytes, keep_alive: bool
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers  # lower-cased names and values, as bytes
        self.body = body
        self.keep_alive = keep_alive


class Response:
    __slots__ = ("body", "close", "content_type", "extra", "status")

    def __init__(
        self,
        status: int,
        body: bytes = b"",
        content_type: bytes = _JSON,
        extra: list[tuple[bytes, bytes]] | None = None,
        close: bool = False,
    ) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.extra = extra
        self.close = close


def json_response(status: int, doc: Any) -> Response:
    return Response(status, orjson.dumps(doc))


def error_response(status: int, message: str, close: bool = False) -> Response:
    return Response(status, orjson.dumps({"error": message}), close=close)


class Deferred:
    """A response that will be ready later, without a future or a task.

    The handler returns it and calls `resolve` when the answer is ready (on the
    loop thread); the connection writes it then, in pipeline order. Cheaper than
    an asyncio future on the hot path: no callback scheduling, no extra loop
    iteration. `cancelled` turns true when the client has gone.
    """

    __slots__ = ("_conn", "_on_ready", "cancelled", "response")

    def __init__(self) -> None:
        self.response: Response | None = None
        self.cancelled = False
        self._on_ready: Callable[[], None] | None = None
        # The connection that writes the answer: called directly, with no bound method made
        # per request (other callers, MQTT's, use when_ready).
        self._conn: HttpProtocol | None = None

    def resolve(self, response: Response) -> None:
        self.response = response
        if self._conn is not None:
            self._conn._flush()
        elif self._on_ready is not None:
            self._on_ready()

    def when_ready(self, callback: Callable[[], None]) -> None:
        """Call `callback` once the response is set: at once if it already is, else from `resolve`."""
        self._on_ready = callback
        if self.response is not None:
            callback()


Handler = Callable[[Request], "Response | Deferred | Awaitable[Response]"]


# The head of nearly every answer, made with one format instead of a list of parts.
_OK_JSON_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"


def render_head(resp: Response, keep_alive: bool, body_len: int) -> bytes:
    if resp.status == 200 and keep_alive and not resp.extra and resp.content_type == _JSON:
        return _OK_JSON_HEAD % body_len
    parts = [
        b"HTTP/1.1 %d %s\r\n" % (resp.status, _REASONS.get(resp.status, b"Unknown")),
        b"content-type: %s\r\ncontent-length: %d\r\n" % (resp.content_type, body_len),
    ]
    if resp.extra:
        parts.extend(b"%s: %s\r\n" % kv for kv in resp.extra)
    if not keep_alive:
        parts.append(b"connection: close\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


class _Pending:
    """One request waiting for its response, in arrival order on its connection."""

    __slots__ = ("deferred", "head_only", "keep_alive", "response", "task")

    def __init__(self, keep_alive: bool, head_only: bool) -> None:
        self.keep_alive = keep_alive
        self.head_only = head_only
        self.response: Response | None = None
        self.deferred: Deferred | None = None
        self.task: asyncio.Future[Response] | None = None


class ServerState:
    """What the connections of one agent share: the handler, limits, open connections."""

    def __init__(
        self,
        handler: Handler,
        *,
        max_body_bytes: int,
        max_header_bytes: int,
        max_pipelined: int,
        max_connections: int,
        on_response: Callable[[int], None] | None = None,
        poll: BusyPoll | None = None,
    ) -> None:
        self.handler = handler
        self.poll = poll  # told of arrivals and answers, to poll for the next request
        self.max_body_bytes = max_body_bytes
        self.max_header_bytes = max_header_bytes
        self.max_pipelined = max_pipelined
        self.max_connections = max_connections
        self.on_response = on_response
        self.connections: set[HttpProtocol] = set()
        # Every transport not yet lost, including those closing while their last
        # bytes are still being written: shutdown waits for these.
        self.open_transports = 0
        self.draining = False

    def sweep(self, idle_timeout: float, request_timeout: float) -> None:
        now = time.monotonic()
        for conn in list(self.connections):
            conn.check_timeouts(now, idle_timeout, request_timeout)

    def busy(self) -> int:
        return sum(1 for c in self.connections if c.has_work())

    def close_idle(self) -> None:
        for conn in list(self.connections):
            if not conn.has_work():
                conn.close()

    def close_all(self) -> None:
        for conn in list(self.connections):
            conn.close()


class HttpProtocol(asyncio.Protocol):
    """One client connection."""

    def __init__(self, state: ServerState) -> None:
        self._state = state
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._pending: deque[_Pending] = deque()
        self._url = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._header_bytes = 0
        self._body: list[bytes] = []
        self._body_len = 0
        self._in_message = False
        self._message_started = 0.0
        self._last_activity = time.monotonic()
        self._closing = False
        self._lingering_since = 0.0
        self._reading_paused = False
        self._writing_paused = False

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        self._state.open_transports += 1
        state = self._state
        if len(state.connections) >= state.max_connections or state.draining:
            self._send_error_and_close(503, "too many connections" if not state.draining else "shutting down")
            return
        state.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._state.open_transports -= 1
        self._state.connections.discard(self)
        self._closing = True
        for p in self._pending:
            if p.task is not None and not p.task.done():
                p.task.cancel()
            if p.deferred is not None:
                p.deferred.cancelled = True
        self._pending.clear()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            if self._lingering_since and time.monotonic() - self._lingering_since > LINGER_S:
                self.close()
            return
        now = self._last_activity = _monotonic()
        poll = self._state.poll
        if poll is not None:
            poll.arrived(now)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._send_error_and_close(400, "protocol upgrades are not supported")
        except httptools.HttpParserError as exc:
            if not self._closing:
                self._send_error_and_close(400, f"malformed HTTP request: {exc}")

    def pause_writing(self) -> None:
        self._writing_paused = True
        self._pause_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._maybe_resume_reading()

    # -- httptools callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_message = True
        self._message_started = self._last_activity  # data_received's clock: the parser calls from it
        self._url.clear()
        self._headers = {}
        self._header_bytes = 0
        self._body = []
        self._body_len = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._header_bytes += len(url)
        if self._header_bytes > self._state.max_header_bytes:
            self._send_error_and_close(414, "request line too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > self._state.max_header_bytes:
            self._send_error_and_close(431, "request headers too large")
            return
        # Kept as bytes: the few headers anyone reads are ASCII numbers and tokens,
        # and decoding every header of every request costs more than it is worth.
        self._headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        if self._closing:
            return
        length = self._headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self._state.max_body_bytes:
            self._send_error_and_close(
                413,
                f"request body of {length.decode()} bytes is over the limit of {self._state.max_body_bytes}",
            )
            return
        expect = self._headers.get(b"expect")
        if expect is not None and self._transport is not None:
            if expect.lower() == b"100-continue":
                self._transport.write(CONTINUE)
            else:
                self._send_error_and_close(417, f"unsupported expectation {expect.decode('latin-1')!r}")

    def on_body(self, body: bytes) -> None:
        if self._closing:
            return
        self._body_len += len(body)
        if self._body_len > self._state.max_body_bytes:
            self._send_error_and_close(
                413, f"request body is over the limit of {self._state.max_body_bytes} bytes"
            )
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._closing:
            return
        self._in_message = False
        method = self._parser.get_method().decode("ascii", "replace")
        raw = self._url.decode("latin-1")
        path, _, query = raw.partition("?")
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        keep_alive = bool(self._parser.should_keep_alive()) and not self._state.draining
        req = Request(method, path, query, self._headers, body, keep_alive)
        pending = _Pending(keep_alive, method == "HEAD")
        try:
            result = self._state.handler(req)
        except Exception:
            log.exception("handler failed for %s %s", method, path)
            result = error_response(500, "internal error; see the agent's log")
        if isinstance(result, Response):
            pending.response = result
        elif isinstance(result, Deferred):
            pending.deferred = result
            result._conn = self
            if result.response is None:
                # Nothing to write yet; resolve() flushes. Skipping the call here
                # matters: it is once per request on the hot path.
                self._pending.append(pending)
                if len(self._pending) >= self._state.max_pipelined:
                    self._pause_reading()
                return
        else:
            pending.task = asyncio.ensure_future(result)
            pending.task.add_done_callback(self._on_task_done)
        self._pending.append(pending)
        if len(self._pending) >= self._state.max_pipelined:
            self._pause_reading()
        self._flush()

    # -- responses ----------------------------------------------------------------------------

    def _on_task_done(self, _task: asyncio.Future[Response]) -> None:
        self._flush()

    def _flush(self) -> None:
        transport = self._transport
        while self._pending and transport is not None and not self._closing:
            head = self._pending[0]
            if head.response is None and head.deferred is not None:
                if head.deferred.response is None:
                    return
                head.response = head.deferred.response
            if head.response is None:
                task = head.task
                if task is None or not task.done():
                    return
                if task.cancelled():
                    head.response = error_response(503, "request cancelled")
                elif (exc := task.exception()) is not None:
                    log.error("handler failed: %r", exc)
                    head.response = error_response(500, "internal error; see the agent's log")
                else:
                    head.response = task.result()
            self._pending.popleft()
            resp = head.response
            keep_alive = head.keep_alive and not resp.close and not self._state.draining
            if self._state.on_response is not None:
                self._state.on_response(resp.status)
            head_bytes = render_head(resp, keep_alive, len(resp.body))
            if head.head_only or not resp.body:
                transport.write(head_bytes)
            elif len(resp.body) < 65536:
                transport.write(head_bytes + resp.body)
            else:
                transport.writelines([head_bytes, resp.body])
            if self._state.poll is not None:
                self._state.poll.answered()
            if not keep_alive:
                self.close()
                return
        self._maybe_resume_reading()

    def _send_error_and_close(self, status: int, message: str) -> None:
        # Answer only when no earlier pipelined response is owed; otherwise the
        # answer would arrive out of order. Either way the connection ends.
        transport = self._transport
        if transport is None or self._closing:
            return
        if self._pending:
            self.close()
            return
        resp = error_response(status, message)
        if self._state.on_response is not None:
            self._state.on_response(status)
        transport.write(render_head(resp, False, len(resp.body)) + resp.body)
        # Lingering close: a client still sending its (refused) body would get
        # EPIPE and never read our answer if we closed now. Shut our side, drop
        # what it still sends, and let the sweeper close after LINGER_S.
        self._closing = True
        self._in_message = False
        self._lingering_since = time.monotonic()
        # Stays in `connections`: it still holds a socket, counts against
        # max_connections, and the sweeper or shutdown must close it.
        if transport.can_write_eof():
            transport.write_eof()
        else:
            transport.close()

    # -- flow control and life cycle ----------------------------------------------------------

    def _pause_reading(self) -> None:
        if not self._reading_paused and self._transport is not None and not self._closing:
            self._reading_paused = True
            self._transport.pause_reading()

    def _maybe_resume_reading(self) -> None:
        if (
            self._reading_paused
            and not self._writing_paused
            and len(self._pending) < self._state.max_pipelined
            and self._transport is not None
            and not self._closing
        ):
            self._reading_paused = False
            self._transport.resume_reading()

    def has_work(self) -> bool:
        return bool(self._pending) or self._in_message

    def check_timeouts(self, now: float, idle_timeout: float, request_timeout: float) -> None:
        if self._lingering_since:
            if now - self._lingering_since > LINGER_S:
                self.close()
            return
        if self._pending:
            return  # the model is working for this client; not the client's fault
        if self._in_message:
            if now - self._message_started > request_timeout:
                self._send_error_and_close(408, "request not completed in time")
        elif now - self._last_activity > idle_timeout:
            self.close()

    def close(self) -> None:
        """Close now (after flushing what is buffered). Safe to call more than once."""
        self._closing = True
        self._state.connections.discard(self)
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()
