"""End to end across the whole system: a real Mosquitto, the hub consuming telemetry, and an
agent that updates from the hub and reports over MQTT."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

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
        time.sleep(0.1)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(tmp_path / "broker") as b:
        yield b


def fleet(hub: HubProcess) -> dict[str, dict[str, Any]]:
    return {d["device_id"]: d for d in hub.api("GET", "/api/v1/fleet").json()}


def test_device_reports_its_state_and_updates_and_obeys_a_command(tmp_path: Path, broker: Mosquitto) -> None:
    wine = wine_versions(tmp_path / "wine", versions=(1,))
    hub = HubProcess(tmp_path / "hub").start(mqtt_url=broker.url)
    root = tmp_path / "root.json"
    root.write_bytes(hub.root)
    agent = AgentProcess(
        tmp_path / "dev",
        extra={
            "device_id": "dev-042",
            "group": "plant",
            # A long poll interval: only the command makes the device check soon.
            "hub": {"url": hub.url, "trusted_root": str(root), "poll_interval_s": 3600},
            "mqtt": {"url": broker.url},
        },
    )
    try:
        agent.start(wait_ready=False)
        wait_for(
            "the device online in the fleet", lambda: fleet(hub).get("dev-042", {}).get("online") is True
        )
        assert fleet(hub)["dev-042"]["group"] == "plant"

        hub.outpost("push", str(wine[1]), "--quiet")
        hub.outpost("deploy", "wine", "1", "--group", "plant")
        resp = hub.api("POST", "/api/v1/fleet/dev-042/command", json={"command": "update"})
        assert resp.status_code == 202, resp.text
        wait_for(
            "the update, reported over MQTT",
            lambda: any(
                m["kind"] == "event"
                and m["body"].get("event") == "update"
                and m["body"].get("to") == "probation"
                for m in hub.api("GET", "/api/v1/fleet/dev-042").json()["recent"]
            ),
        )
        wait_for("the retained state to show v1", lambda: fleet(hub)["dev-042"]["versions"].get("wine") == 1)
        assert "dev-042" in hub.outpost("fleet").stdout

        assert agent.stop() == 0  # a clean stop publishes the death state
        wait_for("the device offline", lambda: fleet(hub)["dev-042"]["online"] is False)
    finally:
        agent.kill()
        hub.kill()
