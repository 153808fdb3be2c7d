"""The agent's busy poll after answers, on the real process: it polls while a client keeps asking,
stops when the client stops, turns itself off under sparse traffic, and shows its cost in /metrics."""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import numpy as np
import orjson
import psutil
import pytest

from tests.support.agentproc import AgentProcess, running_agent
from tests.support.packages import affine_package

pytestmark = pytest.mark.e2e


def _request() -> bytes:
    body = orjson.dumps(
        {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]}]}
    )
    head = b"POST /v2/models/affine/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
    return head + body


def _closed_loop(agent: AgentProcess, count: int, pause_s: float = 0.0) -> None:
    """One keep-alive connection asking again as soon as (or `pause_s` after) each answer is in."""
    raw = _request()
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(agent.socket)
        for _ in range(count):
            s.sendall(raw)
            answer = b""
            while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
                chunk = s.recv(65536)
                assert chunk, "the agent closed the connection"
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
            assert b'"data":[3.0,5.0,7.0,9.0]' in answer
            if pause_s:
                time.sleep(pause_s)


def _metric(agent: AgentProcess, name: str) -> float | None:
    text = agent.request("GET", "/metrics")[2].decode()
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(match.group(1)) if match else None


def _cpu_s(agent: AgentProcess) -> float:
    times = psutil.Process(agent.proc.pid).cpu_times()
    return float(times.user + times.system)


def test_polls_while_asked_and_stops_when_not(tmp_path: Path) -> None:
    package = affine_package(tmp_path / "affine-1", version=1, scale=2.0)
    # A 10 ms maximum: a test machine's client, however slow, asks again within it.
    with running_agent(tmp_path / "agent", package, extra={"server": {"busy_poll_us": 10_000}}) as agent:
        _closed_loop(agent, 300)
        # The client asked again soon after every answer: the window stayed open (it starts at a
        # quarter of the maximum and grows only when a request comes after it closed).
        window = _metric(agent, "outpost_busy_poll_window_seconds")
        assert window is not None and 0.0025 <= window <= 0.01
        spent = _metric(agent, "outpost_busy_poll_seconds_total")
        assert spent is not None and spent > 0

        # Nobody asks: the poll ended with the last answer's window, so the agent sleeps.
        time.sleep(0.3)
        before = _cpu_s(agent)
        time.sleep(1.0)
        idle_cpu = _cpu_s(agent) - before
        assert idle_cpu < 0.2, f"an idle agent used {idle_cpu:.2f} s of CPU in 1 s: still polling?"

        # Requests 40 ms apart (further apart than the maximum): the window halves at each and
        # ends at 0, so sparse traffic costs no polling at all.
        _closed_loop(agent, 15, pause_s=0.04)
        assert _metric(agent, "outpost_busy_poll_window_seconds") == 0.0
        spent_sparse = _metric(agent, "outpost_busy_poll_seconds_total")
        # What the sparse requests cost: their windows (10 + 5 + 2.5 + ... ms < 20 ms; the bound leaves
        # room for a loaded machine descheduling the agent mid-poll). A poll that did not stop
        # would count the whole 0.6 s of this phase.
        assert spent_sparse is not None and spent_sparse - spent < 0.2


def test_off_when_configured_so(tmp_path: Path) -> None:
    package = affine_package(tmp_path / "affine-1", version=1, scale=2.0)
    with running_agent(tmp_path / "agent", package, extra={"server": {"busy_poll_us": 0}}) as agent:
        _closed_loop(agent, 50)
        assert _metric(agent, "outpost_busy_poll_window_seconds") is None
        assert _metric(agent, "outpost_busy_poll_seconds_total") is None
        rows = np.ones((1, 4), np.float32)
        status, doc = agent.json(
            "POST",
            "/v2/models/affine/infer",
            {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": rows.ravel().tolist()}]},
        )
        assert status == 200 and doc["outputs"][0]["data"] == [3.0] * 4
