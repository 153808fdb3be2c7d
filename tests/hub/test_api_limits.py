"""The hub's request limits (hub.api.guard) on the real outpost-hub process over loopback:
body sizes refused with 413 before they are read, oversized headers refused by the HTTP
server, token buckets per operator token and per address (429 with Retry-After), and the TUF
files left unlimited."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator

import pytest
import requests

from tests.support.hubproc import HUB_BIN, HubProcess

pytestmark = pytest.mark.e2e

MAX_REQUEST = 4096
MAX_UPLOAD = 65536
UPLOAD_LIMIT = MAX_UPLOAD + 8 * 1024 * 1024  # hub.api.guard.upload_limit


def raw_request(hub: HubProcess, head: bytes, timeout: float = 10.0) -> bytes:
    """Sends `head` on a fresh connection; the answer, its head and the body its
    Content-Length announces (or up to the connection's end)."""
    with socket.create_connection(("127.0.0.1", hub.port), timeout=timeout) as s:
        s.sendall(head)
        answer = b""
        while b"\r\n\r\n" not in answer and (chunk := s.recv(65536)):
            answer += chunk
        top, _, body = answer.partition(b"\r\n\r\n")
        length = next(
            (
                int(line.split(b":")[1])
                for line in top.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ),
            0,
        )
        while len(body) < length and (chunk := s.recv(65536)):
            body += chunk
        return top + b"\r\n\r\n" + body


@pytest.fixture(scope="module")
def sized_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    settings = {
        "max_request_bytes": MAX_REQUEST,
        "max_upload_bytes": MAX_UPLOAD,
        "max_header_bytes": 16384,
        "anon_rate_per_s": 0.0,
    }
    hub = HubProcess(tmp_path_factory.mktemp("sized") / "data", settings=settings).start()
    yield hub
    hub.kill()


def test_a_json_body_over_the_limit_is_refused_before_it_is_sent(sized_hub: HubProcess) -> None:
    """Content-Length alone decides: the hub answers 413 without waiting for the body."""
    head = (
        b"PUT /api/v1/groups/lab/deployment HTTP/1.1\r\nHost: hub\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + sized_hub.token.encode() + b"\r\n"
        b"Content-Length: 10000000\r\n\r\n"
    )
    answer = raw_request(sized_hub, head, timeout=5.0)
    assert answer.startswith(b"HTTP/1.1 413"), answer
    assert b"4096" in answer


def test_a_streamed_json_body_over_the_limit_is_cut_off(sized_hub: HubProcess) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer encoding
        yield b'{"model": "m", "stable": 1, "salt": "'
        for _ in range(100):
            yield b"x" * 1000
        yield b'"}'

    answer = sized_hub.api("PUT", "/api/v1/groups/lab/deployment", data=chunks())
    assert answer.status_code == 413, answer.text
    assert "4096" in answer.json()["detail"]


def test_a_json_body_under_the_limit_is_read(sized_hub: HubProcess) -> None:
    answer = sized_hub.api("PUT", "/api/v1/groups/lab/deployment", json={"model": "m", "stable": 1})
    assert answer.status_code == 404, answer.text  # read, parsed and judged: no such model


def test_an_upload_over_the_limit_is_refused_before_it_is_sent(sized_hub: HubProcess) -> None:
    head = (
        b"POST /api/v1/models/m/versions HTTP/1.1\r\nHost: hub\r\n"
        b"Authorization: Bearer " + sized_hub.token.encode() + b"\r\n"
        b"Content-Length: %d\r\n\r\n" % (UPLOAD_LIMIT + 1)
    )
    answer = raw_request(sized_hub, head, timeout=5.0)
    assert answer.startswith(b"HTTP/1.1 413"), answer


def test_a_streamed_upload_over_the_limit_is_cut_off(sized_hub: HubProcess) -> None:
    sent = 0

    def chunks() -> Iterator[bytes]:
        nonlocal sent
        while sent < 4 * UPLOAD_LIMIT:
            sent += 1 << 20
            yield b"\0" * (1 << 20)

    try:
        answer = sized_hub.api("POST", "/api/v1/models/m/versions", data=chunks())
        assert answer.status_code == 413, answer.text
    except requests.ConnectionError:
        pass  # the hub answered and closed while the client was still sending: also a refusal
    assert sent < 2 * UPLOAD_LIMIT  # the hub stopped reading near the limit


def test_an_unauthenticated_body_is_not_read(sized_hub: HubProcess) -> None:
    """401 before the body: a malformed one is not even parsed (it used to be a 400 or 422)."""
    answer = sized_hub.api(
        "PUT",
        "/api/v1/groups/lab/deployment",
        auth=False,
        data=b"{not json",
        headers={"Content-Type": "application/json"},
    )
    assert answer.status_code == 401
    assert answer.headers["WWW-Authenticate"] == "Bearer"


def test_oversized_headers_are_refused(sized_hub: HubProcess) -> None:
    fine = raw_request(
        sized_hub, b"GET /healthz HTTP/1.1\r\nHost: hub\r\nX-Big: " + b"a" * 8000 + b"\r\n\r\n"
    )
    assert fine.startswith(b"HTTP/1.1 200"), fine
    big = raw_request(
        sized_hub, b"GET /healthz HTTP/1.1\r\nHost: hub\r\nX-Big: " + b"a" * 1_000_000 + b"\r\n\r\n"
    )
    assert big.startswith(b"HTTP/1.1 400"), big
    many = b"".join(b"X-%d: a\r\n" % i for i in range(100_000))
    answer = raw_request(sized_hub, b"GET /healthz HTTP/1.1\r\nHost: hub\r\n" + many + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 400"), answer


RATE = 0.5  # a token every 2 s: slow enough that a loaded test machine cannot refill a bucket mid-test


@pytest.fixture(scope="module")
def limited_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    settings = {"api_rate_per_s": RATE, "api_burst": 5, "anon_rate_per_s": RATE, "anon_burst": 3}
    hub = HubProcess(tmp_path_factory.mktemp("limited") / "data", settings=settings).start()
    yield hub
    hub.kill()


def new_token(hub: HubProcess, name: str) -> str:
    result = subprocess.run(
        [HUB_BIN, "token", "create", name, "--data", str(hub.data)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return result.stdout.strip().splitlines()[-1]


def client(address: str) -> dict[str, str]:
    """Headers (a new dict: HubProcess.api adds to it) of requests as if from `address`:
    uvicorn takes X-Forwarded-For from a proxy on 127.0.0.1, so each test is a client of its
    own (and the reverse-proxy case is tested on the way)."""
    return {"X-Forwarded-For": address}


def test_each_operator_token_has_its_bucket(limited_hub: HubProcess) -> None:
    one, other = new_token(limited_hub, "one"), new_token(limited_hub, "other")

    def models(token: str) -> requests.Response:
        return limited_hub.api("GET", "/api/v1/models", token=token, headers=client("10.0.0.1"))

    assert [models(one).status_code for _ in range(5)] == [200] * 5
    refused = models(one)
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["Retry-After"]) <= 2
    assert "'one'" in refused.json()["detail"]
    assert models(other).status_code == 200  # its own bucket
    time.sleep(1 / RATE + 0.1)  # one token is back
    assert models(one).status_code == 200


def test_requests_without_a_valid_token_are_limited_per_address(limited_hub: HubProcess) -> None:
    token = new_token(limited_hub, "anon-test")
    here, elsewhere = "10.0.0.2", "10.0.0.3"
    answers = [
        limited_hub.api("GET", "/api/v1/models", auth=False, headers=client(here)).status_code
        for _ in range(2)
    ]
    answers.append(limited_hub.api("GET", "/api/v1/models", token="wrong", headers=client(here)).status_code)
    assert answers == [401, 401, 401]
    refused = limited_hub.api("GET", "/api/v1/models", token="wrong", headers=client(here))
    assert refused.status_code == 429
    assert int(refused.headers["Retry-After"]) >= 1
    # While the address is over its budget, its tokens are not even looked up; other addresses go on.
    assert limited_hub.api("GET", "/api/v1/models", token=token, headers=client(here)).status_code == 429
    assert limited_hub.api("GET", "/api/v1/models", token=token, headers=client(elsewhere)).status_code == 200
    assert limited_hub.api("GET", "/api/v1/models", auth=False, headers=client(elsewhere)).status_code == 401
    # The TUF files are not limited: devices have no token, and many share one address.
    for _ in range(20):
        tuf = requests.get(limited_hub.url + "/tuf/metadata/timestamp.json", headers=client(here), timeout=10)
        assert tuf.status_code == 200
    time.sleep(1 / RATE + 0.1)
    assert limited_hub.api("GET", "/api/v1/models", token=token, headers=client(here)).status_code == 200


def test_failed_dashboard_logins_are_limited_per_address(limited_hub: HubProcess) -> None:
    def login(token: str) -> requests.Response:
        form = {"token": token, "next": "/"}
        return requests.post(
            limited_hub.url + "/login",
            data=form,
            headers=client("10.0.0.4"),
            allow_redirects=False,
            timeout=10,
        )

    assert [login("guess").status_code for _ in range(3)] == [401, 401, 401]
    refused = login(limited_hub.token)  # even the right token waits: guessing must not pay off
    assert refused.status_code == 429
    assert int(refused.headers["Retry-After"]) >= 1
    assert "Too many" in refused.text
    time.sleep(1 / RATE + 0.1)
    assert login(limited_hub.token).status_code == 303


def test_the_operator_cli_waits_out_a_429(limited_hub: HubProcess) -> None:
    """hub.client (the `outpost` CLI) sleeps as Retry-After says and asks again."""
    from hub.client import HubClient, HubTarget

    client = HubClient(HubTarget(limited_hub.url, new_token(limited_hub, "cli")))
    started = time.monotonic()
    for _ in range(6):  # the burst is 5: the sixth waits for a token
        assert client.models() == []
    assert 1.0 <= time.monotonic() - started < 10.0
