"""Inference over MQTT end to end: a real agent process, a real Mosquitto, and a paho MQTT v5 client
that asks with a response topic and correlation data, as a device's app would."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.support.agentproc import AgentProcess
from tests.support.broker import Mosquitto, mosquitto_available
from tests.support.packages import affine_package

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed (make sysdeps)"),
]

PREFIX = "outpost/local/test-device"
MAX_INFLIGHT = 4
NO_DELAY = "set_tcp_nodelay true\n"  # as the README advises for a broker that carries requests
HOLD_MS = 400  # the "held" model waits this long to fill a batch: its requests stay in flight


def wait_for(what: str, check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


Answer = tuple[bytes, dict[str, str], str | None]  # payload, user properties, content type


class Requester:
    """An app's MQTT v5 client: publishes requests, collects the answers by correlation data."""

    def __init__(self, url: str, username: str = "", password: str = "") -> None:
        host, port = url.removeprefix("mqtt://").split(":")
        self.reply_topic = f"app/replies/{uuid.uuid4().hex}"
        self.answers: dict[bytes, list[Answer]] = {}
        self._cond = threading.Condition()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        subscribed = threading.Event()
        self.client.on_connect = lambda c, *_: c.subscribe(self.reply_topic, qos=1)
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_message = self._on_message
        if username:
            self.client.username_pw_set(username, password)
        self.client.connect(host, int(port))
        self.client.loop_start()
        assert subscribed.wait(10), "the app could not subscribe to its reply topic"

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        props = msg.properties
        correlation = getattr(props, "CorrelationData", b"")
        user = dict(getattr(props, "UserProperty", []))
        with self._cond:
            self.answers.setdefault(correlation, []).append(
                (bytes(msg.payload), user, getattr(props, "ContentType", None))
            )
            self._cond.notify_all()

    def send(
        self,
        topic: str,
        payload: bytes | dict[str, Any],
        correlation: bytes | None = None,
        user: list[tuple[str, str]] | None = None,
        response_topic: bool = True,
    ) -> bytes:
        correlation = correlation if correlation is not None else os.urandom(16)
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        if response_topic:
            props.ResponseTopic = self.reply_topic
            props.CorrelationData = correlation
        if user:
            props.UserProperty = user
        body = orjson.dumps(payload) if isinstance(payload, dict) else payload
        self.client.publish(topic, body, qos=1, properties=props).wait_for_publish(10)
        return correlation

    def wait(self, correlation: bytes, timeout: float = 30.0) -> Answer:
        with self._cond:
            assert self._cond.wait_for(lambda: correlation in self.answers, timeout), "no answer"
            return self.answers[correlation][0]

    def ask(self, topic: str, payload: bytes | dict[str, Any], **kwargs: Any) -> tuple[Any, dict[str, str]]:
        """Send and wait; the answer as JSON and its user properties."""
        body, user, _ = self.wait(self.send(topic, payload, **kwargs))
        return orjson.loads(body), user

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def x_input(rows: np.ndarray, request_id: str | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "inputs": [
            {"name": "x", "shape": list(rows.shape), "datatype": "FP32", "data": rows.ravel().tolist()}
        ]
    }
    if request_id is not None:
        doc["id"] = request_id
    return doc


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    with Mosquitto(tmp_path_factory.mktemp("broker"), extra_config=NO_DELAY) as b:
        yield b


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory, broker: Mosquitto) -> Iterator[AgentProcess]:
    packages = tmp_path_factory.mktemp("packages")
    a = AgentProcess(
        tmp_path_factory.mktemp("agent"),
        extra={
            "mqtt_inference": {
                "enabled": True,
                "url": broker.url,
                "max_inflight": MAX_INFLIGHT,
                "max_payload_bytes": 64 * 1024,
                "reconnect_min_s": 0.1,
                "reconnect_max_s": 0.5,
            },
            "runtime": {"models": {"held": {"max_queue_delay_ms": HOLD_MS}}},
        },
    )
    a.install(affine_package(packages / "affine-1", version=1, scale=2.0))
    a.install(affine_package(packages / "affine-2", version=2, scale=3.0))
    a.install(affine_package(packages / "held-1", name="held"))
    a.start()
    try:
        wait_for("the agent's subscriptions", lambda: mqtt_status(a)["subscribed"])
        yield a
    finally:
        a.kill()


