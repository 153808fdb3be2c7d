"""Data capture end to end on the hub's side: the real hub process consuming a real Mosquitto, a
paho client publishing capture messages in the contract's shape (a redelivered seq, a label that
comes later, another device's label for the same id, a malformed message), the signed assignment
read by an independent TUF client as the capture policy changes, and `outpost capture ...`
exporting CSV and Parquet whose rows, columns and labels are checked exactly."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.hub.test_fleet import Device, wait_for
from tests.hub.test_fleet_views import MODEL, push_shapes
from tests.hub.test_hub_e2e import assignment, updater
from tests.support.broker import Mosquitto
from tests.support.hubproc import HubProcess

pytestmark = pytest.mark.e2e

GROUP = "lab"


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    b = Mosquitto(tmp_path_factory.mktemp("mosquitto")).start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory, broker: Mosquitto) -> Iterator[HubProcess]:
    data = tmp_path_factory.mktemp("capture-hub") / "data"
    process = HubProcess(data).start(mqtt_url=broker.url)
    try:
        push_shapes(process, tmp_path_factory.mktemp("packages"), (1, 2))
        yield process
    finally:
        process.kill()


@pytest.fixture(scope="module")
def device(broker: Mosquitto) -> Iterator[Device]:
    d = Device(broker, client_id=f"capture-{time.monotonic_ns()}")
    yield d
    d.close()


def api(hub: HubProcess, method: str, path: str, status: int = 200, **kwargs: Any) -> Any:
    resp = hub.api(method, path, **kwargs)
    assert resp.status_code == status, resp.text
    return resp.json()


def signed(hub: HubProcess, cache: Path) -> Any:
    """The group's assignment's `capture`, as a device's TUF client reads it."""
    doc = assignment(updater(hub, cache), GROUP)
    assert "capture" in doc
    return doc["capture"]


def capture(
    dev: str, seq: int, rows: list[Any] | None = None, labels: list[Any] | None = None, **extra: Any
) -> dict[str, Any]:
    return {
        "device_id": dev,
        "seq": seq,
        "ts": time.time(),
        "schema": "outpost-capture/1",
        "model": MODEL,
        "rows": rows or [],
        "labels": labels or [],
        "dropped": {"rate": 0, "size": 0, "full": 0},
        **extra,
    }


def request(
    pid: str, version: int, ts: float, x: list[list[Any]], y: list[list[float]], label: list[int]
) -> Any:
    return {"id": pid, "version": version, "ts": ts, "inputs": {"x": x}, "outputs": {"y": y, "label": label}}


P1 = request("p1", 1, 1764252000.101, [[1.0, 2.0, 3.0, 4.0]], [[3.0, 5.0, 7.0, 9.0]], [3])
P2 = request(
    "p2",
    2,
    1764252000.5,
    [[0.5, None, 1.5, 2.0], [2.0, 2.0, 2.0, 2.0]],
    [[2.0, 1.0, 4.0, 5.0], [5.0] * 4],
    [3, 0],
)
P3 = request("p3", 2, 1764252001.25, [[1.0, 1.0, 1.0, 1.0]], [[3.0] * 4], [0])
HEADER = ",".join(
    ["ts", "device_id", "group", "version", "id", "row", "a", "b", "c", "d", "predicted"]
    + [f"probability_{k}" for k in range(4)]
    + ["label"]
)
V2_LINES = [
    "2025-11-27T14:00:00.500Z,dev-1,lab,2,p2,0,0.5,,1.5,2.0,3,2.0,1.0,4.0,5.0,1",
    "2025-11-27T14:00:00.500Z,dev-1,lab,2,p2,1,2.0,2.0,2.0,2.0,0,5.0,5.0,5.0,5.0,2",
    "2025-11-27T14:00:01.250Z,dev-1,lab,2,p3,0,1.0,1.0,1.0,1.0,0,3.0,3.0,3.0,3.0,",
]


