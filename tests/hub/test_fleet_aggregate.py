"""The fleet's pure parts: sums of windows, derived figures, drift on summed counts, alert rules,
query times. Numbers worked out by hand in the comments."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pytest

from hub.errors import InvalidRequestError
from hub.fleet.aggregate import derived, fleet_drift, latency_quantile, layout_problem, sum_windows
from hub.fleet.alerts import AlertRules, drift_alert, error_bucket, error_rate_alert, update_event_alert
from hub.fleet.queries import TimeRange, parse_when
from hub.packager.profile import bin_counts, numeric_profile

BOUNDS = [0.001, 0.01, 0.1]


def profile(seed: int = 0, n: int = 1000) -> dict[str, Any]:
    """Two numeric features N(0, 1) on decile bins, a categorical one, four classes."""
    rng = np.random.default_rng(seed)
    return {
        "n": n,
        "features": [
            {"name": "x", "kind": "numeric", **numeric_profile(rng.standard_normal(n))},
            {"name": "y", "kind": "numeric", **numeric_profile(rng.standard_normal(n))},
            {
                "name": "colour",
                "kind": "categorical",
                "categories": ["red", "green", "blue"],
                "counts": [500, 300, 200],
            },
        ],
        "prediction": {
            "kind": "classification",
            "labels": ["0", "1", "2", "3"],
            "counts": [250, 250, 250, 250],
        },
    }


def window(
    prof: dict[str, Any],
    *,
    start: float = 0.0,
    end: float = 60.0,
    requests: int = 100,
    errors: int = 0,
    latency: list[int] | None = None,
    sum_us: int = 0,
    x: Any = None,
    y: Any = None,
    colour: tuple[list[int], int] = ([0, 0, 0], 0),
    classes: list[int] | None = None,
    feedback: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A summary window; x and y are raw samples binned into the profile's edges as a device does."""
    feats = prof["features"]
    rows = requests - errors
    xs = bin_counts(feats[0]["bin_edges"], np.asarray(x, dtype=np.float64)) if x is not None else None
    ys = bin_counts(feats[1]["bin_edges"], np.asarray(y, dtype=np.float64)) if y is not None else None
    doc: dict[str, Any] = {
        "schema": "outpost-summary/1",
        "model": "wine",
        "version": 3,
        "start": start,
        "end": end,
        "windows": 1,
        "requests": requests,
        "errors": errors,
        "rows": rows,
        "latency": {"bounds": BOUNDS, "counts": latency or [requests, 0, 0, 0], "sum_us": sum_us},
        "features": [
            {"name": "x", "kind": "numeric", "counts": xs or [0] * 10, "missing": 0, "other": 0},
            {"name": "y", "kind": "numeric", "counts": ys or [0] * 10, "missing": 0, "other": 0},
            {"name": "colour", "kind": "categorical", "counts": colour[0], "missing": 0, "other": colour[1]},
        ],
        "prediction": {
            "kind": "classification",
            "labels": ["0", "1", "2", "3"],
            "counts": classes or [0, 0, 0, 0],
            "other": 0,
            "missing": 0,
        },
    }
    if feedback is not None:
        doc["feedback"] = feedback
    return doc


# -- sums and derived figures ------------------------------------------------------------------


def three_devices(prof: dict[str, Any]) -> list[tuple[str, int, dict[str, Any]]]:
    d1 = window(prof, start=0, end=60, requests=100, errors=1, latency=[10, 80, 10, 0], sum_us=600_000,
                colour=([50, 30, 19], 0), feedback={"labelled": 10, "correct": 9})  # fmt: skip
    d2 = window(prof, start=30, end=90, requests=200, errors=2, latency=[20, 160, 20, 0], sum_us=1_200_000,
                colour=([100, 60, 38], 0), feedback={"labelled": 20, "correct": 15})  # fmt: skip
    # an older agent: no feedback key at all (null)
    d3 = window(prof, start=60, end=120, requests=300, errors=3, latency=[30, 240, 30, 0], sum_us=1_800_000,
                colour=([150, 90, 55], 2))  # fmt: skip
    return [("d1", 1, d1), ("d2", 7, d2), ("d3", 4, d3)]


