"""On-device experiments end to end: the hub signs an assignment naming an A/B or shadow experiment,
a real agent in the canary keeps its committed version and loads the candidate beside it.

A/B: unversioned requests are split by the weight (within a tolerance), a request key always gets
the same version, and the response says which version answered. Shadow: every answer comes from
the stable version, unchanged; the candidate's copies are compared (its summary window carries the
agreement) and fed-back labels score both. Ending the experiment unloads the candidate."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.e2e.test_update import Traffic, served_version, update_status, x_doc
from tests.support.agentproc import AgentProcess
from tests.support.broker import Mosquitto, mosquitto_available
from tests.support.hubproc import HubProcess
from tests.support.packages import affine_package, fast_wine_versions
from tests.support.waiting import wait_for

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed (make sysdeps)"),
]

GROUP = "trial"


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    out = tmp_path_factory.mktemp("wine")
    tars = fast_wine_versions(out, versions=(1, 2))
    # A "wine" version 3 that is another model altogether: 4 inputs named x, not wine's 13.
    tars[3] = affine_package(out / "not-wine", version=3, name="wine")
    return tars


@pytest.fixture
def device(tmp_path: Path, packages: dict[int, Path]) -> Iterator[tuple[HubProcess, AgentProcess]]:
    broker = Mosquitto(tmp_path / "broker", persistence=True).start()
    hub = HubProcess(tmp_path / "hub").start(mqtt_url=broker.url)
    root = tmp_path / "root.json"
    root.write_bytes(hub.root)
    agent = AgentProcess(
        tmp_path / "dev",
        extra={
            "device_id": "dev-x",
            "group": GROUP,
            "hub": {"url": hub.url, "trusted_root": str(root), "poll_interval_s": 0.3},
            "mqtt": {"url": broker.url},
            "monitor": {"window_s": 1.0},
        },
    )
    try:
        for version in (1, 2, 3):
            hub.outpost("push", str(packages[version]), "--quiet")
        deploy(hub, stable=1)
        agent.start(wait_ready=False)
        wait_for("v1 to serve", lambda: served_version(agent) == "1")
        with Traffic(agent):
            wait_for("v1 committed", lambda: update_status(agent)["state"] == "committed")
        yield hub, agent
    finally:
        agent.kill()
        hub.kill()
        broker.kill()


def deploy(
    hub: HubProcess, stable: int, experiment: dict[str, Any] | None = None, candidate: int = 2
) -> None:
    body: dict[str, Any] = {"model": "wine", "stable": stable}
    if experiment is not None:
        body.update(candidate=candidate, percent=100, experiment=experiment)
    resp = hub.api("PUT", f"/api/v1/groups/{GROUP}/deployment", json=body)
    assert resp.status_code == 200, resp.text


def experiment_of(agent: AgentProcess) -> dict[str, Any] | None:
    models = agent.json("GET", "/v1/status")[1]["models"]
    found: dict[str, Any] | None = next((m for m in models if m["name"] == "wine"), {}).get("experiment")
    return found


def infer(agent: AgentProcess, key: str | None = None) -> dict[str, Any]:
    doc = x_doc()
    if key is not None:
        doc["parameters"] = {"key": key}
    status, answer = agent.json("POST", "/v2/models/wine/infer", doc)
    assert status == 200, answer
    return dict(answer)


def test_ab_splits_by_weight_and_keys_stick(device: tuple[HubProcess, AgentProcess]) -> None:
    hub, agent = device
    deploy(hub, stable=1, experiment={"mode": "ab", "weight": 30})
    wait_for("the A/B experiment", lambda: (experiment_of(agent) or {}).get("mode") == "ab",
             detail=lambda: update_status(agent))  # fmt: skip
    assert update_status(agent)["current"].startswith("wine v1")  # still the committed version
    versions = [infer(agent)["model_version"] for _ in range(600)]
    share = versions.count("2") / len(versions)
    assert set(versions) == {"1", "2"} and 0.22 < share < 0.38, share
    for key in ("user-1", "user-2", "user-3", "user-4"):
        answered = {infer(agent, key)["model_version"] for _ in range(15)}
        assert len(answered) == 1, (key, answered)
    keyed = [infer(agent, f"customer-{i}")["model_version"] for i in range(300)]
    assert 0.2 < keyed.count("2") / len(keyed) < 0.4
    assert infer(agent)["model_name"] == "wine"
    # A request naming a version bypasses the experiment.
    status, doc = agent.json("POST", "/v2/models/wine/versions/1/infer", x_doc())
    assert status == 200 and doc["model_version"] == "1"
    counts = experiment_of(agent)
    assert counts is not None and counts["answered"]["candidate"] > 0

    deploy(hub, stable=1)  # no experiment: the candidate goes
    wait_for("the experiment to end", lambda: experiment_of(agent) is None)
    assert {infer(agent)["model_version"] for _ in range(50)} == {"1"}
    wait_for("v2 unloaded", lambda: "2" not in agent.json("GET", "/v2/models/wine")[1]["versions"])


def test_shadow_never_changes_an_answer_and_reports_agreement(
    device: tuple[HubProcess, AgentProcess],
) -> None:
    hub, agent = device
    rows = np.random.default_rng(5).normal(size=(40, 13)).astype(np.float32) * 10 + 50
    body = {
        "inputs": [{"name": "input", "shape": [40, 13], "datatype": "FP32", "data": rows.ravel().tolist()}]
    }
    before = agent.json("POST", "/v2/models/wine/infer", body)[1]["outputs"]

    deploy(hub, stable=1, experiment={"mode": "shadow", "sample": 100})
    wait_for("the shadow experiment", lambda: (experiment_of(agent) or {}).get("mode") == "shadow",
             detail=lambda: update_status(agent))  # fmt: skip
    answers = [infer(agent) for _ in range(200)]
    assert {a["model_version"] for a in answers} == {"1"}  # the stable version answers everything
    status, during = agent.json("POST", "/v2/models/wine/infer", body)
    assert status == 200 and during["model_version"] == "1" and during["outputs"] == before

    label = agent.json("POST", "/v1/feedback", {"id": answers[0]["id"], "label": 0})[1]
    assert label["version"] == 1 and label["shadow"]["version"] == 2  # both arms scored
    state = experiment_of(agent)
    assert state is not None and state["copied"] > 0

    def shadow_summed() -> dict[str, Any] | None:
        resp = hub.api("GET", "/api/v1/fleet/summary", params={"model": "wine", "version": 2})
        summary = resp.json().get("summary") if resp.status_code == 200 else None
        return (summary or {}).get("shadow")

    wait_for(
        "the candidate's shadow windows at the hub", lambda: (shadow_summed() or {}).get("compared", 0) >= 150
    )
    compared = shadow_summed()
    assert compared is not None and compared["agreed"] == compared["compared"]  # v2 is v1 retrained alike


def test_a_candidate_unlike_the_stable_version_is_refused_and_serving_goes_on(
    device: tuple[HubProcess, AgentProcess],
) -> None:
    hub, agent = device
    deploy(hub, stable=1, experiment={"mode": "ab", "weight": 50}, candidate=3)

    def last() -> dict[str, Any]:
        found: dict[str, Any] = update_status(agent).get("experiment_last") or {}
        return found

    wait_for("the refusal", lambda: last().get("transition") == "failed", detail=lambda: update_status(agent))
    assert "inputs" in last()["reason"] and last()["mode"] == "ab"
    assert experiment_of(agent) is None
    assert {infer(agent)["model_version"] for _ in range(50)} == {"1"}