def test_capture_from_policy_to_export(hub: HubProcess, device: Device, tmp_path: Path) -> None:
    api(hub, "PUT", f"/api/v1/groups/{GROUP}/deployment", json={"model": MODEL, "stable": 1})
    assert signed(hub, tmp_path / "c1") is None

    out = hub.outpost(
        "capture", "start", "--group", GROUP, "--sample", "5%", "--max-rows-per-min", "100"
    ).stdout
    assert "capture on in group lab: 5% of requests, at most 100 a minute per device" in out
    assert signed(hub, tmp_path / "c2") == {"sample_bp": 500, "max_rows_per_min": 100}
    # the next version of the same model keeps it; the API says so too
    d = api(hub, "PUT", f"/api/v1/groups/{GROUP}/deployment", json={"model": MODEL, "stable": 2})
    assert d["capture"] == {"sample_bp": 500, "max_rows_per_min": 100}
    assert signed(hub, tmp_path / "c3") == {"sample_bp": 500, "max_rows_per_min": 100}

    first = capture("dev-1", 1, [P1, P2], dropped={"rate": 2, "size": 0, "full": 1})
    device.publish(GROUP, "dev-1", "capture", first)
    device.publish(GROUP, "dev-1", "capture", first)  # a QoS 1 redelivery
    device.publish(GROUP, "dev-1", "capture", capture("dev-1", 2, [{"id": "bad", "ts": 1.0}]))  # malformed
    device.publish(GROUP, "dev-1", "capture", capture("dev-1", 3, [P3], [{"id": "p2", "label": [1, 2]}]))
    device.publish(
        GROUP, "dev-1", "capture", capture("dev-1", 4, labels=[{"id": "p1", "label": 3, "ts": 1.0}])
    )
    device.publish(GROUP, "dev-2", "capture", capture("dev-2", 1, labels=[{"id": "p3", "label": 9}]))

    def listed() -> Any:
        doc = api(hub, "GET", f"/api/v1/capture?model={MODEL}")
        got = {(v["version"], v["rows"], v["labelled"]) for v in doc["versions"]}
        return doc if got == {(1, 1, 1), (2, 2, 1)} else None

    doc = wait_for(listed, "the captured requests and labels at the hub")
    v2 = next(v for v in doc["versions"] if v["version"] == 2)
    assert (v2["group"], v2["devices"], v2["dropped"]) == (GROUP, 1, {"limit": 0})
    assert v2["first_ts"].startswith("2025-11-27T14:00:00.5") and v2["last_ts"].startswith(
        "2025-11-27T14:00:01.25"
    )
    assert doc["groups"] == [
        {
            "group": GROUP,
            "model": MODEL,
            "capture": {"sample_bp": 500, "max_rows_per_min": 100},
            "dropped": {"rate": 2, "size": 0, "full": 1},
        }
    ]
    assert "fleet: ignored a message" in hub.log() and "rows[0]: version" in hub.log()

    csv_text = hub.outpost("capture", "export", "--model", MODEL, "--version", "2").stdout
    assert csv_text.splitlines() == [HEADER, *V2_LINES]
    labelled = hub.outpost("capture", "export", "--model", MODEL, "--version", "2", "--labelled-only").stdout
    assert labelled.splitlines() == [HEADER, *V2_LINES[:2]]
    v1 = hub.outpost("capture", "export", "--model", MODEL, "--version", "1", "--group", GROUP).stdout
    assert v1.splitlines() == [
        HEADER,
        "2025-11-27T14:00:00.101Z,dev-1,lab,1,p1,0,1.0,2.0,3.0,4.0,3,3.0,5.0,7.0,9.0,3",
    ]

    pq = pytest.importorskip("pyarrow.parquet")
    target = tmp_path / "v2.parquet"
    hub.outpost(
        "capture", "export", "--model", MODEL, "--version", "2", "--format", "parquet", "-o", str(target)
    )
    table = pq.read_table(io.BytesIO(target.read_bytes()))
    assert table.column_names == HEADER.split(",")
    rows = table.to_pylist()
    assert [(r["id"], r["row"], r["b"], r["predicted"], r["probability_3"], r["label"]) for r in rows] == [
        ("p2", 0, None, 3, 5.0, "1"),
        ("p2", 1, 2.0, 0, 5.0, "2"),
        ("p3", 0, 1.0, 0, 3.0, None),
    ]
    assert rows[0]["ts"].isoformat() == "2025-11-27T14:00:00.500000+00:00"

    status = hub.outpost("capture", "status", "--model", MODEL).stdout
    assert "5% of requests, at most 100 a minute per device" in status and "2/0/1" in status

    out = hub.outpost("capture", "stop", "--group", GROUP).stdout
    assert out.startswith("capture off in group lab")
    assert signed(hub, tmp_path / "c4") is None
    again = hub.outpost("capture", "stop", "--group", GROUP, check=False)
    assert again.returncode == 2 and "(409)" in again.stderr and "off in group 'lab' already" in again.stderr


