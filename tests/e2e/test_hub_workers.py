"""Several hub processes on one PostgreSQL, one data directory and one broker (issue 8).

Two `outpost-hub serve` processes (own ports, own MQTT client ids) share the database, the
blobs and the signed TUF repository (its writers serialised by the repository's lock), and
split the devices' telemetry through the shared subscription. What must hold: pushes and
deploys made at the same time through either process all land, and a device verifying through
either process sees every group's latest assignment; every telemetry window is stored once
whichever process took it; a rollout driven by two controllers advances and completes once.
Then the outages: with the database down, a deploy is refused cleanly (nothing signed) and the
windows devices send are stored once it is back; with the broker restarted, the devices'
outboxes deliver what they made meanwhile."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from agent.config import HubConfig
from agent.update.canary import Assignment
from agent.update.tuf_client import UpdateClient
from tests.e2e.test_update import served_version, update_status
from tests.support.agentproc import AgentProcess
from tests.support.broker import Mosquitto, mosquitto_available
from tests.support.hubproc import HubProcess
from tests.support.packages import fast_wine_versions
from tests.support.postgres import PostgresServer, PostgresUnavailable
from tests.support.waiting import wait_for

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.postgres,
    pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed (make sysdeps)"),
]

GROUPS = [f"g{i}" for i in range(6)]


@pytest.fixture
def pg() -> Iterator[PostgresServer]:
    """A cluster of this test's own: it is stopped and started again in the middle."""
    try:
        server = PostgresServer.start_private()
    except PostgresUnavailable as exc:
        pytest.skip(f"no PostgreSQL for the tests: {exc}")
    yield server
    server.stop()


def verified_stable(hub: HubProcess, root: Path, group: str, where: Path) -> int:
    """The stable version of `group` as a device verifies it through `hub` (TUF, from `root`)."""
    client = UpdateClient(
        HubConfig(url=hub.url, trusted_root=str(root)),
        group,
        where / group / "meta",
        where / group / "targets",
    )
    try:
        signed = client.check()
    finally:
        client.close()
    assert signed is not None, f"{group} has no assignment"
    return Assignment.parse(signed.document, group=group).stable.version


def requests_of(hub: HubProcess, version: int) -> int:
    resp = hub.api("GET", "/api/v1/fleet/summary", params={"model": "wine", "version": version})
    assert resp.status_code == 200, resp.text
    summary = resp.json()["summary"]
    return int(summary["requests"]) if summary else 0


def send(agent: AgentProcess, n: int, seed: int) -> None:
    rows = np.random.default_rng(seed).normal(size=(n, 13)).astype(np.float32) * 10 + 50
    for x in rows:
        doc = {"inputs": [{"name": "input", "shape": [1, 13], "datatype": "FP32", "data": [x.tolist()]}]}
        status, answer = agent.json("POST", "/v2/models/wine/infer", doc)
        assert status == 200, answer


