"""Inference over MQTT against the socket: the same agent, the same tabular request, two transports.

    python -m tests.benchmarks.run --only mqtt [--quick]

One agent with [mqtt_inference] on, a real Mosquitto on loopback, and a paho MQTT v5 client in this
process (what a device's app would run). Measured: 1 client (one request at a time: the round trip
app -> broker -> agent -> broker -> app) and 16 requests kept in flight, each for the usual warm-up
and duration; the socket's figures come from the benchmark's own client on the same agent. The
MQTT client checks the first answer against onnxruntime and counts every answer that is not a
prediction (there should be none: max_inflight is above the 16 in flight).
"""

from __future__ import annotations

import shutil
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

IN_FLIGHT = 16


def _no_delay(_client: Any, _userdata: Any, sock: Any) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _MqttLoad:
    """A paho MQTT v5 requester keeping `depth` requests in flight for a while."""

    def __init__(self, url: str, topic: str) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self._props_cls: Any = Properties
        self._packet = PacketTypes.PUBLISH
        host, port = url.removeprefix("mqtt://").split(":")
        self.topic = topic
        self.reply = f"bench/replies/{time.time_ns()}"
        self._sent: dict[bytes, int] = {}
        self.latencies_ns: list[int] = []
        self.bad = 0
        self.first: bytes | None = None
        self._slots = threading.Semaphore(1)
        self._lock = threading.Lock()
        self._recording = False
        self.client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        # As an app that cares for latency would: paho leaves Nagle's algorithm on.
        self.client.on_socket_open = _no_delay
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(host, int(port))
        self.client.subscribe(self.reply, qos=1)
        self.client.loop_start()
        if not subscribed.wait(10):
            raise RuntimeError("the benchmark's MQTT client could not subscribe")

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        now = time.perf_counter_ns()
        correlation = msg.properties.CorrelationData
        with self._lock:
            sent = self._sent.pop(correlation, None)
            if self.first is None:
                self.first = bytes(msg.payload)
            if b'"outputs"' not in msg.payload[:4096]:
                self.bad += 1
            if sent is not None and self._recording:
                self.latencies_ns.append(now - sent)
        self._slots.release()

    def run(self, payload: bytes, depth: int, warmup_s: float, duration_s: float) -> dict[str, Any]:
        self._slots = threading.Semaphore(depth)
        self.latencies_ns, self.bad = [], 0
        start = time.perf_counter()
        end = start + warmup_s + duration_s
        n = 0
        measured_from = 0.0
        while True:
            now = time.perf_counter()
            if now >= end:
                break
            if not self._recording and now >= start + warmup_s:
                self._recording, measured_from = True, now
            if not self._slots.acquire(timeout=10):
                raise RuntimeError("no MQTT answer within 10 s")
            props = self._props_cls(self._packet)
            props.ResponseTopic = self.reply
            props.CorrelationData = correlation = n.to_bytes(8, "big")
            with self._lock:
                self._sent[correlation] = time.perf_counter_ns()
            self.client.publish(self.topic, payload, qos=1, properties=props)
            n += 1
        for _ in range(depth):  # the last answers
            self._slots.acquire(timeout=10)
        elapsed = time.perf_counter() - measured_from
        self._recording = False
        lat = sorted(self.latencies_ns)
        if not lat:
            raise RuntimeError("no MQTT answer was measured")
        return {
            "status": "ok",
            "count": len(lat),
            "throughput_rps": len(lat) / elapsed,
            "p50_us": lat[len(lat) // 2] / 1e3,
            "p99_us": lat[min(len(lat) - 1, int(len(lat) * 0.99))] / 1e3,
            "mean_us": statistics.fmean(lat) / 1e3,
            "not_predictions": self.bad,
        }

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def run(packages: Any, wl: Any, st: Any, quick: bool = False) -> dict[str, Any]:
    from tests.benchmarks import run as bench
    from tests.benchmarks.models import TABULAR
    from tests.benchmarks.servers import Server
    from tests.support.agentproc import AgentProcess
    from tests.support.broker import Mosquitto, mosquitto_available

    if not mosquitto_available():
        return {"status": "unavailable: mosquitto is not installed (make sysdeps)"}
    work = Path(tempfile.mkdtemp(prefix="ob-mqtt-"))
    # Mosquitto leaves Nagle's algorithm on by default: with the peers' delayed ACKs a small answer
    # can wait ~40 ms per hop. A broker serving requests wants set_tcp_nodelay (see the README).
    broker = Mosquitto(work / "broker", extra_config="set_tcp_nodelay true\n").start()
    agent: AgentProcess | None = None
    load: _MqttLoad | None = None
    try:
        agent = AgentProcess(
            work / "agent",
            extra={
                "device_id": "bench-mqtt",
                "mqtt_inference": {"enabled": True, "url": broker.url, "max_inflight": 2 * IN_FLIGHT},
            },
        )
        agent.install(packages.tabular)
        agent.start()
        deadline = time.monotonic() + 30
        while not agent.json("GET", "/v1/status")[1]["mqtt_inference"]["subscribed"]:
            if time.monotonic() > deadline:
                raise TimeoutError("the agent did not subscribe")
            time.sleep(0.05)
        server = Server("agent", agent.socket, agent.proc, agent.log_path)  # type: ignore[arg-type]
        socket = {
            "c1": bench.measure(server, wl.tab_json, TABULAR, wl.tab_expected, 1, st),
            "c16": bench.measure(server, wl.tab_json, TABULAR, wl.tab_expected, IN_FLIGHT, st),
        }
        load = _MqttLoad(broker.url, f"outpost/local/bench-mqtt/models/{TABULAR}/infer")
        body = wl.tab_json.split(b"\r\n\r\n", 1)[1]  # the socket's request is a whole HTTP message
        mqtt = {
            "c1": load.run(body, 1, st.warmup_s, st.duration_s),
            "c16": load.run(body, IN_FLIGHT, st.warmup_s, st.duration_s),
        }
        first = orjson.loads(load.first or b"{}")
        for out in first.get("outputs", []):
            expected = wl.tab_expected[out["name"]]
            if not np.allclose(np.array(out["data"]).reshape(expected.shape), expected, atol=1e-4):
                return {"status": f"invalid: the MQTT answer's {out['name']} differs from onnxruntime's"}
        status = agent.json("GET", "/v1/status")[1]["mqtt_inference"]
    except Exception as exc:
        return {"status": f"failed: {type(exc).__name__}: {exc}"}
    finally:
        if load is not None:
            load.close()
        if agent is not None:
            agent.kill()
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)
    for fig in (*socket.values(), *mqtt.values()):
        if fig.get("status") != "ok":
            return {"status": f"failed: {fig.get('status')}"}
    return {
        "status": "ok",
        "socket": socket,
        "mqtt": mqtt,
        "busy": status["busy"],
        "errors": status["errors"],
        "p50_ratio_c1": mqtt["c1"]["p50_us"] / socket["c1"]["p50_us"],
    }


