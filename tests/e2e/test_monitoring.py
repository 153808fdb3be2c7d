"""The monitor end to end: a real agent serving the wine example, a real Mosquitto, and a subscriber
that reads what the device publishes. Summaries must carry the right figures for a known traffic
pattern (counted independently here: the packager's binning, the answers the agent gave), labels
fed back must show up as accuracy, and a shifted input stream must raise a drift alert after k
windows while the unshifted one raises none (fixed seeds).
"""

from __future__ import annotations

import csv
import json
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.monitor.summary import merge
from hub.packager import profile as hub_profile
from tests.support.agentproc import AgentProcess
from tests.support.broker import Mosquitto, mosquitto_available
from tests.support.hubproc import HubProcess
from tests.support.packages import wine_versions

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed (make sysdeps)"),
]


def wait_for(what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Collector:
    """Subscribes to every device topic and keeps each JSON payload by kind."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("mqtt://").split(":")
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        subscribed = threading.Event()
        self.client.on_connect = lambda c, *_: c.subscribe("outpost/v1/#", qos=1)
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(host, int(port))
        self.client.loop_start()
        assert subscribed.wait(10), "the collector could not subscribe"

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic.rsplit("/", 1)[-1], json.loads(msg.payload)))

    def of(self, kind: str) -> list[dict[str, Any]]:
        with self._lock:
            return [body for k, body in self.messages if k == kind]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture(scope="module")
def wine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], np.ndarray, np.ndarray]:
    """The wine package, its manifest, and the sample its reference profile was built from."""
    out = tmp_path_factory.mktemp("wine")
    package = wine_versions(out, versions=(1,))[1]
    with tarfile.open(package) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("manifest.json"))
        handle = tar.extractfile(member)
        assert handle is not None
        manifest = json.load(handle)
    with (out / "wine-sample.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    table = np.asarray(rows[1:], dtype=np.float64)
    return package, manifest, table[:, :-1], table[:, -1].astype(np.int64)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(tmp_path / "broker") as b:
        yield b


@pytest.fixture
def collector(broker: Mosquitto) -> Iterator[Collector]:
    c = Collector(broker.url)
    yield c
    c.close()


def start_agent(tmp_path: Path, package: Path, broker: Mosquitto, **monitor: Any) -> AgentProcess:
    agent = AgentProcess(
        tmp_path / "dev",
        extra={
            "device_id": "dev-7",
            "group": "lab",
            # A quick reconnect: on a loaded test machine a first attempt that fails would otherwise
            # wait out the default back-off (doubling up to 60 s) before any window is sent.
            "mqtt": {"url": broker.url, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
            "monitor": monitor,
        },
    )
    agent.install(package)
    return agent.start()


def infer(agent: AgentProcess, rows: np.ndarray) -> dict[str, Any]:
    body = {
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": list(rows.shape), "data": rows.ravel().tolist()}
        ]
    }
    status, doc = agent.json("POST", "/v2/models/wine/infer", body)
    assert status == 200, doc
    return dict(doc)


def labels_of(doc: dict[str, Any]) -> list[int]:
    return [int(v) for v in next(o for o in doc["outputs"] if o["name"] == "label")["data"]]


def test_summaries_count_the_traffic_exactly_and_feedback_becomes_accuracy(
    tmp_path: Path,
    wine: tuple[Path, dict[str, Any], np.ndarray, np.ndarray],
    broker: Mosquitto,
    collector: Collector,
) -> None:
    package, manifest, x, y = wine
    agent = start_agent(tmp_path, package, broker, window_requests=130, drift_min_rows=100, window_s=3600.0)
    try:
        rng = np.random.default_rng(7)
        order = rng.integers(0, len(x), size=270)
        sent: list[np.ndarray] = []
        predicted: list[int] = []
        ids: list[tuple[str, int]] = []
        for i in range(250):  # single rows, then ten requests of two rows: 260 requests, 270 rows
            doc = infer(agent, x[order[i : i + 1]].astype(np.float32))
            sent.append(x[order[i : i + 1]])
            predicted += labels_of(doc)
            ids.append((doc["id"], int(y[order[i]])))
            if i == 199:  # labels for twenty predictions, inside the second window
                correct = 0
                for pid, truth in ids[:20]:
                    status, result = agent.json("POST", "/v1/feedback", {"id": pid, "label": truth})
                    assert status == 200, result
                    correct += result["correct"]
                status, again = agent.json("POST", "/v1/feedback", {"id": ids[0][0], "label": ids[0][1]})
                assert status == 404 and "already labelled" in again["error"]
        for j in range(10):
            rows = x[order[250 + 2 * j : 252 + 2 * j]]
            predicted += labels_of(infer(agent, rows.astype(np.float32)))
            sent.append(rows)

        wait_for("two summary windows", lambda: len(collector.of("summary")) >= 2)
        first, second = collector.of("summary")[:2]
        assert (first["requests"], second["requests"]) == (130, 130)
        assert first["device_id"] == "dev-7" and second["seq"] > first["seq"]
        total = merge(
            {k: v for k, v in first.items() if k not in ("device_id", "seq", "ts")},
            {k: v for k, v in second.items() if k not in ("device_id", "seq", "ts")},
        )
        rows = np.concatenate(sent).astype(np.float32).astype(np.float64)
        assert total["requests"] == 260 and total["rows"] == 270 and total["errors"] == 0
        assert sum(total["latency"]["counts"]) == 260
        for i, (feature, ref) in enumerate(
            zip(total["features"], manifest["reference_profile"]["features"], strict=True)
        ):
            assert feature["name"] == ref["name"]
            assert feature["counts"] == hub_profile.bin_counts(ref["bin_edges"], rows[:, i]), feature["name"]
            assert feature["missing"] == 0
        assert total["prediction"]["counts"] == np.bincount(predicted, minlength=3).tolist()
        assert total["feedback"] == {"labelled": 20, "correct": correct}
        assert first["feedback"]["labelled"] == 0 and second["feedback"]["labelled"] == 20

        wait_for("a drift message per window", lambda: len(collector.of("drift")) >= 2)
        drift = collector.of("drift")[0]
        assert drift["model"] == "wine" and drift["rows"] == 130
        assert [f["name"] for f in drift["features"]] == [f["name"] for f in total["features"]]
        assert drift["alert"] is False

        status, doc = agent.json("GET", "/v1/status")
        (version,) = doc["monitor"]["versions"]
        assert version["windows_published"] == 2 and version["errors"] == 0
    finally:
        agent.kill()


def test_a_shifted_stream_raises_a_drift_alert_after_k_windows_and_a_faithful_one_none(
    tmp_path: Path,
    wine: tuple[Path, dict[str, Any], np.ndarray, np.ndarray],
    broker: Mosquitto,
    collector: Collector,
) -> None:
    package, manifest, x, _y = wine
    names = [f["name"] for f in manifest["reference_profile"]["features"]]
    alcohol = names.index("alcohol")
    # Windows of 8 requests of 50 rows: 400 rows each, drawn from the reference sample itself.
    agent = start_agent(tmp_path, package, broker, window_requests=8, drift_min_rows=200, drift_k=3)
    try:
        rng = np.random.default_rng(20261127)

        def window(shift: float) -> None:
            for _ in range(8):
                rows = x[rng.integers(0, len(x), size=50)].copy()
                rows[:, alcohol] += shift * x[:, alcohol].std()
                infer(agent, rows.astype(np.float32))

        for _ in range(5):
            window(0.0)
        wait_for("five drift windows", lambda: len(collector.of("drift")) >= 5)
        faithful = collector.of("drift")[:5]
        assert not any(d["alert"] for d in faithful), [d["drifted"] for d in faithful]
        assert all(len(d["features"]) == len(names) and d["rows"] == 400 for d in faithful)

        for _ in range(3):
            window(1.0)
        wait_for("eight drift windows", lambda: len(collector.of("drift")) >= 8)
        shifted = collector.of("drift")[5:8]
        assert all("alcohol" in d["drifted"] for d in shifted), [d["drifted"] for d in shifted]
        assert [d["alert"] for d in shifted] == [False, False, True]
        assert "alcohol" in shifted[-1]["alerting"] and shifted[-1]["streak"] == 3
        feature = next(f for f in shifted[-1]["features"] if f["name"] == "alcohol")
        assert feature["test"] == "ks" and feature["p_value"] < 0.001 and feature["psi"] > 0.25
        status, doc = agent.json("GET", "/v1/status")
        assert doc["monitor"]["versions"][0]["drift_alert"] is True
        assert "input drift in alcohol" in agent.log()
    finally:
        agent.kill()


def test_every_window_reaches_the_hub_once_across_a_broker_outage_and_an_agent_restart(
    tmp_path: Path, wine: tuple[Path, dict[str, Any], np.ndarray, np.ndarray]
) -> None:
    """Windows made while the broker is down, some by an agent that is then restarted, wait in the
    outbox; when the broker is back every one reaches the hub, and none twice (the hub's sums are
    exact). The broker persists sessions, as packaging/mosquitto/outpost.conf does: the hub's
    subscription survives the broker's restart, so what devices send before the hub is back is
    queued for it. (Without that, messages a device sends after a broker restart and before the hub
    has subscribed again have no subscriber, and the broker drops them.)"""
    package, _manifest, x, _y = wine
    broker = Mosquitto(tmp_path / "broker", persistence=True).start()
    hub = HubProcess(tmp_path / "hub").start(mqtt_url=broker.url)
    agent = AgentProcess(
        tmp_path / "dev",
        extra={
            "device_id": "dev-9",
            "group": "lab",
            "mqtt": {"url": broker.url, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
            "monitor": {"window_requests": 20, "window_s": 3600.0},
        },
    )
    try:
        hub.outpost("push", str(package), "--quiet")
        agent.install(package)
        agent.start()
        rng = np.random.default_rng(3)

        def traffic(n: int) -> None:
            for _ in range(n):
                infer(agent, x[rng.integers(0, len(x), size=1)].astype(np.float32))

        def summed() -> dict[str, Any]:
            resp = hub.api("GET", "/api/v1/fleet/summary", params={"model": "wine", "version": 1})
            assert resp.status_code == 200, resp.text
            return dict(resp.json())

        def requests() -> int:
            s = summed()["summary"]
            return int(s["requests"]) if s else 0

        # The hub has subscribed once it shows the device's (retained) birth.
        wait_for(
            "the device online at the hub",
            lambda: any(
                d["device_id"] == "dev-9" and d["online"] for d in hub.api("GET", "/api/v1/fleet").json()
            ),
        )
        traffic(40)  # two windows, delivered at once
        wait_for("two windows at the hub", lambda: requests() == 40)

        broker.stop()
        traffic(70)  # three full windows and ten requests of an open one
        assert agent.stop() == 0  # the open window goes into the outbox at the stop
        agent.start()
        traffic(30)  # one more full window, ten requests left open
        status, doc = agent.json("GET", "/v1/status")
        assert doc["telemetry"]["connected"] is False, doc["telemetry"]

        broker.start()
        wait_for("the buffered windows at the hub", lambda: requests() == 40 + 70 + 20, timeout=120)
        assert agent.stop() == 0
        wait_for("the last window at the hub", lambda: requests() == 140)
        doc = summed()
        assert doc["windows"] == 2 + 4 + 1 + 1 and doc["summary"]["rows"] == 140
        assert doc["devices"] == 1 and doc["summary"]["errors"] == 0
        time.sleep(1.0)  # anything sent twice would have arrived by now
        assert requests() == 140 and summed()["windows"] == 8
    finally:
        agent.kill()
        hub.kill()
        broker.kill()
