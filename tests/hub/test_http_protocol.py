"""`outpost-hub serve`'s HTTP protocol (hub.http_protocol: httptools with the request head
bounded at max_header_bytes) on the real hub process: heads over the bound refused however they
arrive, heads under it and bodies of any size (up to the body limits) never counted against it,
pipelined and keep-alive requests still answered. tests/hub/test_api_limits.py has the single
large header and the many small ones."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator

import pytest

from tests.support.hubproc import HubProcess

pytestmark = pytest.mark.e2e

MAX_HEAD = 4096


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    settings = {"max_header_bytes": MAX_HEAD, "anon_rate_per_s": 0.0}
    process = HubProcess(tmp_path_factory.mktemp("http") / "data", settings=settings).start()
    yield process
    process.kill()


def exchange(hub: HubProcess, pieces: list[bytes], answers: int = 1, pause: float = 0.0) -> list[bytes]:
    """Sends `pieces` one send each (with `pause` between), then reads until `answers` status
    lines have come or the hub closes the connection; the status lines."""
    with socket.create_connection(("127.0.0.1", hub.port), timeout=10) as s:
        try:
            for piece in pieces:
                s.sendall(piece)
                if pause:
                    time.sleep(pause)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused and closed before everything was sent: the answer is still there
        seen = b""
        try:
            while seen.count(b"HTTP/1.1 ") < answers and (chunk := s.recv(65536)):
                seen += chunk
        except ConnectionResetError:
            pass
    return re.findall(rb"HTTP/1\.1 \d{3} [^\r]*", seen)  # a body is followed by the next status line


def head(path: str = "/healthz", extra: bytes = b"") -> bytes:
    return b"GET " + path.encode() + b" HTTP/1.1\r\nHost: hub\r\n" + extra + b"\r\n"


def test_a_head_under_the_bound_sent_in_pieces_is_answered(hub: HubProcess) -> None:
    data = head(extra=b"X-Pad: " + b"a" * (MAX_HEAD - 200) + b"\r\n")
    pieces = [data[i : i + 100] for i in range(0, len(data), 100)]
    assert exchange(hub, pieces, pause=0.001) == [b"HTTP/1.1 200 OK"]


def test_a_head_over_the_bound_sent_in_pieces_is_refused(hub: HubProcess) -> None:
    pieces = [b"GET /healthz HTTP/1.1\r\nHost: hub\r\n"] + [
        b"X-%d: %s\r\n" % (i, b"a" * 90) for i in range(100)
    ]
    answers = exchange(hub, [*pieces, b"\r\n"], pause=0.001)
    assert answers == [b"HTTP/1.1 400 Bad Request"]


def test_a_long_request_line_is_refused(hub: HubProcess) -> None:
    assert exchange(hub, [head("/tuf/metadata/" + "a" * 100_000)]) == [b"HTTP/1.1 400 Bad Request"]


def test_a_body_is_not_counted_and_the_next_request_is_answered(hub: HubProcess) -> None:
    """A body far over the head's bound, then a second request on the same connection."""
    body = b'{"model": "m", "stable": 1, "pad": "' + b"x" * 100_000 + b'"}'  # an unknown key is ignored
    put = (
        b"PUT /api/v1/groups/lab/deployment HTTP/1.1\r\nHost: hub\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + hub.token.encode() + b"\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    answers = exchange(hub, [put, body[:50_000], body[50_000:], head()], answers=2)
    assert answers == [b"HTTP/1.1 404 Not Found", b"HTTP/1.1 200 OK"]  # no such model; then healthz


def test_pipelined_requests_after_a_large_body_are_answered(hub: HubProcess) -> None:
    """All in one send: a request with a large body and two more behind it."""
    body = b"x" * 200_000
    post = b"POST /tuf/metadata/timestamp.json HTTP/1.1\r\nHost: hub\r\nContent-Length: %d\r\n\r\n" % len(
        body
    )
    answers = exchange(hub, [post + body + head("/tuf/metadata/1.root.json") + head()], answers=3)
    assert answers == [b"HTTP/1.1 405 Method Not Allowed", b"HTTP/1.1 200 OK", b"HTTP/1.1 200 OK"]


def test_many_small_requests_on_one_connection(hub: HubProcess) -> None:
    """Each head is counted on its own: 50 requests, far more head bytes in all than the bound."""
    request = head("/tuf/metadata/1.root.json", b"X-Pad: " + b"a" * 1000 + b"\r\n")
    assert exchange(hub, [request] * 50, answers=50) == [b"HTTP/1.1 200 OK"] * 50
