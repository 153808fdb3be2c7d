"""Rollouts end to end: the real hub process (its controller ticking every 0.3 s) consuming a real
Mosquitto, a paho client publishing hand-made summary windows and update events as devices
would, and the API and `outpost rollout ...` / `outpost groups` on top.

Each case uses its own group (one live rollout per group) of one hub: a good candidate ramps
5 -> 50 -> 100 and becomes stable; a candidate failing 20% of its requests halts by itself; a
device falling back from the candidate halts; pause holds the percent, resume goes on, abort
puts the stable version back."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from tests.hub.test_fleet import Device, wait_for
from tests.hub.test_fleet_views import MODEL, push_shapes, summary
from tests.support.broker import Mosquitto
from tests.support.hubproc import HubProcess

pytestmark = pytest.mark.e2e

SEQ = itertools.count(1)
RNG = np.random.default_rng(11)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    b = Mosquitto(tmp_path_factory.mktemp("mosquitto")).start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory, broker: Mosquitto) -> Iterator[HubProcess]:
    data = tmp_path_factory.mktemp("rollouts-hub") / "data"
    process = HubProcess(data, settings={"rollout_interval_s": 0.3}).start(mqtt_url=broker.url)
    try:
        push_shapes(process, tmp_path_factory.mktemp("packages"), (1, 2, 3))
        yield process
    finally:
        process.kill()


@pytest.fixture
def device(broker: Mosquitto) -> Iterator[Device]:
    d = Device(broker, client_id=f"rollouts-{time.monotonic_ns()}")
    yield d
    d.close()


def window(device: Device, group: str, dev: str, version: int, requests: int, errors: int) -> None:
    body = summary(version, time.time() - 60, RNG, requests=requests, errors=errors)
    device.publish(group, dev, "summary", {"device_id": dev, "seq": next(SEQ), "ts": time.time(), **body})


def traffic(device: Device, group: str, candidate: int, stable: int, cand_errors: int = 3) -> None:
    """One round: a candidate device and a stable device each close a window."""
    window(device, group, f"{group}-c", candidate, 300, cand_errors)
    window(device, group, f"{group}-s", stable, 1000, 10)


def api(hub: HubProcess, method: str, path: str, status: int = 200, **kwargs: Any) -> Any:
    resp = hub.api(method, path, **kwargs)
    assert resp.status_code == status, resp.text
    return resp.json()


def rollout(hub: HubProcess, rid: int) -> dict[str, Any]:
    result: dict[str, Any] = api(hub, "GET", f"/api/v1/rollouts/{rid}")
    return result


def start(hub: HubProcess, group: str, candidate: int, **plan: Any) -> dict[str, Any]:
    api(hub, "PUT", f"/api/v1/groups/{group}/deployment", json={"model": MODEL, "stable": 1})
    doc = {"model": MODEL, "candidate": candidate, "group": group, "min_seconds": 1.0, "min_requests": 200}
    result: dict[str, Any] = api(hub, "POST", "/api/v1/rollouts", 201, json={**doc, **plan})
    return result


def drive(
    hub: HubProcess, device: Device, rid: int, until: Callable[[dict[str, Any]], bool], what: str, **kw: Any
) -> dict[str, Any]:
    """Publish a round of traffic every 0.2 s until the rollout satisfies `until`."""
    r = rollout(hub, rid)

    def check() -> dict[str, Any] | None:
        doc = rollout(hub, rid)
        if until(doc):
            return doc
        traffic(device, r["group"], r["candidate"], r["stable"], **kw)
        time.sleep(0.2)
        return None

    result: dict[str, Any] = wait_for(check, what)
    return result


def current(hub: HubProcess, group: str) -> dict[str, Any]:
    result: dict[str, Any] = api(hub, "GET", f"/api/v1/groups/{group}")
    return result


def test_a_good_candidate_ramps_through_every_step_and_becomes_stable(
    hub: HubProcess, device: Device
) -> None:
    r = start(hub, "good", 2, steps=[5, 50, 100])
    assert (r["state"], r["percent"], r["stable"]) == ("running", 5, 1)
    assert (
        current(hub, "good")["current"]["candidate"] == 2 and current(hub, "good")["current"]["percent"] == 5
    )
    done = drive(hub, device, r["id"], lambda d: d["state"] != "running", "the rollout to finish")
    assert done["state"] == "completed", done["reason"]
    actions = [(d["action"], d["actor"], d["percent"]) for d in done["decisions"] if d["action"] != "hold"]
    assert actions == [
        ("start", "operator", 5),
        ("advance", "controller", 5),  # recorded at the step it was decided at
        ("advance", "controller", 50),
        ("complete", "controller", 100),
    ]
    for d in done["decisions"][1:]:  # every controller decision carries its evidence
        ev = d["evidence"]["evidence"]
        assert set(ev) >= {"candidate", "stable", "fallbacks", "drift_alerts", "step_seconds"}
    passed = [d for d in done["decisions"] if d["action"] in ("advance", "complete")]
    assert all(d["evidence"]["checks"]["error_rate"]["passed"] for d in passed)
    assert all(d["evidence"]["evidence"]["candidate"]["requests"] >= 200 for d in passed)
    # a hold is recorded only when what it waits for changes, not at every tick
    log = [(d["action"], d["reason"]) for d in done["decisions"]]
    assert all(a != b for a, b in itertools.pairwise(log))
    # the signed assignments: 5% and 50% with one salt, then v2 alone as stable (the decision
    # is recorded first, then published: wait for the publishing)
    wait_for(lambda: current(hub, "good")["current"]["candidate"] is None, "the completion published")
    history = current(hub, "good")["history"]
    assert (history[0]["stable"], history[0]["candidate"], history[0]["percent"]) == (2, None, 0)
    ramp = [h for h in history if h["candidate"] == 2]
    assert sorted(h["percent"] for h in ramp) == [5, 50, 100] and len({h["salt"] for h in ramp}) == 1
    assert history[0]["previous_stable"] == 1  # outpost rollback goes back to v1
    assert "group good: shapes stable v2 (signed" in hub.outpost("groups").stdout

    out = hub.outpost("rollout", "status", str(r["id"])).stdout
    assert f"rollout {r['id']}: shapes v1 -> v2 in group good, completed" in out
    assert "complete" in out and "controller" in out


def test_a_candidate_with_a_high_error_rate_halts_by_itself(hub: HubProcess, device: Device) -> None:
    r = start(hub, "bad", 3, min_seconds=60.0)  # the error gate does not wait for the step's time
    done = drive(hub, device, r["id"], lambda d: d["state"] != "running", "the halt", cand_errors=60)
    assert done["state"] == "halted"
    # 60/300 per round vs the stable's 10/1000: limit max(1% x 1.5, 1% + 1%) = 2%
    assert done["reason"].startswith("gate error_rate: candidate 20.00% of ")
    assert "stable 1.00%" in done["reason"] and "= 2.00%" in done["reason"]
    halt = done["decisions"][-1]
    assert (
        halt["action"] == "halt"
        and halt["actor"] == "controller"
        and halt["evidence"]["gate"] == "error_rate"
    )
    check = halt["evidence"]["checks"]["error_rate"]
    assert check["candidate"] == pytest.approx(0.2) and check["limit"] == pytest.approx(0.02)
    now = wait_for(lambda: (c := current(hub, "bad")["current"])["percent"] == 0 and c, "the halt published")
    assert (now["stable"], now["candidate"], now["percent"]) == (1, None, 0)
    assert now["created_by"] == f"rollout {r['id']} (controller)"


def test_a_fall_back_on_a_candidate_device_halts(hub: HubProcess, device: Device) -> None:
    r = start(hub, "fall", 2, min_seconds=60.0)
    ref = {"model": MODEL, "version": 2, "sha256": "ab" * 32}
    device.event("fall", "fall-7", next(SEQ), event="update", transition="crash_loop", version=ref,
                 reason="restarted 3 times with v2 loaded", at=time.time())  # fmt: skip
    done = wait_for(lambda: (d := rollout(hub, r["id"]))["state"] == "halted" and d, "the fall-back halt")
    assert "gate fallbacks: 1 candidate device(s) fell back (max 0): fall-7 (crash_loop)" in done["reason"]
    (fell,) = done["decisions"][-1]["evidence"]["evidence"]["fallbacks"]
    assert fell["device_id"] == "fall-7" and "restarted 3 times" in fell["reason"]
    wait_for(lambda: current(hub, "fall")["current"]["percent"] == 0, "the halt published")


def test_a_drift_alert_on_the_candidate_halts(hub: HubProcess, device: Device) -> None:
    hub.outpost("deploy", MODEL, "1", "--group", "drifty")
    out = hub.outpost(
        "rollout", "start", MODEL, "2", "--group", "drifty", "--steps", "10,100", "--min-time", "1m",
        "--min-requests", "200", "--max-error-ratio", "2", "--max-fallbacks", "1",
    ).stdout  # fmt: skip
    first = out.splitlines()[0]
    assert first.endswith("shapes v1 -> v2 in group drifty, running at step 1 of 2 ([10] -> 100)")
    r = rollout(hub, int(first.split()[1].rstrip(":")))
    assert (r["min_seconds"], r["min_requests"], r["steps"]) == (60.0, 200, [10, 100])
    assert r["gates"]["max_error_ratio"] == 2.0 and r["gates"]["max_fallbacks"] == 1
    verdict = {
        "alert": True,
        "alerting": ["b"],
        "streak": 3,
        "drifted": ["b"],
        "features": [{"name": "b", "test": "ks", "p_value": 1e-9, "drifted": True, "streak": 3}],
    }
    body = {"schema": "outpost-drift/1", "model": MODEL, "version": 2, "start": time.time() - 60,
            "end": time.time(), "rows": 400, "method": "bh", "alpha": 0.05, "k": 3, **verdict}  # fmt: skip
    device.publish(
        "drifty", "drift-3", "drift", {"device_id": "drift-3", "seq": next(SEQ), "ts": time.time(), **body}
    )
    done = wait_for(lambda: (d := rollout(hub, r["id"]))["state"] == "halted" and d, "the drift halt")
    assert done["reason"] == "gate drift: 1 drift alert(s) on the candidate (drift-3)"
    (alert,) = done["decisions"][-1]["evidence"]["evidence"]["drift_alerts"]
    assert "input drift in b" in alert["message"]
    assert current(hub, "drifty")["current"]["candidate"] is None


def test_pause_holds_resume_goes_on_abort_returns_to_stable(hub: HubProcess, device: Device) -> None:
    r = start(hub, "ops", 2, steps=[10, 50, 100], min_requests=100)
    rid = str(r["id"])
    assert "paused" in hub.outpost("rollout", "pause", rid, "--reason", "night shift").stdout
    for _ in range(6):  # plenty of good traffic, 1.2 s: no advance while paused
        traffic(device, "ops", 2, 1)
        time.sleep(0.2)
    paused = rollout(hub, r["id"])
    assert (paused["state"], paused["percent"]) == ("paused", 10)
    assert current(hub, "ops")["current"]["percent"] == 10
    status = wait_for(  # a live rollout shows this step's figures (once the consumer has stored them)
        lambda: "candidate 1800 requests" in (out := hub.outpost("rollout", "status", rid).stdout) and out,
        "the six candidate windows in the status",
    )
    assert "paused at step 1 of 3 ([10] -> 50 -> 100)" in status and "reason: night shift" in status
    assert "this step (" in status and "candidate 1800 requests, 1.00% errors" in status
    hub.outpost("rollout", "resume", rid)
    drive(hub, device, r["id"], lambda d: d["percent"] == 50, "the advance to 50%")
    out = hub.outpost("rollout", "abort", rid).stdout
    assert "aborted" in out
    done = rollout(hub, r["id"])
    assert (done["state"], done["reason"]) == ("aborted", "aborted by operator: back to the stable version")
    now = current(hub, "ops")["current"]
    assert (now["stable"], now["candidate"], now["percent"]) == (1, None, 0)
    actions = [d["action"] for d in done["decisions"] if d["action"] != "hold"]
    assert actions == ["start", "pause", "resume", "advance", "abort"]
    (pause,) = (d for d in done["decisions"] if d["action"] == "pause")
    assert (
        pause["reason"] == "night shift"
        and pause["actor"] == "operator"
        and "candidate" in pause["evidence"]["evidence"]
    )
    lines = hub.outpost("rollout", "status").stdout.splitlines()
    assert lines[0].split()[:4] == ["id", "group", "model", "from"]
    assert any(line.split()[:2] == [rid, "ops"] and "aborted" in line for line in lines)


@pytest.mark.parametrize(
    ("doc", "status", "words"),
    [
        pytest.param(
            {"model": "nope", "candidate": 2, "group": "errs"}, 404, "no model named 'nope'", id="model"
        ),
        pytest.param(
            {"model": MODEL, "candidate": 9, "group": "errs"}, 404, "has no version 9", id="version"
        ),
        pytest.param({"model": MODEL, "candidate": 2, "group": "nowhere"}, 404, "nowhere", id="group"),
        pytest.param(
            {"model": MODEL, "candidate": 2, "group": "errs", "steps": [50, 5]},
            400,
            "must increase",
            id="steps",
        ),
        pytest.param({"model": MODEL, "candidate": 1, "group": "errs"}, 400, "already the stable", id="same"),
        pytest.param(
            {"model": MODEL, "candidate": 2, "group": "errs", "gates": {"x": 1}},
            400,
            "unknown gate",
            id="gates",
        ),
    ],
)
def test_bad_requests_are_clear_4xx(hub: HubProcess, doc: dict[str, Any], status: int, words: str) -> None:
    api(hub, "PUT", "/api/v1/groups/errs/deployment", json={"model": MODEL, "stable": 1})
    resp = hub.api("POST", "/api/v1/rollouts", json=doc)
    assert resp.status_code == status, resp.text
    assert words in resp.json()["detail"]


def test_one_live_rollout_per_group_and_final_is_final(hub: HubProcess) -> None:
    r = start(hub, "twice", 2, min_seconds=600.0)
    again = hub.api("POST", "/api/v1/rollouts", json={"model": MODEL, "candidate": 3, "group": "twice"})
    assert again.status_code == 409 and "abort it first" in again.json()["detail"]
    api(hub, "POST", f"/api/v1/rollouts/{r['id']}/abort")
    late = hub.api("POST", f"/api/v1/rollouts/{r['id']}/resume")
    assert late.status_code == 409 and "cannot resume a rollout that is aborted" in late.json()["detail"]
    assert hub.api("GET", "/api/v1/rollouts", auth=False).status_code == 401
    assert hub.api("GET", "/api/v1/rollouts/99999").status_code == 404
    failed = hub.outpost("rollout", "pause", str(r["id"]), check=False)
    assert failed.returncode == 2 and "hub refused (409)" in failed.stderr