def test_three_devices_add_to_the_totals() -> None:
    prof = profile()
    total = sum_windows(three_devices(prof), prof)
    w = total.window
    assert w is not None and total.skipped == []
    assert (w["requests"], w["errors"], w["rows"], w["windows"]) == (600, 6, 594, 3)
    assert (w["start"], w["end"]) == (0, 120)
    assert w["latency"]["counts"] == [60, 480, 60, 0] and w["latency"]["sum_us"] == 3_600_000
    assert w["features"][2]["counts"] == [300, 180, 112] and w["features"][2]["other"] == 2
    assert w["feedback"] == {"labelled": 30, "correct": 24}
    assert total.devices == {
        "d1": {"windows": 1, "requests": 100, "errors": 1},
        "d2": {"windows": 1, "requests": 200, "errors": 2},
        "d3": {"windows": 1, "requests": 300, "errors": 3},
    }
    d = derived(w)
    assert d["error_rate"] == pytest.approx(0.01)  # 6 / 600
    assert d["accuracy"] == pytest.approx(0.8)  # 24 / 30
    assert d["labelled"] == 30
    lat = d["latency_ms"]
    assert lat["mean"] == pytest.approx(6.0)  # 3.6 s / 600 requests
    # 60 | 480 | 60 in (0, 1 ms], (1, 10 ms], (10, 100 ms]:
    # p50: rank 300, bucket 2 from 60: 1 + 9 * 240/480 = 5.5 ms
    # p95: rank 570, bucket 3 from 540: 10 + 90 * 30/60 = 55 ms; p99: rank 594: 10 + 90 * 54/60 = 91 ms
    assert (lat["p50"], lat["p95"], lat["p99"]) == pytest.approx((5.5, 55.0, 91.0))


def test_order_does_not_matter() -> None:
    prof = profile()
    windows = three_devices(prof)
    sums = [sum_windows(list(order), prof).window for order in itertools.permutations(windows)]
    assert all(s == sums[0] for s in sums)


def test_a_window_that_does_not_fit_the_profile_is_left_out() -> None:
    prof = profile()
    windows = three_devices(prof)
    bad = window(prof, requests=1000)
    bad["features"][0]["counts"] = [1, 2, 3]  # 3 bins, the profile has 10
    renamed = window(prof, requests=1000)
    renamed["features"][1]["name"] = "z"
    other_bounds = window(prof, requests=1000)
    other_bounds["latency"]["bounds"] = [1.0, 2.0, 3.0]
    total = sum_windows([*windows, ("d9", 1, bad), ("d9", 2, renamed), ("d9", 3, other_bounds)], prof)
    assert total.window is not None and total.window["requests"] == 600
    reasons = {s["seq"]: s["reason"] for s in total.skipped}
    assert "3 bins, the profile 10" in reasons[1]
    assert "'z'" in reasons[2]
    assert "latency bounds" in reasons[3]
    assert "d9" not in total.devices
    assert layout_problem(windows[0][2], prof) is None


@pytest.mark.parametrize(
    ("counts", "q", "expected"),
    [
        pytest.param([10, 80, 10, 0], 0.5, (0.0055, False), id="p50-middle-bucket"),
        pytest.param([10, 80, 10, 0], 0.95, (0.055, False), id="p95"),
        pytest.param([100, 0, 0, 0], 0.5, (0.0005, False), id="first-bucket-from-zero"),
        pytest.param([0, 0, 0, 5], 0.5, (0.1, True), id="overflow-is-the-last-bound"),
        pytest.param([90, 0, 0, 10], 0.99, (0.1, True), id="p99-in-overflow"),
    ],
)
def test_latency_quantile(counts: list[int], q: float, expected: tuple[float, bool]) -> None:
    found = latency_quantile(BOUNDS, counts, q)
    assert found is not None
    assert found[0] == pytest.approx(expected[0]) and found[1] == expected[1]


def test_latency_quantile_of_nothing() -> None:
    assert latency_quantile(BOUNDS, [0, 0, 0, 0], 0.5) is None
    assert derived(None)["error_rate"] is None


def test_regression_feedback_gives_mae_and_rmse() -> None:
    w = {
        "requests": 4,
        "errors": 0,
        "latency": {"bounds": BOUNDS, "counts": [4, 0, 0, 0], "sum_us": 400},
        "feedback": {"labelled": 4, "abs_error_sum": 2.0, "sq_error_sum": 4.0},
    }
    d = derived(w)
    assert d["mae"] == pytest.approx(0.5) and d["rmse"] == pytest.approx(1.0)  # 2/4, sqrt(4/4)
    assert "accuracy" not in d


# -- drift on summed counts ---------------------------------------------------------------------


