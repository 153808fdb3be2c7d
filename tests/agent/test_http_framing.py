"""agent.serving.http: HTTP/1.1 connection life cycle on a real Unix socket.

Each test runs one event loop (`asyncio.run`) holding both the server (HttpProtocol on
`create_unix_server`) and raw clients (`asyncio.open_unix_connection`) that write bytes by
hand, so keep-alive, pipelining, 100-continue and the limits are seen exactly as a client
sees them on the wire. Timeouts are driven by calling `ServerState.sweep` directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

import agent.serving.http as http_module
from agent.serving.http import HttpProtocol, Request, Response, ServerState

Reader = asyncio.StreamReader
Writer = asyncio.StreamWriter


def echo(req: Request) -> Response:
    doc = {
        "method": req.method,
        "path": req.path,
        "query": req.query,
        "body_length": len(req.body),
        "body": req.body.decode("latin-1"),
        "keep_alive": req.keep_alive,
    }
    return Response(200, orjson.dumps(doc))


async def _slow(req: Request, seconds: float) -> Response:
    await asyncio.sleep(seconds)
    return echo(req)


async def _async_boom() -> Response:
    await asyncio.sleep(0)
    raise RuntimeError("async handler failed")


STATIC_BODY = b'{"the same": "for GET and HEAD"}'


def handler(req: Request) -> Response | Awaitable[Response]:
    """Echo; /static is a fixed body; /sleep/<s> answers after s seconds (async); /boom, /aboom fail."""
    if req.path == "/static":
        return Response(200, STATIC_BODY)
    if req.path.startswith("/sleep/"):
        return _slow(req, float(req.path.rsplit("/", 1)[1]))
    if req.path == "/boom":
        raise RuntimeError("handler failed")
    if req.path == "/aboom":
        return _async_boom()
    return echo(req)


@pytest.fixture
def sock_path(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "a.sock"
    if len(str(path)) < 100:
        yield path
        return
    # sun_path holds 108 bytes; long parametrized test names can push tmp_path past it.
    short = Path(tempfile.mkdtemp(prefix="oh-"))
    try:
        yield short / "a.sock"
    finally:
        shutil.rmtree(short, ignore_errors=True)


class Server:
    """An HttpProtocol server and the server side of each connection, for teardown and checks."""

    def __init__(self, path: Path, state: ServerState) -> None:
        self.path = path
        self.state = state
        self.protocols: list[HttpProtocol] = []
        self.clients: list[Writer] = []

    @property
    def transports(self) -> list[asyncio.BaseTransport]:
        return [p._transport for p in self.protocols if p._transport is not None]

    async def connect(self) -> tuple[Reader, Writer]:
        reader, writer = await asyncio.open_unix_connection(str(self.path))
        self.clients.append(writer)
        return reader, writer


@contextlib.asynccontextmanager
async def serve(path: Path, **limits: Any) -> AsyncIterator[Server]:
    options: dict[str, Any] = {
        "max_body_bytes": 1024,
        "max_header_bytes": 1024,
        "max_pipelined": 8,
        "max_connections": 16,
        **limits,
    }
    state = ServerState(options.pop("handler", handler), **options)
    srv = Server(path, state)

    def tracked() -> HttpProtocol:
        # Keeps every server-side protocol so teardown can close even lingering connections.
        # (A factory, not a subclass: HttpProtocol is compiled, and compiled classes take none.)
        protocol = HttpProtocol(state)
        srv.protocols.append(protocol)
        return protocol

    server = await asyncio.get_running_loop().create_unix_server(tracked, path=str(path))
    try:
        yield srv
    finally:
        for w in srv.clients:
            w.close()
        server.close()
        for t in srv.transports:
            t.close()
        await server.wait_closed()
        for _ in range(3):  # let connection_lost callbacks run before the loop closes
            await asyncio.sleep(0)


def run(coro: Awaitable[None]) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(coro, 10)  # a hang is a failure with a traceback, not a timeout kill

    asyncio.run(bounded())


async def read_response(reader: Reader, *, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head[:-4].decode("latin-1").split("\r\n")
    version, status, _ = status_line.split(" ", 2)
    assert version == "HTTP/1.1"
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if head_only or int(status) < 200:
        return int(status), headers, b""
    body = await reader.readexactly(int(headers["content-length"]))
    return int(status), headers, body


async def read_eof(reader: Reader) -> bytes:
    """What is left before the server ends the connection (b'' when nothing)."""
    return await asyncio.wait_for(reader.read(), 2)


def get(path: str, *extra: str, method: str = "GET", version: str = "1.1") -> bytes:
    lines = [f"{method} {path} HTTP/{version}", "Host: agent", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def post(path: str, body: bytes, *extra: str) -> bytes:
    return get(path, f"Content-Length: {len(body)}", *extra, method="POST") + body


# -- keep-alive and pipelining -------------------------------------------------------------------


def test_keep_alive_serves_two_requests_on_one_connection(sock_path: Path) -> None:
    async def main() -> None:
        async with serve(sock_path) as srv:
            reader, writer = await srv.connect()
            writer.write(get("/v2/health/live?x=1"))
            status, headers, body = await read_response(reader)
            assert status == 200
            assert "connection" not in headers
            assert orjson.loads(body)["path"] == "/v2/health/live"
            assert orjson.loads(body)["query"] == "x=1"
            writer.write(post("/v2/models/m/infer", b"12345"))
            status, _, body = await read_response(reader)
            doc = orjson.loads(body)
            assert (status, doc["method"], doc["body_length"], doc["body"]) == (200, "POST", 5, "12345")
            assert len(srv.state.connections) == 1

    run(main())


def test_pipelined_responses_come_back_in_request_order(sock_path: Path) -> None:
    async def main() -> None:
        async with serve(sock_path) as srv:
            reader, writer = await srv.connect()
            # The first is the slowest: a naive server would answer /fast first.
            writer.write(get("/sleep/0.15") + get("/fast") + get("/sleep/0.05"))
            paths = [orjson.loads((await read_response(reader))[2])["path"] for _ in range(3)]
            assert paths == ["/sleep/0.15", "/fast", "/sleep/0.05"]

    run(main())


def test_pipelining_deeper_than_max_pipelined(sock_path: Path) -> None:
    async def main() -> None:
        async with serve(sock_path, max_pipelined=2) as srv:
            reader, writer = await srv.connect()
            for i in range(6):
                # Separate writes, so the server sees them over several reads and pauses
                # reading whenever two are pending; every one must still be answered, in order.
                writer.write(get(f"/sleep/0.0{i % 3}"))
                await writer.drain()
            paths = [orjson.loads((await read_response(reader))[2])["path"] for _ in range(6)]
            assert paths == [f"/sleep/0.0{i % 3}" for i in range(6)]

    run(main())


# -- bodies --------------------------------------------------------------------------------------


def test_chunked_request_body(sock_path: Path) -> None:
    async def main() -> None:
        async with serve(sock_path) as srv:
            reader, writer = await srv.connect()
            writer.write(get("/echo", "Transfer-Encoding: chunked", method="POST")[:-2])
            writer.write(b"\r\n5\r\nhello\r\n")
            await writer.drain()
            await asyncio.sleep(0.01)  # the body arrives in pieces
            writer.write(b"6\r\n world\r\n0\r\n\r\n")
            status, _, body = await read_response(reader)
            doc = orjson.loads(body)
            assert (status, doc["body"], doc["body_length"]) == (200, "hello world", 11)

    run(main())


def test_expect_100_continue_is_answered_before_the_body(sock_path: Path) -> None:
    async def main() -> None:
        async with serve(sock_path) as srv:
            reader, writer = await srv.connect()
            head = get("/echo", "Content-Length: 5", "Expect: 100-continue", method="POST")
            writer.write(head)
            # Nothing of the body has been sent; the server must still answer.
            interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
            assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(b"abcde")
            status, _, body = await read_response(reader)
            assert (status, orjson.loads(body)["body"]) == (200, "abcde")

    run(main())


def test_too_large_body_with_expect_is_refused_before_it_is_sent(sock_path: Path) -> None:
    async def main() -> None:
        async with serve(sock_path, max_body_bytes=100) as srv:
            reader, writer = await srv.connect()
            writer.write(get("/echo", "Content-Length: 101", "Expect: 100-continue", method="POST"))
            status, headers, body = await read_response(reader)  # no 100 Continue first
            assert status == 413
            assert "over the limit of 100" in orjson.loads(body)["error"]
            assert headers["connection"] == "close"
            assert await read_eof(reader) == b""

    run(main())


def test_unsupported_expectation_is_417(sock_path: Path) -> None:
    async def main() -> None:
        async with serve(sock_path) as srv:
            reader, writer = await srv.connect()
            writer.write(get("/echo", "Content-Length: 1", "Expect: 200-ok", method="POST"))
            status, _, _ = await read_response(reader)
            assert status == 417

    run(main())


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(post("/echo", b"x" * 101), id="content-length"),
        pytest.param(
            get("/echo", "Transfer-Encoding: chunked", method="POST")[:-2]
            + b"\r\n"
            + (b"40\r\n" + b"x" * 64 + b"\r\n") * 2  # 128 bytes in two chunks of 0x40
            + b"0\r\n\r\n",
            id="chunked",
        ),
    ],
)
def test_body_over_the_limit_is_413(sock_path: Path, request_bytes: bytes) -> None:
    async def main() -> None:
        async with serve(sock_path, max_body_bytes=100) as srv:
            reader, writer = await srv.connect()
            writer.write(request_bytes)
            status, headers, _ = await read_response(reader)
            assert status == 413
            assert headers["connection"] == "close"
            assert await read_eof(reader) == b""

    run(main())


def test_body_at_the_limit_is_accepted(sock_path: Path) -> None:
    async def main() -> None:
        async with serve(sock_path, max_body_bytes=100) as srv:
            reader, writer = await srv.connect()
            writer.write(post("/echo", b"y" * 100))
            status, _, body = await read_response(reader)
            assert (status, orjson.loads(body)["body_length"]) == (200, 100)

    run(main())


# -- HEAD and connection close -------------------------------------------------------------------


def test_head_has_the_content_length_of_get_but_no_body(sock_path: Path) -> None:
    async def main() -> None:
        async with serve(sock_path) as srv:
            reader, writer = await srv.connect()
            writer.write(get("/static", method="HEAD") + get("/static"))
            status, headers, _ = await read_response(reader, head_only=True)
            assert status == 200
            assert int(headers["content-length"]) == len(STATIC_BODY)
            # The GET that follows must start right after the head: no body bytes in between.
            status2, headers2, body2 = await read_response(reader)
            assert (status2, body2) == (200, STATIC_BODY)
            assert headers2 == headers

    run(main())


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(get("/x", version="1.0"), id="http-1.0"),
        pytest.param(get("/x", "Connection: close"), id="connection-close"),
    ],
)
def test_connection_is_closed_after_the_response(sock_path: Path, request_bytes: bytes) -> None:
    async def main() -> None:
        async with serve(sock_path) as srv:
            reader, writer = await srv.connect()
            writer.write(request_bytes)
            status, headers, body = await read_response(reader)
            assert status == 200
            assert headers["connection"] == "close"
            assert orjson.loads(body)["keep_alive"] is False
            assert await read_eof(reader) == b""
            await asyncio.sleep(0)
            assert srv.state.connections == set()

    run(main())


def test_http_1_0_keep_alive_is_honoured(sock_path: Path) -> None:
    async def main() -> None:
        async with serve(sock_path) as srv:
            reader, writer = await srv.connect()
            for _ in range(2):
                writer.write(get("/x", "Connection: keep-alive", version="1.0"))
                status, headers, _ = await read_response(reader)
                assert status == 200
                assert "connection" not in headers

    run(main())


# -- limits and malformed requests ---------------------------------------------------------------


def test_header_bytes_over_the_limit_is_431(sock_path: Path) -> None:
    async def main() -> None:
        async with serve(sock_path, max_header_bytes=200) as srv:
            reader, writer = await srv.connect()
            writer.write(get("/x", "X-Big: " + "a" * 300))
            status, headers, body = await read_response(reader)
            assert status == 431
            assert headers["connection"] == "close"
            assert "headers too large" in orjson.loads(body)["error"]
            assert await read_eof(reader) == b""

    run(main())


def test_many_small_headers_count_toward_the_limit(sock_path: Path) -> None:
    async def main() -> None:
        async with serve(sock_path, max_header_bytes=200) as srv:
            reader, writer = await srv.connect()
            writer.write(get("/x", *(f"X-H{i}: v" for i in range(60))))
            assert (await read_response(reader))[0] == 431

    run(main())


def test_url_over_the_header_limit_is_414(sock_path: Path) -> None:
    async def main() -> None:
        async with serve(sock_path, max_header_bytes=200) as srv:
            reader, writer = await srv.connect()
            writer.write(get("/" + "p" * 300))
            assert (await read_response(reader))[0] == 414

    run(main())


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\0" * 40, id="tls-hello"),
        pytest.param(b"HELLO WORLD\r\n\r\n", id="not-http"),
        pytest.param(b"GET / HTTP/1.1\r\nContent-Length: -5\r\n\r\n", id="negative-length"),
        pytest.param(b"GET / HTTP/1.1\r\nBad Header\r\n\r\n", id="header-without-colon"),
    ],
)
def test_garbage_is_400_and_other_connections_keep_working(sock_path: Path, garbage: bytes) -> None:
    async def main() -> None:
        async with serve(sock_path) as srv:
            r_ok, w_ok = await srv.connect()
            w_ok.write(get("/before"))
            assert (await read_response(r_ok))[0] == 200
            r_bad, w_bad = await srv.connect()
            w_bad.write(garbage)
            status, headers, body = await read_response(r_bad)
            assert status == 400
            assert "malformed HTTP request" in orjson.loads(body)["error"]
            assert await read_eof(r_bad) == b""
            # The open keep-alive connection and a new one are both served.
            w_ok.write(get("/after"))
            assert (await read_response(r_ok))[0] == 200
            r_new, w_new = await srv.connect()
            w_new.write(get("/new"))
            assert (await read_response(r_new))[0] == 200

    run(main())


def test_handler_exceptions_are_500_and_the_connection_survives(sock_path: Path) -> None:
    async def main() -> None:
        async with serve(sock_path) as srv:
            reader, writer = await srv.connect()
            writer.write(get("/boom") + get("/aboom") + get("/ok"))
            statuses = [(await read_response(reader))[0] for _ in range(3)]
            assert statuses == [500, 500, 200]

    run(main())


# -- timeouts (the sweeper) and connection limits ------------------------------------------------


def test_idle_connection_is_closed_by_sweep(sock_path: Path) -> None:
    async def main() -> None:
        async with serve(sock_path) as srv:
            idle_r, idle_w = await srv.connect()
            idle_w.write(get("/x"))
            assert (await read_response(idle_r))[0] == 200
            await asyncio.sleep(0.05)
            srv.state.sweep(idle_timeout=10.0, request_timeout=10.0)
            assert len(srv.state.connections) == 1  # not idle long enough yet
            srv.state.sweep(idle_timeout=0.01, request_timeout=10.0)
            assert await read_eof(idle_r) == b""  # closed without a response: nothing was asked
            assert srv.state.connections == set()

    run(main())


def test_sweep_spares_a_connection_waiting_for_its_handler(sock_path: Path) -> None:
    async def main() -> None:
        async with serve(sock_path) as srv:
            reader, writer = await srv.connect()
            writer.write(get("/sleep/0.2"))
            await asyncio.sleep(0.05)
            # The model is slow, not the client: neither timeout applies.
            srv.state.sweep(idle_timeout=0.001, request_timeout=0.001)
            status, _, _ = await read_response(reader)
            assert status == 200

    run(main())


def test_slow_request_is_408_after_sweep(sock_path: Path) -> None:
    async def main() -> None:
        async with serve(sock_path) as srv:
            reader, writer = await srv.connect()
            writer.write(get("/echo", "Content-Length: 10", method="POST") + b"abc")  # 7 bytes never come
            await asyncio.sleep(0.05)
            srv.state.sweep(idle_timeout=10.0, request_timeout=0.01)
            status, headers, _ = await read_response(reader)
            assert status == 408
            assert headers["connection"] == "close"

    run(main())


def test_connections_over_max_connections_get_503(sock_path: Path) -> None:
    async def main() -> None:
        async with serve(sock_path, max_connections=2) as srv:
            held = [await srv.connect() for _ in range(2)]
            for reader, writer in held:
                writer.write(get("/x"))
                assert (await read_response(reader))[0] == 200
            reader, _ = await srv.connect()
            status, _, body = await read_response(reader)  # refused before any request
            assert status == 503
            assert "too many connections" in orjson.loads(body)["error"]
            assert await read_eof(reader) == b""
            # A slot frees when a held connection ends.
            held[0][1].close()
            await read_eof(held[0][0])
            for _ in range(5):
                await asyncio.sleep(0.01)
                if len(srv.state.connections) < 2:
                    break
            r3, w3 = await srv.connect()
            w3.write(get("/x"))
            assert (await read_response(r3))[0] == 200

    run(main())


def test_draining_server_answers_then_closes(sock_path: Path) -> None:
    async def main() -> None:
        async with serve(sock_path) as srv:
            reader, writer = await srv.connect()
            writer.write(get("/sleep/0.05"))
            await asyncio.sleep(0.01)
            srv.state.draining = True
            status, headers, _ = await read_response(reader)
            assert (status, headers.get("connection")) == (200, "close")
            r2, _ = await srv.connect()
            assert (await read_response(r2))[0] == 503  # new connections are refused

    run(main())


def test_lingering_connection_is_closed_by_sweep(sock_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_module, "LINGER_S", 0.01)

    async def main() -> None:
        async with serve(sock_path) as srv:
            reader, writer = await srv.connect()
            writer.write(b"NOT HTTP\r\n\r\n")
            assert (await read_response(reader))[0] == 400
            assert await read_eof(reader) == b""  # our side half-closed; the client says nothing
            await asyncio.sleep(0.05)
            srv.state.sweep(idle_timeout=0.01, request_timeout=0.01)
            await asyncio.sleep(0.01)
            assert srv.transports[-1].is_closing()

    run(main())


def test_close_all_closes_lingering_connections(sock_path: Path) -> None:
    async def main() -> None:
        async with serve(sock_path) as srv:
            reader, writer = await srv.connect()
            writer.write(b"NOT HTTP\r\n\r\n")
            assert (await read_response(reader))[0] == 400
            srv.state.close_all()
            for _ in range(5):
                await asyncio.sleep(0.01)
            assert srv.state.open_transports == 0

    run(main())


def test_open_transports_counts_until_the_connection_is_lost(sock_path: Path) -> None:
    async def main() -> None:
        async with serve(sock_path) as srv:
            conns = [await srv.connect() for _ in range(3)]
            for reader, writer in conns:
                writer.write(get("/x"))
                assert (await read_response(reader))[0] == 200
            assert srv.state.open_transports == 3
            srv.state.close_all()
            for reader, _ in conns:
                assert await read_eof(reader) == b""
            for _ in range(5):
                await asyncio.sleep(0.01)
            assert srv.state.open_transports == 0

    run(main())


def test_lingering_close_drops_the_rest_of_a_refused_body(sock_path: Path) -> None:
    # The client goes on sending the body it was refused; it must still read the 413,
    # not a reset, and the late bytes must not be parsed as a new request.
    async def main() -> None:
        async with serve(sock_path, max_body_bytes=100) as srv:
            reader, writer = await srv.connect()
            writer.write(get("/echo", "Content-Length: 5000", method="POST"))
            await writer.drain()
            status, _, _ = await read_response(reader)
            assert status == 413
            writer.write(b"z" * 5000 + get("/after"))
            await writer.drain()
            assert await read_eof(reader) == b""

    run(main())


def test_response_heads_the_short_way_and_the_general_way() -> None:
    from agent.serving.http import Response, render_head

    # A 200 with a JSON body on a kept connection: the one-format head.
    assert render_head(Response(200, b"{}"), True, 2) == (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n"
    )
    # Anything else goes the general way, which writes the same lines and what differs.
    assert render_head(Response(200, b"{}"), False, 2) == (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n"
    )
    binary = Response(200, b"xy", b"application/octet-stream", [(b"inference-header-content-length", b"1")])
    assert render_head(binary, True, 2) == (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: 2\r\n"
        b"inference-header-content-length: 1\r\n\r\n"
    )
    assert render_head(Response(404, b"{}"), True, 2).startswith(b"HTTP/1.1 404 Not Found\r\n")