@pytest.fixture(scope="module")
def app(broker: Mosquitto) -> Iterator[Requester]:
    r = Requester(broker.url)
    yield r
    r.close()


def mqtt_status(agent: AgentProcess) -> dict[str, Any]:
    status, doc = agent.json("GET", "/v1/status")
    assert status == 200
    return dict(doc["mqtt_inference"])


def test_the_answer_is_the_sockets_answer(agent: AgentProcess, app: Requester) -> None:
    rows = np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32)
    for path, version in (("models/affine", "2"), ("models/affine/versions/1", "1")):
        doc = x_input(rows, request_id=f"req-{version}")
        status, expected = agent.json("POST", f"/v2/{path}/infer", doc)
        assert status == 200, expected
        answer, user = app.ask(f"{PREFIX}/{path}/infer", doc)
        assert answer == expected
        assert answer["model_version"] == version
        assert user["status"] == "200"
    # Without an id, the agent names the prediction, as on the socket.
    answer, _ = app.ask(f"{PREFIX}/models/affine/infer", x_input(rows))
    assert answer["id"]
    np.testing.assert_array_equal(np.array(answer["outputs"][0]["data"], np.float32), (rows * 3 + 1).ravel())


def test_correlation_data_is_echoed_byte_for_byte(app: Requester) -> None:
    topic = f"{PREFIX}/models/affine/infer"
    doc = x_input(np.ones((1, 4), np.float32))
    sent = [bytes(range(256)), b"\x00", os.urandom(64), b"\xff\xfe not utf-8 \x80"]
    for correlation in sent:
        app.send(topic, doc, correlation=correlation)
    for correlation in sent:
        body, _, content_type = app.wait(correlation)
        assert orjson.loads(body)["outputs"][0]["data"] == [4.0] * 4
        assert content_type == "application/json"


def test_binary_tensors_through_a_user_property(app: Requester) -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    header = orjson.dumps(
        {
            "inputs": [
                {"name": "x", "shape": [2, 4], "datatype": "FP32", "parameters": {"binary_data_size": 32}}
            ],
            "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
        }
    )
    correlation = app.send(
        f"{PREFIX}/models/affine/infer",
        header + x.tobytes(),
        user=[("Inference-Header-Content-Length", str(len(header)))],
    )
    body, user, content_type = app.wait(correlation)
    n = int(user["Inference-Header-Content-Length"])
    assert content_type == "application/octet-stream"
    assert orjson.loads(body[:n])["outputs"][0]["parameters"]["binary_data_size"] == 32
    np.testing.assert_array_equal(np.frombuffer(body[n:], "<f4").reshape(2, 4), x * 3 + 1)


BAD_REQUESTS = [
    pytest.param("models/affine/infer", b"{not json", 400, "not valid JSON", id="malformed"),
    pytest.param("models/nope/infer", {"inputs": []}, 404, "nope", id="unknown-model"),
    pytest.param("models/affine/versions/9/infer", None, 404, "9", id="unknown-version"),
    pytest.param(
        "models/affine/infer",
        x_input(np.ones((2, 3), np.float32)),
        400,
        "does not fit the model's",
        id="bad-shape",
    ),
    pytest.param("models/affine/infer", b"x" * (64 * 1024 + 1), 413, "max_payload_bytes", id="too-large"),
    pytest.param("models//infer", None, 404, "not an inference topic", id="empty-model-level"),
]


@pytest.mark.parametrize(("path", "payload", "status", "reason"), BAD_REQUESTS)
def test_errors_are_answers_with_a_reason(
    agent: AgentProcess,
    app: Requester,
    path: str,
    payload: bytes | dict[str, Any] | None,
    status: int,
    reason: str,
) -> None:
    answer, user = app.ask(f"{PREFIX}/{path}", payload if payload is not None else x_input(np.ones((1, 4))))
    assert answer["status"] == status and user["status"] == str(status)
    assert reason in answer["error"]
    # ... and the agent keeps serving, on MQTT and on the socket.
    ok, _ = app.ask(f"{PREFIX}/models/affine/infer", x_input(np.ones((1, 4), np.float32)))
    assert ok["outputs"][0]["data"] == [4.0] * 4
    assert agent.request("GET", "/v2/health/ready")[0] == 200