def test_fleet_drift_flags_a_shifted_feature_and_not_an_unshifted_one() -> None:
    prof = profile(seed=0)
    rng = np.random.default_rng(42)
    windows = []
    for i in range(3):  # three devices, 400 rows each; y shifted by half a standard deviation
        x, y = rng.standard_normal(400), rng.standard_normal(400) + 0.5
        w = window(prof, requests=400, x=x, y=y, colour=([200, 120, 80], 0), classes=[100, 100, 100, 100])
        windows.append((f"d{i}", i + 1, w))
    total = sum_windows(windows, prof)
    assert total.window is not None and total.window["rows"] == 1200
    result = fleet_drift(total.window, prof, alpha=0.05, method="bh", min_rows=100)
    by_name = {t["name"]: t for t in result["features"]}
    assert by_name["y"]["drifted"] and by_name["y"]["test"] == "ks"
    assert by_name["y"]["p_value"] < 1e-6 and by_name["y"]["psi"] > 0.1
    assert not by_name["x"]["drifted"] and by_name["x"]["p_value"] > 0.05
    assert not by_name["colour"]["drifted"] and by_name["colour"]["test"] == "chi2"
    assert result["prediction"]["test"] == "chi2" and not result["prediction"]["drifted"]
    assert result["drifted"] == ["y"] and result["enough_rows"]


def test_fleet_drift_by_hand() -> None:
    # One numeric feature with two reference bins [50, 50]; the fleet saw [80, 20]:
    # KS D = |0.5 - 0.8| = 0.3.  Categories [50, 50] vs [80, 20], "other" 0 (an empty extra bin,
    # merged into its neighbour): pooled 0.65 / 0.35, expected 65 / 35 on both rows,
    # chi2 = 2 * (15^2/65 + 15^2/35) = 19.78, 1 dof.
    prof = {
        "n": 100,
        "features": [
            {"name": "a", "kind": "numeric", "bin_edges": [0.0, 1.0, 2.0], "counts": [50, 50]},
            {"name": "c", "kind": "categorical", "categories": ["u", "v"], "counts": [50, 50]},
        ],
        "prediction": None,
    }
    w = {
        "rows": 100,
        "features": [
            {"name": "a", "kind": "numeric", "counts": [80, 20], "missing": 0, "other": 0},
            {"name": "c", "kind": "categorical", "counts": [80, 20], "missing": 0, "other": 0},
        ],
        "prediction": None,
    }
    result = fleet_drift(w, prof, min_rows=100)
    a, c = result["features"]
    assert a["statistic"] == pytest.approx(0.3)
    assert c["statistic"] == pytest.approx(2 * (225 / 65 + 225 / 35), rel=1e-5)
    assert a["drifted"] and c["drifted"] and result["prediction"] is None
    # PSI of [0.5, 0.5] -> [0.8, 0.2]: 0.3 ln(1.6) + (-0.3) ln(0.4) = 0.4159
    assert a["psi"] == pytest.approx(0.3 * math.log(1.6) - 0.3 * math.log(0.4), rel=1e-5)
    few = fleet_drift(w, prof, min_rows=101)
    assert not few["enough_rows"] and few["drifted"] == [] and few["features"][0]["p_value"] is not None


def test_categorical_values_never_seen_in_the_reference_count_as_drift() -> None:
    prof = profile()
    w = window(prof, requests=1000, colour=([250, 150, 100], 500))
    result = fleet_drift(sum_windows([("d", 1, w)], prof).window, prof, min_rows=10)
    colour = next(t for t in result["features"] if t["name"] == "colour")
    assert colour["drifted"] and colour["other"] == 500
    # x and y have no values in this window: nothing to test, never drifted
    assert next(t for t in result["features"] if t["name"] == "x")["test"] is None


def test_fleet_drift_of_nothing() -> None:
    result = fleet_drift(None, profile())
    assert result["features"] == [] and result["drifted"] == [] and not result["enough_rows"]


# -- alert rules --------------------------------------------------------------------------------

