"""Fleet sums, drift and alerts end to end: the real hub process consuming a real Mosquitto, a paho
client publishing hand-made summary, drift and event messages as devices would, the API and
`outpost fleet summary | drift | alerts`."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.package.manifest import SelfTest, Tensor, TensorSpec
from hub.packager.profile import bin_counts, numeric_profile
from tests.hub.test_fleet import Device, wait_for
from tests.support.broker import Mosquitto
from tests.support.hubproc import HubProcess
from tests.support.packages import affine_model, write_package

pytestmark = pytest.mark.e2e

MODEL = "shapes"
FEATURES = ("a", "b", "c", "d")
LABELS = ("0", "1", "2", "3")
BOUNDS = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]
NOW = time.time()
BASE = math.floor(NOW / 300) * 300 - 1800  # half an hour ago, on an error-rate bucket edge


def reference_profile() -> dict[str, Any]:
    rng = np.random.default_rng(7)
    return {
        "n": 1000,
        "features": [
            {"name": f, "kind": "numeric", **numeric_profile(rng.standard_normal(1000))} for f in FEATURES
        ],
        "prediction": {"kind": "classification", "labels": list(LABELS), "counts": [250, 250, 250, 250]},
    }


PROFILE = reference_profile()


def summary(
    version: int,
    start: float,
    rng: np.random.Generator,
    requests: int = 100,
    errors: int = 1,
    shift: dict[str, float] | None = None,
    feedback: dict[str, int] | None = None,
) -> dict[str, Any]:
    """A closed window as agent.monitor.summary writes it: rows binned into the profile's edges."""
    rows = requests - errors
    features = []
    for ref in PROFILE["features"]:
        values = rng.standard_normal(rows) + (shift or {}).get(ref["name"], 0.0)
        features.append(
            {
                "name": ref["name"],
                "kind": "numeric",
                "counts": bin_counts(ref["bin_edges"], values),
                "missing": 0,
                "other": 0,
            }
        )
    classes = np.bincount(rng.integers(0, 4, rows), minlength=4)
    latency = [0] * (len(BOUNDS) + 1)
    latency[4] = requests - 10  # (1 ms, 2.5 ms]
    latency[7] = 10  # (10 ms, 25 ms]
    return {
        "schema": "outpost-summary/1",
        "model": MODEL,
        "version": version,
        "start": start,
        "end": start + 60,
        "windows": 1,
        "requests": requests,
        "errors": errors,
        "rows": rows,
        "latency": {"bounds": BOUNDS, "counts": latency, "sum_us": 2000 * requests},
        "features": features,
        "prediction": {
            "kind": "classification",
            "labels": list(LABELS),
            "counts": classes.tolist(),
            "other": 0,
            "missing": 0,
        },
        "feedback": feedback,
    }


def push_shapes(hub: HubProcess, out: Path, versions: tuple[int, ...]) -> None:
    """Push `versions` of MODEL to `hub`: the affine model as a classifier with PROFILE, so the
    hub can sum and test the windows the tests publish for it."""
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    y = x * 2 + 1  # affine_model(): y = 2x + 1 and the argmax label
    test = SelfTest(
        inputs=(Tensor("x", "FP32", (2, 4), x.ravel().tolist()),),
        outputs=(
            Tensor("y", "FP32", (2, 4), y.ravel().tolist()),
            Tensor("label", "INT64", (2,), y.argmax(axis=1).tolist()),
        ),
    )
    for version in versions:
        path = write_package(
            out / f"v{version}",
            affine_model(),
            name=MODEL,
            version=version,
            inputs=[TensorSpec("x", "FP32", (-1, 4))],
            outputs=[TensorSpec("y", "FP32", (-1, 4)), TensorSpec("label", "INT64", (-1,))],
            self_test=test,
            task="classification",
            labels=LABELS,
            features=FEATURES,
            reference_profile=PROFILE,
        )
        hub.outpost("push", str(path), "--quiet")


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    b = Mosquitto(tmp_path_factory.mktemp("mosquitto")).start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory, broker: Mosquitto) -> Iterator[HubProcess]:
    process = HubProcess(tmp_path_factory.mktemp("fleet-views-hub") / "data").start(mqtt_url=broker.url)
    try:
        push_shapes(process, tmp_path_factory.mktemp("packages"), (1, 2, 3))
        yield process
    finally:
        process.kill()


@pytest.fixture
def device(broker: Mosquitto) -> Iterator[Device]:
    d = Device(broker, client_id=f"views-{time.monotonic_ns()}")
    yield d
    d.close()


def send(device: Device, dev: str, kind: str, seq: int, body: dict[str, Any], group: str = "plant") -> None:
    device.publish(group, dev, kind, {"device_id": dev, "seq": seq, "ts": time.time(), **body})


def get(hub: HubProcess, path: str, **params: Any) -> dict[str, Any]:
    resp = hub.api("GET", path, params=params)
    assert resp.status_code == 200, resp.text
    result: dict[str, Any] = resp.json()
    return result