def verdict(result: dict[str, Any]) -> dict[str, Any]:
    row = {"target": "mqtt: 1-client p50 over MQTT (via Mosquitto) vs the socket", "threshold": "measured",
           "contender": "agent"}  # fmt: skip
    if result.get("status") != "ok":
        return {**row, "measured": "n/a", "value": None, "verdict": "n/a"}
    m, s = result["mqtt"]["c1"], result["socket"]["c1"]
    measured = f"{m['p50_us']:.0f} vs {s['p50_us']:.0f} µs ({result['p50_ratio_c1']:.1f}x)"
    return {**row, "measured": measured, "value": result["p50_ratio_c1"], "verdict": "info"}


def render(result: dict[str, Any], markdown: bool = False) -> str:
    title = "Inference over MQTT vs the socket (tabular model, same agent)"
    if result.get("status") != "ok":
        return f"{'### ' if markdown else ''}{title}: {result.get('status')}"
    s, m = result["socket"], result["mqtt"]
    lines = [f"{'### ' if markdown else ''}{title}", ""]
    for key, label in (("c1", "1 client"), ("c16", f"{IN_FLIGHT} in flight")):
        lines.append(
            f"- {label}: socket p50 {s[key]['p50_us']:.0f} µs, p99 {s[key]['p99_us']:.0f} µs, "
            f"{s[key]['throughput_rps']:,.0f} req/s; MQTT p50 {m[key]['p50_us']:.0f} µs, "
            f"p99 {m[key]['p99_us']:.0f} µs, {m[key]['throughput_rps']:,.0f} req/s"
        )
    not_predictions = m["c1"]["not_predictions"] + m["c16"]["not_predictions"]
    lines.append(
        f"- MQTT answers that were not predictions: {not_predictions} "
        f"(busy {result['busy']}, errors {result['errors']}); the client is paho in the benchmark's process"
    )
    return "\n".join(lines)
