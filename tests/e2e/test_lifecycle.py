"""End to end: the agent's life as a daemon — start, reload, drain on SIGTERM, sockets, systemd."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from tests.support.agentproc import AgentProcess, running_agent
from tests.support.packages import affine_package, slow_package

pytestmark = pytest.mark.e2e


def x_doc(rows: np.ndarray, name: str = "x") -> dict[str, Any]:
    return {
        "inputs": [
            {"name": name, "shape": list(rows.shape), "datatype": "FP32", "data": rows.ravel().tolist()}
        ]
    }


def test_sigterm_drains_in_flight_requests(tmp_path: Path) -> None:
    """Requests in flight when SIGTERM arrives are all answered; then exit 0 and the socket is gone."""
    pkg = slow_package(tmp_path / "slow")
    agent = AgentProcess(tmp_path / "agent")
    agent.install(pkg)
    agent.start()
    rows = np.random.default_rng(0).standard_normal((128, 1024)).astype(np.float32)
    body = orjson.dumps(x_doc(rows))
    results: list[tuple[int, int]] = []
    sent = threading.Barrier(9)

    def client() -> None:
        conn_sock = socket.socket(socket.AF_UNIX)
        conn_sock.settimeout(60)
        conn_sock.connect(agent.socket)
        req = (
            b"POST /v2/models/slow/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
        ) + body
        conn_sock.sendall(req)
        sent.wait()
        data = b""
        while chunk := conn_sock.recv(1 << 20):
            data += chunk
        conn_sock.close()
        head, _, payload = data.partition(b"\r\n\r\n")
        status = int(head.split()[1])
        doc = orjson.loads(payload)
        results.append((status, len(doc["outputs"][0]["data"]) if status == 200 else -1))

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    sent.wait()
    time.sleep(0.2)  # the requests are now queued or running in the agent
    status_during = agent.json("GET", "/v1/status")[1]
    code = agent.stop()
    for t in threads:
        t.join(60)
    assert code == 0, agent.log()
    assert status_during["server"]["connections"] >= 8
    assert results == [(200, 128 * 1024)] * 8
    assert not os.path.exists(agent.socket)
    assert "stopping: draining" in agent.log()


def test_stale_socket_from_a_crash_does_not_block_start(tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path)
    agent.install(affine_package(tmp_path / "pkg"))
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(agent.socket)  # a socket file nobody listens on, as after a kill -9
    stale.close()
    assert os.path.exists(agent.socket)
    agent.start()
    try:
        assert agent.request("GET", "/v2/health/ready")[0] == 200
        assert "stale socket" in agent.log()
    finally:
        agent.kill()


def test_second_agent_on_a_live_socket_refuses_to_start(tmp_path: Path) -> None:
    with running_agent(tmp_path / "a", affine_package(tmp_path / "pkg")) as first:
        second = AgentProcess(tmp_path / "b")
        second.config.write_text(first.config.read_text())
        result = second.cli("run", check=False)
        assert result.returncode == 1
        assert "already serving" in result.stderr
        assert first.request("GET", "/v2/health/ready")[0] == 200


def test_killed_agent_restarts_and_serves(tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path)
    agent.install(affine_package(tmp_path / "pkg"))
    agent.start()
    agent.kill()  # SIGKILL: no clean-up at all
    agent.start()
    try:
        status, doc = agent.json("POST", "/v2/models/affine/infer", x_doc(np.ones((1, 4), np.float32)))
        assert status == 200, doc
    finally:
        agent.kill()


def test_install_while_running_then_pin_and_unpin(tmp_path: Path) -> None:
    with running_agent(tmp_path / "agent", affine_package(tmp_path / "v1", 1, 2.0)) as agent:
        out = agent.cli("install", str(affine_package(tmp_path / "v2", 2, 3.0))).stdout
        assert "now serves affine version 2" in out
        doc = x_doc(np.ones((1, 4), np.float32))
        assert agent.json("POST", "/v2/models/affine/infer", doc)[1]["model_version"] == "2"
        assert "default version 1 (pinned)" in agent.cli("default", "affine", "1").stdout
        answer = agent.json("POST", "/v2/models/affine/infer", doc)[1]
        assert answer["model_version"] == "1"
        assert answer["outputs"][0]["data"] == [3.0] * 4
        assert "(latest)" in agent.cli("default", "affine", "latest").stdout
        assert agent.json("POST", "/v2/models/affine/infer", doc)[1]["model_version"] == "2"
        bad = agent.cli("default", "affine", "9", check=False)
        assert bad.returncode == 1
        assert "no loaded version 9" in bad.stderr


def test_reinstalling_a_version_with_other_bytes_is_refused(tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path / "agent")
    agent.install(affine_package(tmp_path / "a", 1, 2.0))
    result = agent.cli("install", str(affine_package(tmp_path / "b", 1, 5.0)), check=False)
    assert result.returncode == 1
    assert "already installed with a different model" in result.stderr


def test_corrupt_and_failing_versions_do_not_stop_the_others(tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path / "agent")
    agent.install(affine_package(tmp_path / "good", 1))
    agent.install(affine_package(tmp_path / "bad", 2))
    # Damage version 2 on disk after install (a failing flash block, say).
    model = agent.data_dir / "models" / "affine" / "2" / "model.onnx"
    model.write_bytes(b"not an onnx model")
    agent.start()
    try:
        status, doc = agent.json("POST", "/v2/models/affine/infer", x_doc(np.ones((1, 4), np.float32)))
        assert status == 200
        assert doc["model_version"] == "1"
        st = agent.json("GET", "/v1/status")[1]
        failed = [v for v in st["models"][0]["versions"] if v["state"] == "failed"]
        assert failed and failed[0]["version"] == 2
        status, doc = agent.json(
            "POST", "/v2/models/affine/versions/2/infer", x_doc(np.ones((1, 4), np.float32))
        )
        assert status == 503
        assert "failed to load" in doc["error"]
    finally:
        agent.kill()


def test_self_test_mismatch_keeps_a_version_out(tmp_path: Path) -> None:
    pkg = affine_package(tmp_path / "pkg", 1)
    manifest = json.loads((pkg / "manifest.json").read_text())
    manifest["self_test"]["outputs"][0]["data"][0] += 1.0
    (pkg / "manifest.json").write_text(json.dumps(manifest))
    agent = AgentProcess(tmp_path / "agent")
    agent.install(pkg)
    agent.start(wait_ready=False)
    try:
        assert agent.request("GET", "/v2/health/ready")[0] == 503
        status, doc = agent.json("POST", "/v2/models/affine/infer", x_doc(np.ones((1, 4), np.float32)))
        assert status == 503
        assert "self-test mismatch" in agent.log()
    finally:
        agent.kill()


def test_no_models_means_live_but_not_ready(tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path)
    agent.start(wait_ready=False)
    try:
        assert agent.request("GET", "/v2/health/live")[0] == 200
        assert agent.request("GET", "/v2/health/ready")[0] == 503
        assert "no models installed" in agent.cli("status").stdout
    finally:
        agent.kill()


def test_idle_and_slow_connections_time_out(tmp_path: Path) -> None:
    extra = {"server": {"idle_timeout_s": 0.5, "request_timeout_s": 0.5}}
    with running_agent(tmp_path, affine_package(tmp_path / "pkg"), extra=extra) as agent:
        idle = socket.socket(socket.AF_UNIX)
        idle.connect(agent.socket)
        slow = socket.socket(socket.AF_UNIX)
        slow.connect(agent.socket)
        slow.sendall(b"POST /v2/models/affine/infer HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
        idle.settimeout(5)
        slow.settimeout(5)
        assert idle.recv(100) == b""  # closed by the agent
        answer = slow.recv(1000)
        assert answer.startswith(b"HTTP/1.1 408")
        idle.close()
        slow.close()
        assert agent.request("GET", "/v2/health/ready")[0] == 200


def test_garbage_and_abuse_do_not_disturb_good_clients(tmp_path: Path) -> None:
    extra = {"server": {"max_body_bytes": 4096, "max_header_bytes": 2048}}
    with running_agent(tmp_path, affine_package(tmp_path / "pkg"), extra=extra) as agent:
        stop = threading.Event()
        failures: list[str] = []
        good = 0

        def good_client() -> None:
            nonlocal good
            while not stop.is_set():
                status, doc = agent.json(
                    "POST", "/v2/models/affine/infer", x_doc(np.ones((1, 4), np.float32))
                )
                if status != 200:
                    failures.append(str(doc))
                good += 1

        threads = [threading.Thread(target=good_client) for _ in range(4)]
        for t in threads:
            t.start()
        abuses = [
            (b"\x00\x01\x02garbage\r\n\r\n", b"400"),
            (b"GET / HTTP/1.1\r\n" + b"X-Big: " + b"a" * 4000 + b"\r\n\r\n", b"431"),
            (b"POST /v2/models/affine/infer HTTP/1.1\r\nContent-Length: 999999\r\n\r\n", b"413"),
            (
                b"POST /v2/models/affine/infer HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                + b"1000\r\n"
                + b"a" * 4096
                + b"\r\n1000\r\n"
                + b"a" * 4096
                + b"\r\n0\r\n\r\n",
                b"413",
            ),
            (b"POST /v2/models/affine/infer HTTP/1.1\r\nContent-Length: 5\r\n\r\n\xff\xfe{{{", b"400"),
        ]
        answers = []
        expected = []
        for raw, want in abuses * 5:
            expected.append(want)
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(5)
                s.connect(agent.socket)
                try:
                    s.sendall(raw)
                    answers.append(s.recv(200).split(b"\r\n")[0])
                except OSError as exc:
                    answers.append(repr(exc).encode())
        stop.set()
        for t in threads:
            t.join()
        assert failures == []
        assert good > 0
        assert [a.split(b" ")[1] if a.startswith(b"HTTP/1.1") else a for a in answers] == expected


def test_systemd_notify_ready_watchdog_stopping(tmp_path: Path) -> None:
    notify_path = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(notify_path)
    listener.settimeout(20)
    env = {"NOTIFY_SOCKET": notify_path, "WATCHDOG_USEC": "400000"}
    agent = AgentProcess(tmp_path / "agent", env=env)
    agent.install(affine_package(tmp_path / "pkg"))
    messages: list[str] = []
    agent.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and sum("WATCHDOG=1" in m for m in messages) < 2:
            messages.append(listener.recv(4096).decode())
        assert agent.stop() == 0
        listener.settimeout(2)
        while not any("STOPPING=1" in m for m in messages):
            messages.append(listener.recv(4096).decode())
    finally:
        agent.kill()
        listener.close()
    joined = "\n".join(messages)
    assert "READY=1" in joined
    assert "STATUS=serving 1 model version(s)" in joined
    assert joined.count("WATCHDOG=1") >= 2
    assert joined.index("READY=1") < joined.index("STOPPING=1")


def test_bad_config_names_the_key(tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path, extra={"server": {"sockett": "/tmp/x"}})
    result = agent.cli("run", check=False)
    assert result.returncode == 1
    assert "server.sockett" in result.stderr
    assert "Traceback" not in result.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_tcp_listener_serves_the_same_api(tmp_path: Path) -> None:
    port = _free_port()
    extra = {"server": {"tcp": f"127.0.0.1:{port}"}}
    with running_agent(tmp_path, affine_package(tmp_path / "pkg"), extra=extra):
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request(
                "POST", "/v2/models/affine/infer", body=orjson.dumps(x_doc(np.ones((1, 4), np.float32)))
            )
            resp = conn.getresponse()
            assert resp.status == 200
            assert orjson.loads(resp.read())["outputs"][0]["data"] == [3.0] * 4
        finally:
            conn.close()


def test_socket_group_is_applied(tmp_path: Path) -> None:
    import grp

    group = grp.getgrgid(os.getgid() if os.getgid() != 0 else 1)  # gid 1 (daemon) exists on Debian
    if os.geteuid() != 0 and group.gr_gid not in os.getgroups():
        pytest.skip("needs root or membership of another group to chown the socket")
    extra = {"server": {"socket_group": group.gr_name}}
    with running_agent(tmp_path, affine_package(tmp_path / "pkg"), extra=extra) as agent:
        st = os.stat(agent.socket)
        assert st.st_gid == group.gr_gid
        assert st.st_mode & 0o777 == 0o660


def test_pipelining_without_reading_is_bounded(tmp_path: Path) -> None:
    """A client that pipelines requests and never reads: the agent stops reading from it
    (backpressure) instead of queueing without bound, and keeps serving others."""
    extra = {"server": {"max_pipelined": 8}}
    with running_agent(tmp_path, affine_package(tmp_path / "pkg"), extra=extra) as agent:
        pid = agent.proc.pid if agent.proc else 0
        body = orjson.dumps(x_doc(np.ones((1, 4), np.float32)))
        req = (b"POST /v2/models/affine/infer HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body)) + body
        hog = socket.socket(socket.AF_UNIX)
        hog.connect(agent.socket)
        hog.setblocking(False)
        sent = 0
        for _ in range(200_000):
            try:
                sent += hog.send(req)
            except BlockingIOError:
                break
        else:
            pytest.fail("the agent kept reading from a client that never reads its answers")
        status_lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        rss_kb = int(next(line.split()[1] for line in status_lines if line.startswith("VmRSS")))
        status, doc = agent.json("POST", "/v2/models/affine/infer", x_doc(np.ones((1, 4), np.float32)))
        assert status == 200, doc
        hog.close()
        assert sent < 50 * 1024 * 1024
        assert rss_kb < 400 * 1024