def test_summaries_from_three_devices_add_up(hub: HubProcess, device: Device) -> None:
    rng = np.random.default_rng(1)
    fb = {"labelled": 20, "correct": 18}
    windows = {
        dev: [
            summary(1, BASE + 60 * i, rng, requests=100 * (i + 1), errors=i + 1, feedback=fb)
            for i in range(2)
        ]
        for dev in ("s-1", "s-2", "s-3")
    }
    send(device, "s-1", "summary", 1, windows["s-1"][0])
    send(device, "s-1", "summary", 1, windows["s-1"][0])  # the same message again
    send(device, "s-1", "summary", 2, windows["s-1"][1])
    send(device, "s-2", "summary", 2, windows["s-2"][1])  # out of order
    send(device, "s-2", "summary", 1, windows["s-2"][0])
    send(device, "s-3", "summary", 1, windows["s-3"][0], group="yard")
    send(device, "s-3", "summary", 2, windows["s-3"][1], group="yard")
    query = {"model": MODEL, "version": 1, "since": "1h"}
    doc = wait_for(
        lambda: (d := get(hub, "/api/v1/fleet/summary", **query))["windows"] == 6 and d, "6 windows summed"
    )
    s, derived = doc["summary"], doc["derived"]
    assert doc["devices"] == 3 and doc["skipped_count"] == 0
    assert (s["requests"], s["errors"], s["windows"]) == (900, 9, 6)  # 3 x (100 + 200), 3 x (1 + 2)
    assert s["rows"] == 891 and s["feedback"] == {"labelled": 120, "correct": 108}
    assert derived["error_rate"] == pytest.approx(0.01) and derived["accuracy"] == pytest.approx(0.9)
    # 840 requests in (1, 2.5] ms and 60 in (10, 25] ms: p50 = 1 + 1.5 * 450/840 ms
    assert derived["latency_ms"]["p50"] == pytest.approx(1 + 1.5 * 450 / 840, rel=1e-4)
    assert derived["latency_ms"]["mean"] == pytest.approx(2.0)
    assert [(p["device_id"], p["requests"]) for p in doc["per_device"]] == [
        ("s-1", 300),
        ("s-2", 300),
        ("s-3", 300),
    ]
    yard = get(hub, "/api/v1/fleet/summary", group="yard", **query)
    assert yard["devices"] == 1 and yard["summary"]["requests"] == 300
    # the latest version is the default; an empty range is a 200 with nothing in it
    assert get(hub, "/api/v1/fleet/summary", model=MODEL)["version"] == 3
    assert (
        get(hub, "/api/v1/fleet/summary", model=MODEL, version=1, since="2000", until="3000")["summary"]
        is None
    )

    out = hub.outpost("fleet", "summary", f"{MODEL}:1", "--since", "1h").stdout
    assert "shapes v1" in out and "3 devices, 6 windows" in out
    assert "requests 900  errors 9 (1.00%)" in out and "accuracy 90.00% of 120" in out
    assert any(line.startswith("s-2") and "300" in line for line in out.splitlines())


@pytest.mark.parametrize(
    ("params", "status", "words"),
    [
        pytest.param({"model": "nope"}, 404, "no model named 'nope'", id="unknown-model"),
        pytest.param({"model": MODEL, "version": 9}, 404, "has no version 9", id="unknown-version"),
        pytest.param({"model": MODEL, "since": "yesterday"}, 400, "expected epoch seconds", id="bad-time"),
        pytest.param(
            {"model": MODEL, "since": "1000", "until": "10"}, 400, "empty time range", id="backwards"
        ),
        pytest.param({"model": MODEL, "version": 0}, 422, "", id="version-zero"),
        pytest.param({}, 422, "", id="no-model"),
    ],
)
def test_bad_queries_are_clear_4xx(hub: HubProcess, params: dict[str, Any], status: int, words: str) -> None:
    for path in ("/api/v1/fleet/summary", "/api/v1/fleet/drift"):
        resp = hub.api("GET", path, params=params)
        assert resp.status_code == status, resp.text
        assert words in str(resp.json()["detail"])
    assert hub.api("GET", "/api/v1/fleet/summary", params={"model": MODEL}, auth=False).status_code == 401
    bad = hub.api("GET", "/api/v1/fleet/alerts", params={"kind": "weather"})
    assert bad.status_code == 400 and "expected one of" in bad.json()["detail"]


