"""agent.sdnotify against real AF_UNIX datagram sockets, as systemd would listen."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.sdnotify import Notifier


def _receive(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    # The temp directory is bound like systemd's /run/systemd/notify would be.
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    address = tmp_path / "n.sock"
    if len(str(address)) >= 108:
        pytest.skip("temporary directory path too long for a unix socket")
    sock.bind(str(address))
    sock.settimeout(5)
    yield str(address), sock
    sock.close()


@pytest.fixture
def abstract_socket() -> Iterator[tuple[str, socket.socket]]:
    name = f"outpost-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    yield "@" + name, sock
    sock.close()


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_messages_arrive(
    kind: str,
    path_socket: tuple[str, socket.socket],
    abstract_socket: tuple[str, socket.socket],
) -> None:
    address, sock = path_socket if kind == "path" else abstract_socket
    n = Notifier.from_environment({"NOTIFY_SOCKET": address})
    assert n.enabled

    n.ready()
    assert _receive(sock) == ["READY=1"]
    n.status("loading model iris v3")
    assert _receive(sock) == ["STATUS=loading model iris v3"]
    n.watchdog()
    assert _receive(sock) == ["WATCHDOG=1"]
    n.stopping("draining 2 requests")
    assert _receive(sock) == ["STOPPING=1", "STATUS=draining 2 requests"]
    n.ready(status="serving 1 model")
    assert _receive(sock) == ["READY=1", "STATUS=serving 1 model"]
    n.close()


def test_reloading_carries_monotonic_timestamp(path_socket: tuple[str, socket.socket]) -> None:
    address, sock = path_socket
    with Notifier.from_environment({"NOTIFY_SOCKET": address}) as n:
        n.reloading()
    first, second = _receive(sock)
    assert first == "RELOADING=1"
    key, _, value = second.partition("=")
    assert key == "MONOTONIC_USEC"
    assert int(value) > 0


def test_extend_timeout(path_socket: tuple[str, socket.socket]) -> None:
    address, sock = path_socket
    with Notifier.from_environment({"NOTIFY_SOCKET": address}) as n:
        n.extend_timeout(2.5)
    assert _receive(sock) == ["EXTEND_TIMEOUT_USEC=2500000"]


def test_status_cannot_inject_assignments(path_socket: tuple[str, socket.socket]) -> None:
    address, sock = path_socket
    with Notifier.from_environment({"NOTIFY_SOCKET": address}) as n:
        n.status("bad\nREADY=1")
    assert _receive(sock) == ["STATUS=bad READY=1"]


def test_no_notify_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("no socket may be created without NOTIFY_SOCKET")

    monkeypatch.setattr(socket, "socket", forbidden)
    n = Notifier.from_environment({"WATCHDOG_USEC": "30000000"})
    assert not n.enabled
    assert n.watchdog_interval() is None
    n.ready()
    n.status("x")
    n.watchdog()
    n.stopping()
    n.reloading()
    n.close()


def test_reads_os_environ_by_default(
    monkeypatch: pytest.MonkeyPatch, path_socket: tuple[str, socket.socket]
) -> None:
    address, sock = path_socket
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    with Notifier.from_environment() as n:
        assert n.watchdog_interval() == 30.0
        n.watchdog()
    assert _receive(sock) == ["WATCHDOG=1"]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        pytest.param({"WATCHDOG_USEC": "30000000"}, 30.0, id="usec-no-pid"),
        pytest.param({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "4242"}, 0.5, id="our-pid"),
        pytest.param({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None, id="other-pid"),
        pytest.param({"WATCHDOG_USEC": "0"}, None, id="zero"),
        pytest.param({"WATCHDOG_USEC": "-5"}, None, id="negative"),
        pytest.param({"WATCHDOG_USEC": "soon"}, None, id="garbage"),
        pytest.param({"WATCHDOG_USEC": "3²"}, None, id="non-ascii-digit"),
        pytest.param({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": ""}, None, id="empty-pid"),
        pytest.param({}, None, id="absent"),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    n = Notifier.from_environment({"NOTIFY_SOCKET": "@unused", **env}, pid=4242)
    assert n.watchdog_interval() == expected


def test_missing_socket_path_does_not_raise(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    n = Notifier.from_environment({"NOTIFY_SOCKET": str(tmp_path / "absent.sock")})
    with caplog.at_level(logging.DEBUG, logger="agent.sdnotify"):
        n.ready()
        n.watchdog()
        n.watchdog()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, "the first failure is a warning, the rest are not"
    assert any(r.levelno == logging.DEBUG for r in caplog.records)
    n.close()


def test_unusable_address_disables(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="agent.sdnotify"):
        n = Notifier.from_environment({"NOTIFY_SOCKET": "relative/path"})
    assert not n.enabled
    assert "not a supported address" in caplog.text
    n.ready()
