"""Experiments end to end: the real hub process consuming a real Mosquitto, a paho client publishing
hand-made summary windows for both arms as devices running an experiment would, the signed
assignment read by an independent TUF client, and `outpost experiment ...` / the API on top.

Each case uses its own group of one hub: a clearly worse candidate (accuracy 75% vs 90% on 600
labels per arm), equal arms, too few labels, a shadow experiment with agreement counts, stopping,
and the refusals beside a live rollout."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from hub.registry import in_canary
from tests.hub.test_fleet import Device, wait_for
from tests.hub.test_fleet_views import MODEL, push_shapes, summary
from tests.hub.test_hub_e2e import assignment, updater
from tests.support.broker import Mosquitto
from tests.support.hubproc import HubProcess

pytestmark = pytest.mark.e2e

SEQ = itertools.count(1)
RNG = np.random.default_rng(7)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    b = Mosquitto(tmp_path_factory.mktemp("mosquitto")).start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory, broker: Mosquitto) -> Iterator[HubProcess]:
    data = tmp_path_factory.mktemp("experiments-hub") / "data"
    process = HubProcess(data).start(mqtt_url=broker.url)
    try:
        push_shapes(process, tmp_path_factory.mktemp("packages"), (1, 2))
        yield process
    finally:
        process.kill()


@pytest.fixture(scope="module")
def device(broker: Mosquitto) -> Iterator[Device]:
    d = Device(broker, client_id=f"experiments-{time.monotonic_ns()}")
    yield d
    d.close()


def window(
    device: Device, group: str, dev: str, version: int, requests: int, errors: int,
    labelled: int, correct: int, shadow: dict[str, int] | None = None,
) -> None:  # fmt: skip
    body = summary(
        version, time.time() - 60, RNG, requests=requests, errors=errors,
        feedback={"labelled": labelled, "correct": correct},
    )  # fmt: skip
    if shadow is not None:
        body["shadow"] = shadow
    device.publish(group, dev, "summary", {"device_id": dev, "seq": next(SEQ), "ts": time.time(), **body})


def api(hub: HubProcess, method: str, path: str, status: int = 200, **kwargs: Any) -> Any:
    resp = hub.api(method, path, **kwargs)
    assert resp.status_code == status, resp.text
    return resp.json()


def live(
    hub: HubProcess, group: str, labelled: int, requests: int, candidate: tuple[int, int] | None = None
) -> dict[str, Any]:
    """The group's experiment once the hub has every window published for it: `labelled` and
    `requests` in each arm, or (labelled, requests) for the candidate when it differs."""
    want = {"stable": (labelled, requests), "candidate": candidate or (labelled, requests)}

    def check() -> dict[str, Any] | None:
        x: dict[str, Any] = api(hub, "GET", f"/api/v1/groups/{group}/experiment")
        done = all((a["labelled"], a["requests"]) == want[name] for name, a in x["arms"].items())
        return x if done else None

    result: dict[str, Any] = wait_for(check, f"the windows of group {group}")
    return result


def ab(device: Device, group: str, stable_correct: int, candidate_correct: int, labelled: int = 300) -> None:
    """Two devices, each with both versions loaded, close a window per version."""
    for dev in (f"{group}-1", f"{group}-2"):
        window(device, group, dev, 1, 1000, 5, labelled, stable_correct)
        window(device, group, dev, 2, 1000, 5, labelled, candidate_correct)


def test_an_ab_experiment_is_signed_and_a_clearly_worse_candidate_is_called_worse(
    hub: HubProcess, device: Device, tmp_path: Path
) -> None:
    out = hub.outpost("experiment", "start", MODEL, "1", "2", "--group", "abw", "--ab", "30").stdout
    assert "ab experiment with v2 (weight 30%) on 100% of devices" in out
    doc = assignment(updater(hub, tmp_path / "tuf"), "abw")
    assert doc["experiment"] == {"mode": "ab", "weight": 30}
    assert (doc["stable"]["version"], doc["candidate"]["version"], doc["percent"]) == (1, 2, 100)

    ab(device, "abw", stable_correct=270, candidate_correct=225)  # 90% vs 75%
    x = live(hub, "abw", labelled=600, requests=2000)
    assert x["verdict"] == "candidate worse"
    accuracy = next(t for t in x["tests"] if t["metric"] == "accuracy")
    assert accuracy["verdict"] == "candidate worse" and accuracy["p_value"] < 1e-10
    assert accuracy["difference"] == pytest.approx(-0.15)
    low, high = accuracy["difference_ci"]
    assert low < -0.15 < high < 0
    assert accuracy["candidate"]["rate"] == 0.75 and accuracy["stable"]["rate"] == 0.9
    errors = next(t for t in x["tests"] if t["metric"] == "error rate")
    assert errors["verdict"] == "no significant difference"
    assert (x["arms"]["candidate"]["devices"], x["arms"]["stable"]["windows"]) == (2, 2)

    status = hub.outpost("experiment", "status", MODEL, "--group", "abw").stdout
    assert "verdict: candidate worse (alpha 0.05)" in status
    assert "A/B: the candidate answers 30% of requests" in status
    assert "accuracy" in status and "-15.00" in status

    # Stopping publishes the stable version alone; the experiment stays readable, stopped.
    out = hub.outpost("experiment", "stop", "--group", "abw").stdout
    assert "stopped: group abw: shapes stable v1" in out
    doc = assignment(updater(hub, tmp_path / "tuf2"), "abw")
    assert (doc["experiment"], doc["candidate"], doc["percent"]) == (None, None, 0)
    api(hub, "GET", "/api/v1/groups/abw/experiment", 404)
    (past,) = api(hub, "GET", "/api/v1/experiments", params={"group": "abw", "live": "false"})
    assert (past["live"], past["verdict"]) == (False, "candidate worse") and past["stopped"]
    assert api(hub, "DELETE", "/api/v1/groups/abw/experiment", 409)["detail"].startswith(
        "group 'abw' runs no"
    )


def test_equal_arms_make_no_significant_difference(hub: HubProcess, device: Device) -> None:
    req = {
        "model": MODEL,
        "stable": 1,
        "candidate": 2,
        "percent": 100,
        "experiment": {"mode": "ab", "weight": 50},
    }
    assert api(hub, "PUT", "/api/v1/groups/abe/deployment", json=req)["experiment"] == req["experiment"]
    ab(device, "abe", stable_correct=270, candidate_correct=270)
    x = live(hub, "abe", labelled=600, requests=2000)
    assert x["verdict"] == "no significant difference"
    assert [t["verdict"] for t in x["tests"]] == ["no significant difference"] * 2
    assert x["tests"][0]["p_value"] == pytest.approx(1.0)


def test_too_few_labels_give_no_verdict_and_devices_outside_the_canary_do_not_count(
    hub: HubProcess, device: Device
) -> None:
    hub.outpost("experiment", "start", MODEL, "1", "2", "--group", "abf", "--ab", "50", "--percent", "40")
    salt = api(hub, "GET", "/api/v1/groups/abf")["current"]["salt"]
    inside, outside = (
        next(f"abf-{i}" for i in range(1000) if in_canary(salt, f"abf-{i}", 40) == b) for b in (True, False)
    )
    window(device, "abf", outside, 1, 5000, 3, 400, 390)  # stable only, other devices: not the experiment's
    window(device, "abf", inside, 1, 600, 3, 40, 38)
    window(device, "abf", inside, 2, 600, 3, 40, 20)
    x = live(hub, "abf", labelled=40, requests=600)
    assert x["arms"]["stable"]["devices"] == 1
    assert (x["percent"], x["verdict"]) == (40, "not enough data")
    accuracy = x["tests"][0]
    assert accuracy["verdict"] == "not enough data" and accuracy["why"] == "40 of the 100 per arm needed"
    status = hub.outpost("experiment", "status", "--group", "abf").stdout
    assert "verdict: not enough data" in status and "40 of the 100 per arm needed" in status


def test_a_shadow_experiment_reports_the_agreement_rate(
    hub: HubProcess, device: Device, tmp_path: Path
) -> None:
    hub.outpost("experiment", "start", MODEL, "1", "2", "--group", "shadow", "--shadow", "50")
    assert assignment(updater(hub, tmp_path / "tuf"), "shadow")["experiment"] == {
        "mode": "shadow",
        "sample": 50,
    }
    for dev in ("shadow-1", "shadow-2"):
        window(device, "shadow", dev, 1, 1000, 2, 150, 135)  # an older agent: no "shadow" key
        window(device, "shadow", dev, 2, 500, 1, 150, 132, shadow={"compared": 499, "agreed": 474})
    x = live(hub, "shadow", labelled=300, requests=2000, candidate=(300, 1000))
    assert x["arms"]["candidate"]["requests"] == 1000
    a = x["agreement"]
    assert (a["compared"], a["agreed"], a["enough"]) == (998, 948, True)
    assert a["rate"] == pytest.approx(948 / 998)
    assert a["ci"][0] < a["rate"] < a["ci"][1]
    assert x["tests"][0]["candidate"]["rate"] == pytest.approx(0.88)
    status = hub.outpost("experiment", "status", "--group", "shadow").stdout
    assert "shadow agreement with the stable version: 94.99% of 998 compared" in status


def test_an_experiment_and_a_rollout_never_share_a_group(hub: HubProcess) -> None:
    hub.outpost("experiment", "start", MODEL, "1", "2", "--group", "both", "--ab", "10")
    doc = {"model": MODEL, "candidate": 2, "group": "both", "min_seconds": 1.0, "min_requests": 200}
    refused = api(hub, "POST", "/api/v1/rollouts", 409, json=doc)["detail"]
    assert "runs a ab experiment" in refused and "outpost experiment stop --group both" in refused

    api(hub, "PUT", "/api/v1/groups/ro/deployment", json={"model": MODEL, "stable": 1})
    rollout = api(hub, "POST", "/api/v1/rollouts", 201, json={**doc, "group": "ro"})
    req = {
        "model": MODEL,
        "stable": 1,
        "candidate": 2,
        "percent": 100,
        "experiment": {"mode": "shadow", "sample": 5},
    }
    refused = api(hub, "PUT", "/api/v1/groups/ro/deployment", 409, json=req)["detail"]
    assert f"rollout {rollout['id']} running" in refused
    api(hub, "POST", f"/api/v1/rollouts/{rollout['id']}/abort")
    assert api(hub, "PUT", "/api/v1/groups/ro/deployment", json=req)["experiment"] == req["experiment"]
    bad = {**req, "experiment": {"mode": "ab", "weight": 100}}
    assert "from 1 to 99" in api(hub, "PUT", "/api/v1/groups/ro/deployment", 400, json=bad)["detail"]


def test_the_dashboard_shows_the_experiments_with_their_verdicts(hub: HubProcess) -> None:
    """After the cases above: the dashboard's experiments page lists them, newest first, with the
    arms, the tests and the verdict a person reads (the A/B experiment of group abw, stopped, with
    the candidate called worse)."""
    login = requests.post(hub.url + "/login", data={"token": hub.token}, allow_redirects=False, timeout=10)
    assert login.status_code == 303
    page = requests.get(hub.url + "/experiments", cookies=login.cookies, timeout=10)
    assert page.status_code == 200 and "No experiments yet" not in page.text
    html = page.text
    assert "in group abw" in html and "A/B: the candidate answers 30% of requests" in html
    section = html[html.index("in group abw") :]
    section = section[: section.index("</section>")]
    assert "stopped" in section and "candidate worse" in section
    assert "accuracy" in section and "-15.00" in section  # the difference in percentage points
