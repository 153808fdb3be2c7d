"""The dashboard: the pure parts (session cookie, SVG charts, view models) table-driven; the login
and redirects against the real hub process; and the pages in a real headless Chromium (Debian's
/usr/bin/chromium driven by Playwright) against a hub filled by two real agents over a real
Mosquitto, checking what a person would see.

OUTPOST_SCREENSHOTS=docs/screenshots pytest tests/hub/test_dashboard.py -k browser  rewrites the
README's screenshots (otherwise they go to the test's temp directory).
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from hub.dashboard import session, svg, views
from hub.dashboard.routes import safe_next
from hub.fleet.ledger import Alert
from hub.fleet.store import DeviceInfo
from hub.packager.profile import bin_counts, numeric_profile
from hub.registry import Deployment, VersionInfo
from tests.support.broker import Mosquitto, mosquitto_available
from tests.support.hubproc import HubProcess

CHROMIUM = Path("/usr/bin/chromium")
KEY = "ab" * 32
NOW = 1_800_000_000.0

# -- session cookie ---------------------------------------------------------------------------


def test_a_session_cookie_names_the_token_and_never_holds_it() -> None:
    value = session.issue("operator", KEY, NOW)
    assert value.startswith("v1.operator.") and KEY not in value
    parsed = session.parse(value)
    assert parsed is not None and parsed.name == "operator"
    assert parsed.expires == int(NOW) + session.SESSION_S
    assert session.valid(parsed, KEY, NOW + 60)


@pytest.mark.parametrize(
    ("change", "ok"),
    [
        pytest.param(lambda v, k, t: (v, k, t), True, id="as-issued"),
        pytest.param(lambda v, k, t: (v, "cd" * 32, t), False, id="token-replaced-other-hash"),
        pytest.param(lambda v, k, t: (v, None, t), False, id="token-revoked"),
        pytest.param(lambda v, k, t: (v, k, t + session.SESSION_S), False, id="expired"),
        pytest.param(lambda v, k, t: (v.replace("operator", "admin"), k, t), False, id="other-name"),
        pytest.param(
            lambda v, k, t: (re.sub(r"\.(\d+)\.", lambda m: f".{int(m[1]) + 9999}.", v), k, t),
            False,
            id="extended-expiry",
        ),
    ],
)
def test_a_session_is_valid_only_as_issued_for_a_live_token(
    change: Callable[[str, str, float], tuple[str, str | None, float]], ok: bool
) -> None:
    value, key, now = change(session.issue("operator", KEY, NOW), KEY, NOW + 1)
    parsed = session.parse(value)
    assert parsed is not None
    assert session.valid(parsed, key, now) is ok


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "v1.operator.12",
        "v2.operator.1.aa",
        "v1.op erator.1." + "a" * 64,
        "v1.x.1." + "g" * 64,
        "v1.x.-1." + "a" * 64,
        "v1.x.1." + "a" * 300,
    ],
)
def test_malformed_cookies_are_no_session(value: str | None) -> None:
    assert session.parse(value) is None


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/models/wine", "/models/wine"),
        (None, "/"),
        ("", "/"),
        ("https://evil.example/", "/"),
        ("//evil.example/x", "/"),
        ("/\\evil", "/"),
        ("models", "/"),
    ],
)
def test_after_login_the_browser_goes_only_to_a_path_on_this_hub(target: str | None, expected: str) -> None:
    assert safe_next(target) == expected


# -- SVG charts -------------------------------------------------------------------------------


def _coords(markup: str) -> list[list[tuple[float, float]]]:
    return [
        [tuple(map(float, p.split(","))) for p in m.split()]  # type: ignore[misc]
        for m in re.findall(r'<polyline[^>]* points="([^"]+)"', markup)
    ]


def test_a_chart_draws_axes_a_line_per_run_and_the_threshold() -> None:
    markup = svg.line_chart(
        [svg.Series("alcohol", [(0, 0.0), (10, 0.1), (20, None), (30, 0.5), (40, 1.0)])],
        title="alcohol: PSI",
        y_label="PSI",
        threshold=0.25,
        threshold_label="PSI 0.25",
    )
    assert markup.startswith("<svg") and markup.endswith("</svg>")
    runs = _coords(markup)
    assert [len(r) for r in runs] == [2, 2]  # broken at the gap
    assert markup.count('class="point"') == 4
    (threshold_y,) = map(float, re.findall(r'class="threshold" x1="\d+" y1="([\d.]+)"', markup))
    bottom = svg.HEIGHT - svg.MARGIN_BOTTOM
    top = svg.MARGIN_TOP
    # y axis 0..1.2 (the maximum 1.0 with 5% headroom, rounded up to a nice number)
    assert threshold_y == pytest.approx(bottom - 0.25 / 1.2 * (bottom - top), abs=0.1)
    assert runs[1][1][1] == pytest.approx(bottom - 1.0 / 1.2 * (bottom - top), abs=0.1)
    assert runs[0][0] == pytest.approx((svg.MARGIN_LEFT, bottom), abs=0.1)  # the first point at 0
    assert runs[1][1][0] == pytest.approx(svg.WIDTH - svg.MARGIN_RIGHT, abs=0.1)  # the last at the right
    assert ">PSI 0.25<" in markup and ">PSI<" in markup and "<title>alcohol: PSI</title>" in markup


def test_a_chart_scales_up_to_the_threshold_when_the_data_stays_below_it() -> None:
    markup = svg.line_chart([svg.Series("s", [(0, 0.01), (1, 0.02)])], threshold=0.25)
    ticks = re.findall(r'class="tick">([^<]+)<', markup)
    assert ticks[4] == "0.3"  # the y axis reaches the nice number above the threshold (0.25 * 1.05)


def test_a_chart_escapes_every_text() -> None:
    markup = svg.line_chart(
        [svg.Series('<b>"x"</b>', [(0, 1.0), (1, 2.0)], ["<script>1</script>", "&"])],
        title="<t>",
        y_label="<y>",
        x_format=lambda x: f"<{x}>",
    )
    assert "<script>" not in markup and "<b>" not in markup and "<t>" not in markup
    assert "&lt;script&gt;1&lt;/script&gt;" in markup and "&lt;y&gt;" in markup


@pytest.mark.parametrize(
    "series",
    [
        pytest.param([], id="no-series"),
        pytest.param([svg.Series("s", [(0, None), (1, math.nan)])], id="gaps"),
    ],
)
def test_a_chart_without_values_says_so(series: list[svg.Series]) -> None:
    markup = svg.line_chart(series, threshold=0.25)
    assert ">no data<" in markup and "<polyline" not in markup


def test_x_ticks_that_would_read_the_same_are_drawn_once() -> None:
    markup = svg.line_chart([svg.Series("s", [(0.0, 1.0), (1.0, 2.0)])], x_format=lambda x: str(round(x)))
    assert re.findall(r'class="tick x-tick">([^<]+)<', markup) == ["0", "1"]


def test_a_single_point_is_drawn_in_the_middle() -> None:
    markup = svg.line_chart([svg.Series("s", [(5, 1.0)])])
    (cx,) = map(float, re.findall(r'<circle class="point" cx="([\d.]+)"', markup))
    assert cx == pytest.approx(
        svg.MARGIN_LEFT + (svg.WIDTH - svg.MARGIN_LEFT - svg.MARGIN_RIGHT) / 2, abs=0.1
    )


# -- view models ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "last", "width"),
    [
        (0, 0, 1),
        (0, 40, 1),
        (0, 47.9, 1),
        (0, 48, 2),
        (0, 3600, 120),
        (0, 86399, 1800),
        (0, 86400, 3600),
        (0, 1e9, 86400),
    ],
)
def test_the_drift_bucket_is_the_smallest_width_under_the_point_limit(
    first: float, last: float, width: int
) -> None:
    assert views.bucket_width(first, last) == width


def _device(device_id: str, group: str, online: bool, versions: dict[str, int], seen: datetime) -> DeviceInfo:
    return DeviceInfo(
        device_id, group, online, 1, seen, 10, {"versions": versions, "update": {"state": "idle"}}
    )


def _alert(kind: str, device: str, count: int = 1) -> Alert:
    at = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
    return Alert(1, kind, "critical", device, "wine", 1, at, at, count, f"{kind} on {device}", {})


def test_the_fleet_view_counts_groups_online_devices_and_rollbacks() -> None:
    now = datetime(2026, 11, 27, 12, 0, 30, tzinfo=UTC)
    devices = [
        _device("dev-b", "lab", True, {"wine": 2}, now - timedelta(seconds=5)),
        _device("dev-a", "lab", False, {"wine": 1}, now - timedelta(minutes=3)),
        _device("dev-c", "plant", True, {}, now - timedelta(hours=2)),
    ]
    view = views.fleet_view(devices, [_alert("rollback", "dev-b", 2), _alert("drift", "dev-a")], now)
    assert [d.device_id for d in view.devices] == ["dev-a", "dev-b", "dev-c"]
    assert view.online == 2
    assert [(g.group, g.devices, g.online) for g in view.groups] == [("lab", 2, 1), ("plant", 1, 1)]
    a, b, c = view.devices
    assert (a.versions, a.last_seen_ago, a.rollbacks) == ("wine v1", "3m ago", 0)
    assert (b.versions, b.rollbacks, b.update) == ("wine v2", 2, "idle")
    assert (c.versions, c.last_seen_ago) == (views.DASH, "2h ago")
    assert [(x.kind, x.model) for x in view.alerts] == [("rollback", "wine v1"), ("drift", "wine v1")]
    older = [_alert("rollback", "dev-c", 3), _alert("rollback", "dev-b", 2)]
    counted = views.fleet_view(devices, [], now, rollback_alerts=older)
    assert [d.rollbacks for d in counted.devices] == [0, 2, 3] and counted.alerts == []


@dataclass(frozen=True)
class _Manifest:
    """What the model view reads of a manifest."""

    task: str = "classification"
    quantization: Any = None


def _version(v: int) -> VersionInfo:
    manifest: Any = _Manifest(quantization={"kept": "int8", "method": "static-qdq"})
    return VersionInfo("wine", v, manifest, "1" * 64, 10, "2" * 64, 4096, datetime(2026, 11, v, tzinfo=UTC))


def test_the_model_view_shows_who_runs_what_and_the_fleet_figures_per_version() -> None:
    now = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
    devices = [
        _device("dev-a", "lab", True, {"wine": 1}, now),
        _device("dev-b", "lab", True, {"wine": 2, "other": 7}, now),
        _device("dev-c", "lab", False, {"wine": 1}, now),
        _device("dev-d", "lab", True, {"wine": 9}, now),
        _device("dev-e", "lab", True, {"other": 1}, now),
    ]
    deployment = Deployment(5, "lab", "wine", 1, 2, 10, "s", None, 3, now, "operator")
    other = Deployment(6, "plant", "other", 7, None, 0, "s", None, 3, now, "operator")
    summaries = {
        1: {
            "summary": {"requests": 400},
            "derived": {
                "error_rate": 0.0025,
                "latency_ms": {"p50": 1.5, "p95": 2.25},
                "accuracy": 0.9,
                "labelled": 50,
            },
        },
        2: {
            "summary": None,
            "derived": {"error_rate": None, "latency_ms": None, "accuracy": None, "labelled": 0},
        },
    }
    view = views.model_view(
        "wine", [_version(1), _version(2)], [deployment, other], devices, summaries, [], "1h"
    )
    assert [v.version for v in view.versions] == [2, 1]
    v2, v1 = view.versions
    assert v1.devices == ["dev-a", "dev-c"] and v2.devices == ["dev-b"]
    assert (v1.requests, v1.error_rate, v1.p50_ms, v1.p95_ms, v1.accuracy) == (
        400,
        "0.25%",
        "1.5",
        "2.25",
        "90.00% of 50",
    )
    assert (v2.requests, v2.error_rate, v2.accuracy, v2.quantization, v2.size_kib) == (
        0,
        views.DASH,
        views.DASH,
        "int8",
        "4 KiB",
    )
    assert [(d.group, d.stable, d.candidate, d.percent) for d in view.deployments] == [
        ("lab", 1, "v2", "10%")
    ]
    assert view.unversioned_devices == ["dev-d"] and view.rollouts == []


def test_a_rollout_shows_its_progress_and_every_gate_decision_with_its_evidence() -> None:
    doc = {
        "id": 3, "group": "lab", "model": "wine", "stable": 1, "candidate": 2, "steps": [5, 25, 100],
        "step": 1, "percent": 25, "state": "halted", "reason": "error rate 9% over 5%",
        "decisions": [
            {"at": "2026-11-27T12:00:00+00:00", "action": "start", "actor": "ops", "step": 0, "percent": 5,
             "reason": "", "evidence": {}},
            {"at": "2026-11-27T12:10:00+00:00", "action": "advance", "actor": "controller", "step": 0,
             "percent": 5, "reason": "gates passed", "evidence": {"requests": 600, "error_rate": 0.01}},
            {"at": "2026-11-27T12:20:00+00:00", "action": "halt", "actor": "controller", "step": 1,
             "percent": 25, "reason": "error rate", "evidence": {"blob": "x" * 1000}},
        ],
    }  # fmt: skip
    view = views.rollout_view(doc)
    assert (view.id, view.group, view.candidate) == ("#3", "lab", 2)
    assert view.status == "halted: error rate 9% over 5%"
    assert view.progress == "step 2 of 3 at 25% (steps: 5%, 25%, 100%)"
    start, advance, halt = view.decisions
    assert (start.at, start.step, start.decision, start.evidence) == (
        "2026-11-27 12:00:00Z",
        "1 at 5%",
        "start (ops)",
        "",
    )
    assert advance.evidence == '{"error_rate": 0.01, "requests": 600}' and advance.reason == "gates passed"
    assert halt.decision == "halt (controller)" and len(halt.evidence) == views.EVIDENCE_CHARS


FEATURES = ("a", "b")


def _profile() -> dict[str, Any]:
    rng = np.random.default_rng(1)
    return {
        "n": 2000,
        "features": [
            {"name": f, "kind": "numeric", **numeric_profile(rng.standard_normal(2000))} for f in FEATURES
        ],
        "prediction": {"kind": "classification", "labels": ["0", "1"], "counts": [1000, 1000]},
    }


def _window(profile: dict[str, Any], rows: int, shift_b: float, rng: np.random.Generator) -> dict[str, Any]:
    features = [
        {
            "name": ref["name"],
            "kind": "numeric",
            "counts": bin_counts(
                ref["bin_edges"], rng.standard_normal(rows) + (shift_b if ref["name"] == "b" else 0)
            ),
            "missing": 0,
            "other": 0,
        }
        for ref in profile["features"]
    ]
    return {
        "schema": "outpost-summary/1",
        "model": "m",
        "version": 1,
        "start": NOW,
        "end": NOW + 10,
        "requests": rows,
        "errors": 0,
        "rows": rows,
        "windows": 1,
        "latency": {"bounds": [0.001, 0.01], "counts": [rows, 0, 0], "sum_us": 1000 * rows},
        "features": features,
        "prediction": {
            "kind": "classification",
            "labels": ["0", "1"],
            "counts": [rows // 2, rows - rows // 2],
            "other": 0,
            "missing": 0,
        },
    }


def test_drift_over_time_sums_each_bucket_and_tests_it_against_the_profile() -> None:
    profile = _profile()
    rng = np.random.default_rng(2)
    windows = []
    # 10 s apart, two devices each time: b shifts from t=30 on; one thin bucket at t=60
    for i, t in enumerate((0, 10, 20, 30, 40, 50)):
        shift = 1.0 if t >= 30 else 0.0
        windows.append(("dev-a", i, NOW + t, _window(profile, 200, 0.0, rng)))
        windows.append(("dev-b", i, NOW + t + 0.5, _window(profile, 200, shift, rng)))
    windows.append(("dev-a", 99, NOW + 60, _window(profile, 20, 0.0, rng)))
    timeline = views.drift_timeline(windows, profile, min_rows=100)
    assert timeline.bucket_s == 2
    assert list(timeline.features) == ["a", "b"]
    b = timeline.features["b"]
    assert len(b) == 7 and [p.devices for p in b] == [2] * 6 + [1]
    assert [p.rows for p in b] == [400] * 6 + [20]
    assert all(p.psi is not None and p.psi < 0.1 for p in b[:3])
    assert all(p.psi is not None and p.psi > 0.25 and p.drifted for p in b[3:6])
    assert b[6].psi is None and b[6].p_value is None  # under min_rows: a gap
    assert all(not p.drifted for p in timeline.features["a"][:6])
    assert b[0].t == pytest.approx((math.floor(NOW / 2) + 0.5) * 2)


def test_the_drift_view_puts_drifted_features_and_alerting_devices_first() -> None:
    profile = _profile()
    rng = np.random.default_rng(3)
    windows = [("dev-b", 1, NOW, _window(profile, 400, 1.0, rng))]
    timeline = views.drift_timeline(windows, profile)
    fleet = {
        "fleet": {
            "rows": 400,
            "enough_rows": True,
            "features": [
                {"name": "a", "test": "ks", "p_value": 0.5, "psi": 0.01, "drifted": False},
                {"name": "b", "test": "ks", "p_value": 1e-12, "psi": 0.9, "drifted": True},
            ],
        },
        "devices": [
            {"device_id": "dev-a", "group": "lab", "alert": False, "alerting": [], "drifted": [], "end": NOW},
            {
                "device_id": "dev-b",
                "group": "lab",
                "alert": True,
                "alerting": ["b"],
                "drifted": ["b"],
                "end": NOW,
            },
        ],
    }
    view = views.drift_view("m", 1, fleet, timeline, "range")
    assert [f.name for f in view.features] == ["b", "a"] and view.features[0].drifted
    assert view.alerting == ["dev-b"] and view.devices[0].alerting == "b"
    assert view.features[0].chart.startswith("<svg") and "PSI 0.25" in view.features[0].chart
    assert (view.features[0].p_value, view.features[0].psi) == ("1e-12", "0.9")


def test_the_experiments_page_has_nothing_to_fake() -> None:
    template = Path("hub/dashboard/templates/experiments.html").read_text()
    assert "No experiments yet" in template


# -- login and redirects, against the real hub process ----------------------------------------


@pytest.fixture(scope="module")
def plain_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    hub = HubProcess(tmp_path_factory.mktemp("dashboard-hub") / "data").start()
    yield hub
    hub.kill()


@pytest.mark.e2e
def test_every_page_sends_a_stranger_to_the_login(plain_hub: HubProcess) -> None:
    for path, target in [
        ("/", "/login"),
        ("/models/wine", "/login?next=%2Fmodels%2Fwine"),
        ("/drift/wine/1?since=1h", "/login?next=%2Fdrift%2Fwine%2F1%3Fsince%3D1h"),
        ("/experiments", "/login?next=%2Fexperiments"),
        ("/models", "/login?next=%2Fmodels"),
    ]:
        resp = requests.get(plain_hub.url + path, allow_redirects=False, timeout=10)
        assert (resp.status_code, resp.headers["location"]) == (303, target), path
    forged = session.issue("operator", "00" * 32, time.time())
    resp = requests.get(
        plain_hub.url + "/", cookies={session.COOKIE: forged}, allow_redirects=False, timeout=10
    )
    assert resp.status_code == 303


@pytest.mark.e2e
def test_login_sets_a_strict_httponly_cookie_without_the_token_and_the_api_keeps_bearer_tokens(
    plain_hub: HubProcess,
) -> None:
    wrong = requests.post(plain_hub.url + "/login", data={"token": "outpost_nope"}, timeout=10)
    assert wrong.status_code == 401 and "unknown or revoked" in wrong.text
    resp = requests.post(
        plain_hub.url + "/login",
        data={"token": plain_hub.token, "next": "/experiments"},
        allow_redirects=False,
        timeout=10,
    )
    assert (resp.status_code, resp.headers["location"]) == (303, "/experiments")
    cookie = resp.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    assert plain_hub.token not in cookie and plain_hub.token.removeprefix("outpost_") not in cookie
    jar = resp.cookies
    page = requests.get(plain_hub.url + "/experiments", cookies=jar, timeout=10)
    assert page.status_code == 200 and "No experiments yet" in page.text
    assert requests.get(plain_hub.url + "/api/v1/models", cookies=jar, timeout=10).status_code == 401
    assert plain_hub.api("GET", "/api/v1/models").status_code == 200
    css = requests.get(plain_hub.url + "/dashboard.css", timeout=10)
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    missing = requests.get(plain_hub.url + "/models/nope", cookies=jar, timeout=10)
    assert missing.status_code == 404 and "nope" in missing.text and "<html" in missing.text

    out = requests.post(plain_hub.url + "/logout", cookies=jar, allow_redirects=False, timeout=10)
    assert out.status_code == 303 and session.COOKIE in out.headers["set-cookie"]
    assert "Max-Age=0" in out.headers["set-cookie"] or "expires" in out.headers["set-cookie"].lower()


# -- in a real browser, against a hub filled by real agents -----------------------------------

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WINDOW = 8  # requests of 50 rows per monitor window: 400 rows


def _wait(what: str, check: Callable[[], bool], timeout: float = 45.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@dataclass
class FilledHub:
    hub: HubProcess
    shots: Path


@pytest.fixture(scope="module")
def filled_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FilledHub]:
    """A hub with wine v1 and v2 (v1 stable in `lab`, v2 in a paused rollout), two real agents serving v1
    and reporting over a real Mosquitto; dev-b's alcohol reads 1.5 sd high from its second window on,
    so its drift alert fires (k = 3) and the fleet's drift shows it."""
    import csv

    from tests.support.agentproc import AgentProcess
    from tests.support.packages import wine_versions

    root = tmp_path_factory.mktemp("dashboard-e2e")
    wine = wine_versions(root / "wine", versions=(1, 2))
    with (root / "wine" / "wine-sample.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    names, table = rows[0][:-1], np.asarray(rows[1:], dtype=np.float64)
    x, y = table[:, :-1], table[:, -1].astype(np.int64)
    alcohol = names.index("alcohol")

    broker = Mosquitto(root / "broker").start()
    hub = HubProcess(root / "hub").start(mqtt_url=broker.url)
    agents: list[AgentProcess] = []
    try:
        hub.outpost("push", str(wine[1]), "--quiet")
        hub.outpost("push", str(wine[2]), "--quiet")
        hub.outpost("deploy", "wine", "1", "--group", "lab")
        hub.outpost("rollout", "start", "wine", "2", "--group", "lab")  # v2 a canary at the first step
        hub.outpost("rollout", "pause", "1")  # held where it is: the decision log has two entries
        for device in ("dev-a", "dev-b"):
            agent = AgentProcess(
                root / device,
                extra={
                    "device_id": device,
                    "group": "lab",
                    "mqtt": {"url": broker.url},
                    "monitor": {"window_requests": WINDOW, "drift_min_rows": 200, "drift_k": 3},
                },
            )
            agent.install(wine[1])
            agents.append(agent.start())
        rng = np.random.default_rng(20261127)

        def window(agent: AgentProcess, shift: float, label: bool) -> None:
            for _ in range(WINDOW):
                pick = rng.integers(0, len(x), size=50)
                batch = x[pick].copy()
                batch[:, alcohol] += shift * x[:, alcohol].std()
                body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [50, len(names)],
                                    "data": batch.astype(np.float32).ravel().tolist()}]}  # fmt: skip
                status, doc = agent.json("POST", "/v2/models/wine/infer", body)
                assert status == 200, doc
                if label:
                    status, doc = agent.json(
                        "POST", "/v1/feedback", {"id": doc["id"], "label": y[pick].tolist()}
                    )
                    assert status == 200, doc

        dev_a, dev_b = agents
        for r in range(5):  # spread over a few seconds, so drift has a history
            window(dev_a, 0.0, label=r == 0)
            window(dev_b, 1.5 if r >= 1 else 0.0, label=False)
            time.sleep(1.0)

        def drift() -> dict[str, Any]:
            return dict(hub.api("GET", "/api/v1/fleet/drift", params={"model": "wine", "version": 1}).json())

        _wait("dev-b's drift alert at the hub", lambda: drift().get("alerting_devices") == ["dev-b"])
        _wait(
            "ten summary windows", lambda: drift()["devices_summed"] == 2 and drift()["fleet"]["rows"] == 4000
        )
        shots = Path(os.environ.get("OUTPOST_SCREENSHOTS") or root / "screenshots")
        shots.mkdir(parents=True, exist_ok=True)
        yield FilledHub(hub, shots)
    finally:
        for agent in agents:
            agent.kill()
        hub.kill()
        broker.kill()