def test_a_request_without_response_topic_is_counted_and_dropped(agent: AgentProcess, app: Requester) -> None:
    before = mqtt_status(agent)["no_response_topic"]
    app.send(f"{PREFIX}/models/affine/infer", x_input(np.ones((1, 4), np.float32)), response_topic=False)
    wait_for("the dropped request counted", lambda: mqtt_status(agent)["no_response_topic"] == before + 1)
    answer, _ = app.ask(f"{PREFIX}/models/affine/infer", x_input(np.ones((1, 4), np.float32)))
    assert "outputs" in answer
    assert agent.log().count("has no response topic") == 1


def test_beyond_max_inflight_the_answer_is_busy(agent: AgentProcess, app: Requester) -> None:
    before = mqtt_status(agent)
    n = 3 * MAX_INFLIGHT
    doc = x_input(np.ones((1, 4), np.float32))
    correlations = [app.send(f"{PREFIX}/models/held/infer", doc) for _ in range(n)]
    answers = [app.wait(c) for c in correlations]
    time.sleep(HOLD_MS / 1000 + 0.3)  # a late second answer would show up by now
    assert all(len(app.answers[c]) == 1 for c in correlations), "a request got two answers"
    docs = [orjson.loads(body) for body, _, _ in answers]
    ok = [d for d in docs if "outputs" in d]
    busy = [d for d in docs if d.get("error") == "busy"]
    assert len(ok) + len(busy) == n, docs
    assert busy and all(d["status"] == 503 for d in busy)
    assert MAX_INFLIGHT <= len(ok) < n
    after = mqtt_status(agent)
    assert after["busy"] - before["busy"] == len(busy)
    assert after["inflight"] == 0


def test_status_and_metrics(agent: AgentProcess, app: Requester) -> None:
    status = mqtt_status(agent)
    assert status["enabled"] and status["connected"] and status["subscribed"]
    assert status["topic_prefix"] == PREFIX
    assert status["requests"] == status["answered"] + status["errors"] + status["no_response_topic"]
    assert status["errors"] > 0 and status["busy"] > 0 and status["not_sent"] == 0
    code, _, body = agent.request("GET", "/metrics")
    text = body.decode()
    assert code == 200
    assert "outpost_mqtt_inference_connected 1.0" in text
    assert f"outpost_mqtt_inference_busy_total {float(status['busy'])}" in text
    assert f"outpost_mqtt_inference_requests_total {float(status['requests'])}" in text
    # MQTT requests are counted per model version like the socket's (the monitor sees them too).
    held = [
        line for line in text.splitlines() if line.startswith('outpost_inference_requests_total{model="held"')
    ]
    assert held and float(held[0].rsplit(" ", 1)[1]) >= MAX_INFLIGHT


def test_a_broker_restart_resubscribes(agent: AgentProcess, app: Requester, broker: Mosquitto) -> None:
    connections = mqtt_status(agent)["connections"]
    broker.stop()
    wait_for("the agent to see the broker gone", lambda: not mqtt_status(agent)["connected"])
    broker.start()
    wait_for(
        "the agent to reconnect and subscribe",
        lambda: (s := mqtt_status(agent))["subscribed"] and s["connections"] == connections + 1,
    )
    wait_for("the app to reconnect", app.client.is_connected)
    # The app's subscription went with the broker too (clean start): subscribe again.
    app.client.subscribe(app.reply_topic, qos=1)
    time.sleep(0.2)
    for i in range(3):
        answer, _ = app.ask(f"{PREFIX}/models/affine/infer", x_input(np.full((1, 4), i, np.float32)))
        assert answer["outputs"][0]["data"] == [3.0 * i + 1] * 4


def test_stop_disconnects_cleanly(agent: AgentProcess, broker: Mosquitto) -> None:
    started = time.monotonic()
    assert agent.stop() == 0
    assert time.monotonic() - started < 10
    wait_for(
        "the broker to log the disconnect", lambda: "outpost-infer-test-device disconnected" in broker.log()
    )
    assert "inference over MQTT" in agent.log()