def test_capture_refusals(hub: HubProcess) -> None:
    assert api(hub, "PUT", "/api/v1/groups/nowhere/capture", 404, json={"sample_bp": 5})
    assert api(hub, "DELETE", "/api/v1/groups/nowhere/capture", 404)
    api(hub, "PUT", "/api/v1/groups/refusals/deployment", json={"model": MODEL, "stable": 1})
    assert api(hub, "PUT", "/api/v1/groups/refusals/capture", 422, json={"sample_bp": 0})
    assert api(
        hub, "PUT", "/api/v1/groups/refusals/capture", 422, json={"sample_bp": 5, "max_rows_per_min": 6001}
    )
    bad = api(
        hub,
        "PUT",
        "/api/v1/groups/refusals/deployment",
        400,
        json={"model": MODEL, "stable": 1, "capture": {"sample_bp": 10001}},
    )
    assert "from 1 to 10000" in bad["detail"]
    assert api(hub, "GET", f"/api/v1/capture/{MODEL}/9/export", 404)
    assert "csv or parquet" in api(hub, "GET", f"/api/v1/capture/{MODEL}/1/export?format=xlsx", 400)["detail"]
    assert hub.api("GET", "/api/v1/capture", auth=False).status_code == 401
    body = json.dumps({"model": MODEL, "stable": 1, "capture": {"sample_bp": 100}})
    d = api(
        hub,
        "PUT",
        "/api/v1/groups/refusals/deployment",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    assert d["capture"] == {"sample_bp": 100, "max_rows_per_min": 60}


def test_the_dashboard_shows_capture_and_its_session_downloads_the_csv(hub: HubProcess) -> None:
    csv_path = f"/models/{MODEL}/versions/2/capture.csv?group={GROUP}"
    stranger = requests.get(hub.url + csv_path, allow_redirects=False, timeout=30)
    assert stranger.status_code == 303 and stranger.headers["location"].startswith("/login")
    browser = requests.Session()
    login = browser.post(hub.url + "/login", data={"token": hub.token, "next": "/"}, allow_redirects=False)
    assert login.status_code == 303
    page = browser.get(f"{hub.url}/models/{MODEL}", timeout=30).text
    assert "<h2>Data capture</h2>" in page
    assert f'href="{csv_path.replace("&", "&amp;")}"' in page or f'href="{csv_path}"' in page
    assert "<td>lab</td><td>off</td>" in page  # stopped by the first test
    download = browser.get(hub.url + csv_path, timeout=30)
    assert download.status_code == 200 and download.headers["content-type"].startswith("text/csv")
    assert download.headers["content-disposition"] == f'attachment; filename="{MODEL}-v2-capture.csv"'
    assert download.text.splitlines() == [HEADER, *V2_LINES]