@pytest.mark.e2e
@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="Debian's chromium is not installed (make sysdeps installs it)"
)
@pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed (make sysdeps)")
def test_browser_an_operator_logs_in_and_sees_the_fleet_the_model_and_the_drift(
    filled_hub: FilledHub, tmp_path: Path
) -> None:
    from playwright.sync_api import expect, sync_playwright

    hub, shots = filled_hub.hub, filled_hub.shots
    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"),  # a fresh --user-data-dir
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1280, "height": 900},
        )
        try:
            page = browser.new_page()
            page.goto(hub.url + "/models/wine")
            expect(page).to_have_url(re.compile(r"/login\?next=%2Fmodels%2Fwine$"))

            page.fill("#token", "outpost_not-the-token")
            page.click("button[type=submit]")
            expect(page.get_by_role("alert")).to_have_text("That token is unknown or revoked.")
            page.screenshot(path=str(shots / "login.png"))

            page.fill("#token", hub.token)
            page.click("button[type=submit]")
            expect(page).to_have_url(hub.url + "/models/wine")  # back where the login was asked
            cookie = next(c for c in browser.cookies() if c["name"] == session.COOKIE)
            assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
            assert hub.token.removeprefix("outpost_") not in cookie["value"]

            page.click("text=Fleet")
            expect(page.locator("#online-count")).to_have_text("2")
            for device in ("dev-a", "dev-b"):
                row = page.locator(f"tr[data-device={device}]")
                expect(row).to_contain_text("online")
                expect(row).to_contain_text("lab")
                expect(row).to_contain_text("wine v1")
            expect(page.locator("table.alerts")).to_contain_text("drift")
            expect(page.locator("table.alerts")).to_contain_text("dev-b")
            page.screenshot(path=str(shots / "fleet.png"), full_page=True)

            page.click("text=Models")
            page.click("a[href='/models/wine']")
            v1, v2 = page.locator("tr[data-version='1']"), page.locator("tr[data-version='2']")
            expect(v1.locator("td.runs")).to_have_text("dev-a, dev-b")
            expect(v2.locator("td.runs")).to_have_text("no device")
            expect(v1.locator("td.requests")).to_have_text("80")  # 10 windows of 8 requests (of 50 rows)
            expect(v1).to_contain_text("of 400")  # accuracy from the 400 labelled rows of dev-a
            expect(page.locator("table.deployments")).to_contain_text("v2")
            rollout = page.locator("section.rollout")
            expect(rollout.locator("h3")).to_contain_text("#1: v2 to lab")
            expect(rollout.locator("h3")).to_contain_text("paused")
            expect(rollout.locator("tbody tr")).to_have_count(2)
            expect(rollout.locator("tbody tr").nth(1)).to_contain_text("pause (operator)")
            page.screenshot(path=str(shots / "model.png"), full_page=True)

            v1.locator("a", has_text="drift").click()
            expect(page.locator("h1")).to_have_text("Drift: wine v1")
            expect(page.locator(".alerting")).to_have_text("dev-b")
            figure = page.locator("figure[data-feature=alcohol]")
            expect(figure).to_contain_text("drifted")
            chart = figure.locator("svg.chart")
            expect(chart).to_be_visible()
            assert chart.locator("circle.point").count() >= 3
            expect(chart.locator("line.threshold")).to_have_count(1)
            assert page.locator("figure.feature").first.get_attribute("data-feature") == "alcohol"
            page.screenshot(path=str(shots / "drift.png"), full_page=False)

            page.click("text=Experiments")
            expect(page.locator("#no-experiments")).to_contain_text("No experiments yet")

            page.click("text=Log out")
            expect(page).to_have_url(hub.url + "/login")
            page.goto(hub.url + "/")
            expect(page).to_have_url(hub.url + "/login")
        finally:
            browser.close()