def test_off_by_default_no_paho(tmp_path: Path) -> None:
    """Without [mqtt_inference] (and no telemetry broker) the agent serves and paho is never imported."""
    doc = {"data_dir": str(tmp_path / "data"), "server": {"socket": str(tmp_path / "a.sock")}}
    code = f"""
import asyncio, sys
from agent.config import parse_config
from agent.daemon import Agent

async def main():
    cfg = parse_config({doc!r})
    agent = Agent(cfg)
    await agent.start()
    status = agent.app.status()["mqtt_inference"]
    await agent.stop()
    print(status, sorted(m for m in sys.modules if m.split(".")[0] == "paho"))

asyncio.run(main())
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "{'enabled': False} []"


def test_readme_snippet(tmp_path: Path) -> None:
    """The README's paho example runs as written against a real agent and broker."""
    import re

    from examples.train_example import build_example

    readme = Path(__file__).resolve().parents[2] / "README.md"
    blocks = re.findall(r"```python\n(.*?)```", readme.read_text(), re.S)
    snippet = next(b for b in blocks if "ResponseTopic" in b)
    with Mosquitto(tmp_path / "broker", extra_config=NO_DELAY) as broker:
        a = AgentProcess(
            tmp_path / "agent",
            extra={"device_id": "dev-001", "mqtt_inference": {"enabled": True, "url": broker.url}},
        )
        a.install(build_example(tmp_path / "wine"))
        a.start()
        try:
            wait_for("the agent's subscriptions", lambda: mqtt_status(a)["subscribed"])
            code = snippet.replace(
                'client.connect("127.0.0.1", 1883)', f'client.connect("127.0.0.1", {broker.port})'
            )
            scope: dict[str, Any] = {}
            exec(compile(code, "README.md", "exec"), scope)
            answer = scope["answers"][b"req-1"]
            assert answer["model_name"] == "wine"
            assert [o["name"] for o in answer["outputs"]] == ["label", "probabilities"]
        finally:
            a.kill()


def test_no_broker_serving_goes_on_and_stop_is_quick(tmp_path: Path) -> None:
    """An unreachable broker: the socket serves, status says why, and SIGTERM still exits at once."""
    from tests.support.broker import free_port

    a = AgentProcess(
        tmp_path / "agent",
        extra={
            "mqtt_inference": {
                "enabled": True,
                "url": f"mqtt://127.0.0.1:{free_port()}",
                "reconnect_max_s": 30,
            }
        },
    )
    a.install(affine_package(tmp_path / "affine-1"))
    a.start()
    try:
        time.sleep(1.0)  # a few connection attempts
        status = mqtt_status(a)
        assert status["enabled"] and not status["connected"] and status["connections"] == 0
        assert status["last_error"].startswith("cannot connect to mqtt://127.0.0.1:")
        code, doc = a.json("POST", "/v2/models/affine/infer", x_input(np.ones((1, 4), np.float32)))
        assert code == 200, doc
        started = time.monotonic()
        assert a.stop() == 0
        assert time.monotonic() - started < 5
    finally:
        a.kill()


@pytest.mark.skipif(not shutil.which("mosquitto_passwd"), reason="mosquitto_passwd is not installed")
def test_login_with_a_password_file(tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwd), "agent-infer", "s3cret"], check=True)
    subprocess.run(["mosquitto_passwd", "-b", str(passwd), "app", "app-pass"], check=True)

    def config(m: Mosquitto) -> str:
        return (
            f"listener {m.port} 127.0.0.1\nallow_anonymous false\npassword_file {passwd}\n"
            f"log_dest file {m.log_path}\nset_tcp_nodelay true\n"
        )

    (tmp_path / "infer.pass").write_text("s3cret\n")
    with Mosquitto(tmp_path / "broker", config=config) as broker:
        a = AgentProcess(
            tmp_path / "agent",
            extra={
                "mqtt_inference": {
                    "enabled": True,
                    "url": broker.url,
                    "username": "agent-infer",
                    "password_file": str(tmp_path / "infer.pass"),
                }
            },
        )
        a.install(affine_package(tmp_path / "affine-1"))
        a.start()
        r = Requester(broker.url, "app", "app-pass")
        try:
            wait_for("the agent's subscriptions", lambda: mqtt_status(a)["subscribed"])
            answer, _ = r.ask(f"{PREFIX}/models/affine/infer", x_input(np.ones((1, 4), np.float32)))
            assert answer["outputs"][0]["data"] == [3.0] * 4
        finally:
            r.close()
            a.kill()