def test_two_hub_processes_share_the_work_and_survive_outages(tmp_path: Path, pg: PostgresServer) -> None:
    url = pg.fresh_url()
    broker = Mosquitto(tmp_path / "broker", persistence=True).start()
    a = HubProcess(tmp_path / "hub", database_url=url, settings={"rollout_interval_s": 0.5})
    b = HubProcess(tmp_path / "hub", init=False)
    root = tmp_path / "root.json"
    root.write_bytes(a.root)
    agents: list[AgentProcess] = []
    try:
        a.start(broker.url, client_id="hub-a")
        b.start(broker.url, client_id="hub-b")
        tars = fast_wine_versions(tmp_path / "wine", versions=(1, 2))

        # A push through one process while the other signs deploys: everything lands, and each
        # process sees it all. (Versions of a model must be pushed in order, so one at a time.)
        a.outpost("push", str(tars[1]), "--quiet")

        def deploy(i: int, stable: int) -> None:
            hub = (a, b)[i % 2]
            resp = hub.api(
                "PUT", f"/api/v1/groups/{GROUPS[i]}/deployment", json={"model": "wine", "stable": stable}
            )
            assert resp.status_code == 200, resp.text

        with ThreadPoolExecutor(4) as pool:
            jobs = [pool.submit(b.outpost, "push", str(tars[2]), "--quiet")]
            jobs += [pool.submit(deploy, i, 1) for i in range(0, 6, 2)]
            for job in jobs:
                job.result()
        for hub in (a, b):
            listed = hub.api("GET", "/api/v1/models/wine").json()
            assert sorted(v["version"] for v in listed["versions"]) == [1, 2], listed
        # The other groups at once, through both processes.
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(deploy, range(1, 6, 2), [2, 2, 2]))
        for i, group in enumerate(GROUPS):
            assert verified_stable((b, a)[i % 2], root, group, tmp_path / "verify") == 1 + i % 2
        assert a.api("GET", "/tuf/metadata/timestamp.json", auth=False).content == (
            b.api("GET", "/tuf/metadata/timestamp.json", auth=False).content
        )

        # Telemetry from two devices, split between the processes: every window stored once.
        for name, group, hub in (("dev-a", "g0", a), ("dev-b", "g1", b)):
            agent = AgentProcess(
                tmp_path / name,
                extra={
                    "device_id": name,
                    "group": group,
                    "hub": {"url": hub.url, "trusted_root": str(root), "poll_interval_s": 0.3},
                    "mqtt": {"url": broker.url, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
                    "monitor": {"window_requests": 20, "window_s": 3600.0},
                },
            )
            agents.append(agent)
            agent.start(wait_ready=False)
        dev_a, dev_b = agents
        wait_for("dev-a on v1", lambda: served_version(dev_a) == "1")
        wait_for("dev-b on v2", lambda: served_version(dev_b) == "2")
        send(dev_a, 100, seed=1)
        send(dev_b, 60, seed=2)
        for hub in (a, b):
            wait_for("v1's 100 requests", lambda hub=hub: requests_of(hub, 1) == 100)
            wait_for("v2's 60 requests", lambda hub=hub: requests_of(hub, 2) == 60)

        # A rollout of v2 in g0, started through b; both processes run the controller.
        wait_for("dev-a committed", lambda: update_status(dev_a)["state"] == "committed")
        out = b.outpost(
            "rollout", "start", "wine", "2", "--group", "g0", "--steps", "100",
            "--min-time", "1s", "--min-requests", "10", "--max-latency-ratio", "50",
        ).stdout  # fmt: skip
        found = re.search(r"rollout (\d+):", out)
        assert found is not None, out
        rollout = found.group(1)

        def completed() -> bool:
            send(dev_a, 5, seed=3)
            return "completed" in a.outpost("rollout", "status", rollout).stdout

        wait_for(
            "the rollout to complete",
            completed,
            timeout=120,
            detail=lambda: a.outpost("rollout", "status", rollout).stdout,
        )
        decisions = a.api("GET", f"/api/v1/rollouts/{rollout}").json()["decisions"]
        assert [d["action"] for d in decisions].count("complete") == 1, decisions
        wait_for("dev-a on v2", lambda: served_version(dev_a) == "2")
        v2_before = wait_for(
            "v2's windows settled", lambda: requests_of(a, 2) == requests_of(b, 2) and requests_of(a, 2)
        )

        # The database goes away: a deploy is refused and signs nothing; the windows devices
        # send meanwhile are stored once it is back.
        timestamp = a.api("GET", "/tuf/metadata/timestamp.json", auth=False).content
        pg.halt()
        try:
            resp = a.api("PUT", "/api/v1/groups/g5/deployment", json={"model": "wine", "stable": 1})
            assert resp.status_code == 503 and "database" in resp.json()["detail"], (
                resp.status_code,
                resp.text,
            )
            assert a.api("GET", "/tuf/metadata/timestamp.json", auth=False).content == timestamp
            send(dev_a, 40, seed=4)  # two windows for v2, held by the broker and the hubs
            time.sleep(1.0)
        finally:
            pg.resume()
        for hub in (a, b):
            wait_for("v2's windows after the outage", lambda hub=hub: requests_of(hub, 2) == v2_before + 40)
        resp = a.api("PUT", "/api/v1/groups/g5/deployment", json={"model": "wine", "stable": 2})
        assert resp.status_code == 200, resp.text
        assert verified_stable(b, root, "g5", tmp_path / "verify-after") == 2

        # The broker restarts: what the devices made meanwhile waits in their outboxes.
        broker.stop()
        send(dev_b, 40, seed=5)
        broker.start()
        for hub in (a, b):
            wait_for(
                "dev-b's windows after the broker's restart",
                lambda hub=hub: requests_of(hub, 2) == v2_before + 80,
            )
        time.sleep(1.0)  # a duplicate would have arrived by now
        assert requests_of(a, 2) == requests_of(b, 2) == v2_before + 80
    finally:
        for agent in agents:
            agent.kill()
        for hub in (a, b):
            hub.kill()
        broker.kill()