REF = {"model": "wine", "version": 4, "sha256": "ab" * 32}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param({"transition": "probation_failed", "from": "probation", "to": "rolled_back"},
                     ("rollback", "critical", "rollback:d1:9"), id="probation-failed"),
        pytest.param({"transition": "crash_loop", "from": "probation", "to": "rolled_back"},
                     ("rollback", "critical", "rollback:d1:9"), id="crash-loop"),
        pytest.param({"transition": "load_failed", "from": "staged", "to": "rolled_back"},
                     ("rollback", "critical", "rollback:d1:9"), id="self-test-failed"),
        pytest.param({"transition": "verify_failed", "from": "verifying", "to": "rolled_back"},
                     ("rollback", "critical", "rollback:d1:9"), id="verify-failed"),
        pytest.param({"transition": "hub_rollback", "from": "committed", "to": "rolled_back"},
                     ("rollback", "info", "rollback:d1:9"), id="hub-rollback"),
        pytest.param({"transition": "hub_rollback", "from": "rolled_back", "to": "rolled_back"},
                     None, id="hub-rollback-while-rolled-back"),
        pytest.param({"transition": "assignment_refused", "from": "rolled_back", "to": "rolled_back"},
                     ("refused", "warning", "refused:d1:wine:4"), id="refused-once-per-version"),
        pytest.param({"transition": "probation_passed", "from": "probation", "to": "committed"},
                     None, id="commit"),
        pytest.param({"transition": "download_failed", "from": "downloading", "to": "downloading"},
                     None, id="retry"),
    ],
)  # fmt: skip
def test_update_event_alerts(body: dict[str, Any], expected: tuple[str, str, str] | None) -> None:
    draft = update_event_alert("d1", 9, {"event": "update", "version": REF, "reason": "boom", **body})
    if expected is None:
        assert draft is None
        return
    assert draft is not None
    assert (draft.kind, draft.severity, draft.key) == expected
    assert (draft.device_id, draft.model, draft.version) == ("d1", "wine", 4)
    assert draft.evidence["transition"] == body["transition"] and "boom" in draft.message


def test_only_update_events_raise_alerts() -> None:
    assert update_event_alert("d1", 1, {"event": "install", "transition": "crash_loop"}) is None
    draft = update_event_alert("d1", 2, {"event": "update", "transition": "load_failed", "version": None})
    assert draft is not None and draft.model is None and "no version" in draft.message


def test_drift_alert_is_raised_by_the_alert_level_only() -> None:
    test = {"name": "y", "test": "ks", "statistic": 0.2, "p_value": 1e-9, "psi": 0.3, "streak": 3}
    body = {"model": "wine", "version": 3, "start": 0, "end": 60, "rows": 400, "alert": True,
            "alerting": ["y"], "streak": 3, "k": 3, "features": [test]}  # fmt: skip
    draft = drift_alert("d1", 5, body)
    assert draft is not None and draft.kind == "drift" and draft.device_id == "d1"
    assert draft.evidence["tests"]["y"]["p_value"] == 1e-9 and "y" in draft.message
    assert drift_alert("d1", 6, {**body, "alert": False}) is None


@pytest.mark.parametrize(
    ("requests", "errors", "expected"),
    [
        pytest.param(99, 99, None, id="too-few-requests"),
        pytest.param(1000, 49, None, id="under-threshold"),
        pytest.param(1000, 50, "warning", id="at-threshold"),
        pytest.param(1000, 250, "critical", id="critical"),
    ],
)
def test_error_rate_rule(requests: int, errors: int, expected: str | None) -> None:
    rules = AlertRules(error_rate=0.05, error_rate_critical=0.25, error_min_requests=100, error_window_s=300)
    draft = error_rate_alert("wine", 3, 600.0, requests, errors, 3, rules)
    assert (draft.severity if draft else None) == expected
    if draft is not None:
        assert draft.device_id is None and draft.evidence["rate"] == errors / requests


def test_error_bucket_and_rule_validation() -> None:
    assert error_bucket(899.9, 300) == 600 and error_bucket(900.0, 300) == 900
    with pytest.raises(ValueError):
        AlertRules(error_rate=0)
    with pytest.raises(ValueError):
        AlertRules(error_min_requests=0)


# -- query times --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("1h", 10_000 - 3600, id="hours"),
        pytest.param("15m", 10_000 - 900, id="minutes"),
        pytest.param("1.5d", 10_000 - 129_600, id="fraction"),
        pytest.param("1700000000", 1_700_000_000, id="epoch"),
        pytest.param("2024-01-01T00:00:00Z", 1_704_067_200, id="iso"),
        pytest.param(None, 123, id="default"),
    ],
)
def test_parse_when(text: str | None, expected: float) -> None:
    assert parse_when(text, 10_000, 123) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["yesterday", "1y", "nan", "-"])
def test_parse_when_refuses(text: str) -> None:
    with pytest.raises(InvalidRequestError):
        parse_when(text, 10_000, 0)


def test_time_range() -> None:
    span = TimeRange.parse(None, None, 100_000)
    assert (span.since, span.until) == (100_000 - 86_400, 100_000)
    with pytest.raises(InvalidRequestError, match="empty time range"):
        TimeRange.parse("2000", "1000", 100_000)
