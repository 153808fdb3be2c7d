"""A canary rollout through a fleet of real agents: the hub, Mosquitto, four `outpost-agent` processes
with traffic, each pulling its signed assignment, trying the candidate on probation and reporting
over MQTT. A good candidate advances 50% -> 100% by itself and becomes stable everywhere; a bad one
(it fails on the devices' inputs, so they fall back) is halted by the hub by itself, and the whole
fleet ends on the stable version.

The devices' places in the canary are chosen, not left to chance: the group's deployment is given a
known salt (with the candidate at 0%) before the rollout starts, which keeps it while ramping, and
the device ids are picked so that two of the four are under 50 for that salt."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.update.canary import bucket
from tests.e2e.test_update import Traffic, served_version, update_status
from tests.support.agentproc import AgentProcess
from tests.support.broker import Mosquitto, mosquitto_available
from tests.support.hubproc import HubProcess
from tests.support.packages import wine_versions, with_probation

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed (make sysdeps)"),
]

GROUP = "fleet"


def wait_for(what: str, check: Any, timeout: float = 120.0, detail: Any = None) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {detail() if detail else ''}")
        time.sleep(0.2)


def devices_for(salt: str, inside: int, outside: int) -> list[str]:
    """Device ids with `inside` of them in the first half of the canary for `salt`, `outside` not."""
    ins = [f"dev-{i}" for i in range(1000) if bucket(salt, f"dev-{i}") < 50][:inside]
    outs = [f"dev-{i}" for i in range(1000) if bucket(salt, f"dev-{i}") >= 50][:outside]
    return ins + outs


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    from examples.broken_versions import make_failing_variant

    out = tmp_path_factory.mktemp("wine")
    archives = wine_versions(out, versions=(1, 2))
    tars = {v: with_probation(a.with_suffix(""), out / f"fast-wine-{v}.tar") for v, a in archives.items()}
    failing = make_failing_variant(archives[1].with_suffix(""), out, 3).with_suffix("")
    tars[3] = with_probation(failing, out / "fast-wine-3.tar")
    return tars


@pytest.fixture
def fleet(tmp_path: Path, packages: dict[int, Path]) -> Iterator[tuple[HubProcess, list[AgentProcess]]]:
    broker = Mosquitto(tmp_path / "broker", persistence=True).start()
    hub = HubProcess(tmp_path / "hub", settings={"rollout_interval_s": 0.5}).start(mqtt_url=broker.url)
    root = tmp_path / "root.json"
    root.write_bytes(hub.root)
    agents: list[AgentProcess] = []
    try:
        for version in (1, 2, 3):
            hub.outpost("push", str(packages[version]), "--quiet")
        salt = "rollout-salt-1"
        put = {"model": "wine", "stable": 1, "candidate": 2, "percent": 0, "salt": salt}
        assert hub.api("PUT", f"/api/v1/groups/{GROUP}/deployment", json=put).status_code == 200
        for name in devices_for(salt, inside=2, outside=2):
            agent = AgentProcess(
                tmp_path / name,
                extra={
                    "device_id": name,
                    "group": GROUP,
                    "hub": {"url": hub.url, "trusted_root": str(root), "poll_interval_s": 0.3},
                    "mqtt": {"url": broker.url, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
                    "monitor": {"window_s": 1.0},
                },
            )
            agents.append(agent)
            agent.start(wait_ready=False)
        yield hub, agents
    finally:
        for agent in agents:
            agent.kill()
        hub.kill()
        broker.kill()


def rollout(hub: HubProcess, rollout_id: int) -> dict[str, Any]:
    doc: dict[str, Any] = hub.api("GET", f"/api/v1/rollouts/{rollout_id}").json()
    return doc


def test_a_good_candidate_ramps_to_everyone_and_a_bad_one_halts_by_itself(
    fleet: tuple[HubProcess, list[AgentProcess]],
) -> None:
    hub, agents = fleet
    for agent in agents:
        wait_for(f"{agent.root.name} to serve v1", lambda a=agent: served_version(a) == "1")
    traffic = [Traffic(agent, clients=1) for agent in agents]
    for t in traffic:
        t.__enter__()
    try:
        for agent in agents:
            wait_for(
                f"{agent.root.name} to commit v1",
                lambda a=agent: update_status(a)["state"] == "committed",
                detail=lambda a=agent: update_status(a),
            )

        start = {
            "model": "wine",
            "candidate": 2,
            "group": GROUP,
            "steps": [50, 100],
            "min_seconds": 2.0,
            "min_requests": 30,
            # Two versions of one model on a busy 2-core test machine: latency is too noisy to judge;
            # and the traffic is one fixed row (test_update.x_doc), which the monitor rightly sees as
            # drift: the drift gate has its own test (tests/hub/test_rollouts_e2e.py).
            "gates": {"max_latency_ratio": 20.0, "halt_on_drift": False},
        }
        resp = hub.api("POST", "/api/v1/rollouts", json=start)
        assert resp.status_code in (200, 201), resp.text
        good = resp.json()["id"]
        wait_for("the good rollout to complete", lambda: rollout(hub, good)["state"] == "completed",
                 timeout=180, detail=lambda: rollout(hub, good))  # fmt: skip
        actions = [d["action"] for d in rollout(hub, good)["decisions"]]
        assert actions[0] == "start" and "advance" in actions and actions[-1] == "complete", actions
        for agent in agents:
            wait_for(f"{agent.root.name} on v2", lambda a=agent: served_version(a) == "2")
        assert all(t.failures == [] for t in traffic), [t.failures[:3] for t in traffic]

        salt = "rollout-salt-2"
        put = {"model": "wine", "stable": 2, "candidate": 3, "percent": 0, "salt": salt}
        assert hub.api("PUT", f"/api/v1/groups/{GROUP}/deployment", json=put).status_code == 200
        bad_start = {**start, "candidate": 3, "min_seconds": 30.0}
        resp = hub.api("POST", "/api/v1/rollouts", json=bad_start)
        assert resp.status_code in (200, 201), resp.text
        bad = resp.json()["id"]
        wait_for("the bad rollout to halt", lambda: rollout(hub, bad)["state"] == "halted",
                 timeout=180, detail=lambda: rollout(hub, bad))  # fmt: skip
        doc = rollout(hub, bad)
        halt = doc["decisions"][-1]
        assert halt["action"] == "halt" and halt["actor"] == "controller", halt
        assert doc["reason"], doc
        group = hub.api("GET", f"/api/v1/groups/{GROUP}").json()
        assert group["current"]["stable"] == 2 and group["current"]["percent"] == 0, group
        for agent in agents:  # the fleet is back on the stable version
            wait_for(f"{agent.root.name} back on v2", lambda a=agent: served_version(a) == "2")
    finally:
        for t in traffic:
            t.__exit__(None, None, None)
