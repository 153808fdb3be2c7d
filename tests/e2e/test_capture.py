"""Data capture for retraining end to end: a real agent, hub and Mosquitto.

What must hold: nothing is captured until the group's deployment asks for it; once asked (100%
here, so every figure is exact), every request reaches the hub once, with its inputs, its
prediction and the label fed back for it, across a broker outage (the outbox keeps the batches);
`outpost capture export` gives them back as CSV rows a retraining job can read; stopping capture
stops it on the device."""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.e2e.test_update import served_version, update_status
from tests.support.agentproc import AgentProcess
from tests.support.broker import Mosquitto, mosquitto_available
from tests.support.hubproc import HubProcess
from tests.support.packages import fast_wine_versions
from tests.support.waiting import wait_for

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed (make sysdeps)"),
]

GROUP = "field"


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[HubProcess, AgentProcess, Mosquitto]]:
    tars = fast_wine_versions(tmp_path / "wine", versions=(1,))
    broker = Mosquitto(tmp_path / "broker", persistence=True).start()
    hub = HubProcess(tmp_path / "hub").start(mqtt_url=broker.url)
    root = tmp_path / "root.json"
    root.write_bytes(hub.root)
    agent = AgentProcess(
        tmp_path / "dev",
        extra={
            "device_id": "dev-c",
            "group": GROUP,
            "hub": {"url": hub.url, "trusted_root": str(root), "poll_interval_s": 0.3},
            "mqtt": {"url": broker.url, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
            "capture": {"flush_s": 0.5, "batch_rows": 25},
        },
    )
    try:
        hub.outpost("push", str(tars[1]), "--quiet")
        resp = hub.api("PUT", f"/api/v1/groups/{GROUP}/deployment", json={"model": "wine", "stable": 1})
        assert resp.status_code == 200, resp.text
        agent.start(wait_ready=False)
        wait_for("v1 to serve", lambda: served_version(agent) == "1")
        yield hub, agent, broker
    finally:
        agent.kill()
        hub.kill()
        broker.kill()


def capture_status(agent: AgentProcess) -> dict[str, Any]:
    status: dict[str, Any] = agent.json("GET", "/v1/status")[1]["capture"]
    return status


def send(agent: AgentProcess, rows: np.ndarray) -> list[dict[str, Any]]:
    answers = []
    for x in rows:
        doc = {"inputs": [{"name": "input", "shape": [1, 13], "datatype": "FP32", "data": [x.tolist()]}]}
        status, answer = agent.json("POST", "/v2/models/wine/infer", doc)
        assert status == 200, answer
        answers.append(answer)
    return answers


def export(hub: HubProcess, *args: str) -> list[dict[str, str]]:
    out = hub.outpost("capture", "export", "--model", "wine", "--version", "1", *args).stdout
    return list(csv.DictReader(io.StringIO(out)))


def hub_rows(hub: HubProcess) -> int:
    resp = hub.api("GET", "/api/v1/capture")
    assert resp.status_code == 200, resp.text
    return sum(int(v["rows"]) for v in resp.json()["versions"] if v["model"] == "wine")


def test_capture_is_opt_in_exact_and_survives_a_broker_outage(
    fleet: tuple[HubProcess, AgentProcess, Mosquitto],
) -> None:
    hub, agent, broker = fleet
    rng = np.random.default_rng(5)
    x = (rng.normal(size=(150, 13)) * 10 + 50).astype(np.float32)

    # Not asked for: requests are served, nothing is kept or sent.
    send(agent, x[:20])
    time.sleep(1.0)  # two flush intervals
    assert capture_status(agent)["models"] == {}
    assert hub_rows(hub) == 0

    hub.outpost("capture", "start", "--group", GROUP, "--sample", "100%", "--max-rows-per-min", "6000")
    wait_for(
        "the device to capture",
        lambda: capture_status(agent)["models"].get("wine", {}).get("sample_bp") == 10_000,
        detail=lambda: (capture_status(agent), update_status(agent)),
    )
    first = send(agent, x[20:80])
    # The broker goes away: batches wait in the device's outbox, then arrive once.
    broker.stop()
    second = send(agent, x[80:150])
    labelled = {a["id"]: int(a["outputs"][0]["data"][0]) for a in (first + second)[::3]}
    for pid, label in labelled.items():
        status, doc = agent.json("POST", "/v1/feedback", {"id": pid, "label": label})
        assert status == 200 and doc["captured"] is True, doc
    time.sleep(1.0)
    broker.start()
    wait_for("130 captured requests at the hub", lambda: hub_rows(hub) == 130, timeout=60,
             detail=lambda: (hub_rows(hub), capture_status(agent)))  # fmt: skip

    answers = {a["id"]: (i + 20, a) for i, a in enumerate(first + second)}
    rows = export(hub)
    assert len(rows) == 130 and {r["id"] for r in rows} == set(answers)
    header = list(rows[0])
    features = header[header.index("row") + 1 : header.index("predicted")]
    assert len(features) == 13
    for r in rows:
        i, answer = answers[r["id"]]
        assert r["device_id"] == "dev-c" and r["group"] == GROUP and r["version"] == "1" and r["row"] == "0"
        np.testing.assert_allclose([float(r[f]) for f in features], x[i], rtol=1e-6)
        assert str(r["predicted"]) == str(answer["outputs"][0]["data"][0])
        expected_label = labelled.get(r["id"])
        assert r["label"] == ("" if expected_label is None else str(expected_label))
    only = export(hub, "--labelled-only")
    assert {r["id"] for r in only} == set(labelled)

    # Stopped: the device keeps nothing more.
    hub.outpost("capture", "stop", "--group", GROUP)
    wait_for("capture off on the device", lambda: capture_status(agent)["models"] == {})
    send(agent, x[:30])
    time.sleep(1.0)
    assert hub_rows(hub) == 130