def test_fleet_drift_flags_the_shifted_feature_and_drift_alerts_once_per_run(
    hub: HubProcess, device: Device
) -> None:
    rng = np.random.default_rng(2)
    for i, dev in enumerate(("f-1", "f-2", "f-3")):  # b shifted by 0.5 sd on every device
        send(
            device,
            dev,
            "summary",
            1,
            summary(2, BASE + 60 * i, rng, requests=400, errors=0, shift={"b": 0.5}),
        )
    # f-1's own verdicts: alert level F T T F T -> two runs; one window redelivered
    for seq, (start, alert) in enumerate(
        [(0, False), (60, True), (120, True), (180, False), (240, True)], 10
    ):
        test = {"name": "b", "test": "ks", "statistic": 0.2, "p_value": 1e-9, "psi": 0.3, "drifted": alert}
        verdict = {"alert": alert, "alerting": ["b"] if alert else [], "streak": 3 if alert else 0}
        body = {
            "schema": "outpost-drift/1", "model": MODEL, "version": 2, "start": BASE + start,
            "end": BASE + start + 60, "rows": 400, "method": "bh", "alpha": 0.05, "k": 3,
            "drifted": ["b"] if alert else [], "features": [{**test, "streak": verdict["streak"]}],
            "prediction": None, **verdict,
        }  # fmt: skip
        send(device, "f-1", "drift", seq, body)
        if seq == 12:
            send(device, "f-1", "drift", seq, body)
    doc = wait_for(
        lambda: (
            (d := get(hub, "/api/v1/fleet/drift", model=MODEL, version=2, since="1h"))["devices_summed"] == 3
            and d["devices"]
            and d["devices"][0]["seq"] == 14
            and d
        ),
        "three devices summed and f-1's latest drift window",
    )
    fleet = doc["fleet"]
    by_name = {t["name"]: t for t in fleet["features"]}
    assert fleet["rows"] == 1200 and fleet["enough_rows"]
    assert by_name["b"]["drifted"] and by_name["b"]["test"] == "ks" and by_name["b"]["p_value"] < 1e-6
    assert not any(by_name[f]["drifted"] for f in ("a", "c", "d"))
    assert fleet["drifted"] == ["b"] and fleet["prediction"]["test"] == "chi2"
    assert doc["alerting_devices"] == ["f-1"] and doc["devices"][0]["alerting"] == ["b"]

    alerts = get_alerts(hub, kind="drift", model=MODEL)
    assert len(alerts) == 2 and {a["device_id"] for a in alerts} == {"f-1"}
    assert sorted(a["count"] for a in alerts) == [1, 2] and all(a["severity"] == "warning" for a in alerts)

    out = hub.outpost("fleet", "drift", f"{MODEL}:2", "--since", "1h").stdout
    line_b = next(line for line in out.splitlines() if line.startswith("b "))
    assert "ks" in line_b and "DRIFT" in line_b
    assert "DRIFT" not in next(line for line in out.splitlines() if line.startswith("a "))
    assert "devices alerting: f-1" in out


def get_alerts(hub: HubProcess, **params: Any) -> list[dict[str, Any]]:
    resp = hub.api("GET", "/api/v1/fleet/alerts", params=params)
    assert resp.status_code == 200, resp.text
    result: list[dict[str, Any]] = resp.json()
    return result


def test_error_rate_alert(hub: HubProcess, device: Device) -> None:
    rng = np.random.default_rng(3)
    # one 300 s bucket: 60 + 60 requests, 10 + 10 errors = 16.7%, over 5% with at least 100 requests
    send(device, "e-1", "summary", 1, summary(3, BASE + 600, rng, requests=60, errors=10))
    send(device, "e-2", "summary", 1, summary(3, BASE + 610, rng, requests=60, errors=10))
    (alert,) = wait_for(lambda: get_alerts(hub, kind="error_rate", model=MODEL), "an error-rate alert")
    assert alert["device_id"] is None and alert["version"] == 3 and alert["severity"] == "warning"
    assert alert["evidence"]["requests"] == 120 and alert["evidence"]["errors"] == 20
    assert alert["evidence"]["devices"] == 2 and "16.7%" in alert["message"]


def test_rollback_event_is_one_alert(hub: HubProcess, device: Device) -> None:
    ref = {"model": MODEL, "version": 3, "sha256": "ef" * 32}
    fell = {"event": "update", "transition": "probation_failed", "from": "probation", "to": "rolled_back",
            "version": ref, "reason": "error rate 12% over 2%", "at": time.time()}  # fmt: skip
    send(device, "r-1", "event", 40, fell)
    send(device, "r-1", "event", 40, fell)  # redelivered
    send(device, "r-1", "event", 41, {"event": "update", "transition": "probation_passed", "version": ref})
    seen = lambda: hub.api("GET", "/api/v1/fleet/r-1").json().get("last_seq") == 41  # noqa: E731
    wait_for(seen, "r-1's events stored")
    (alert,) = get_alerts(hub, kind="rollback")
    assert alert["device_id"] == "r-1" and alert["severity"] == "critical" and alert["count"] == 1
    assert alert["evidence"]["transition"] == "probation_failed" and "error rate 12%" in alert["message"]

    out = hub.outpost("fleet", "alerts").stdout
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["last", "seen", "severity"]
    assert any("critical" in line and "rollback" in line and "r-1" in line for line in lines)
    only = hub.outpost("fleet", "alerts", "--kind", "rollback").stdout
    assert len(only.splitlines()) == 2
    assert "no devices" not in hub.outpost("fleet").stdout  # the device list still works
