"""agent.monitor.summary: per-window counts of one model version, and merging them.

The binning must be the reference profile builder's (hub.packager.profile), so live and
reference counts compare; windows must add up exactly, in any order.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.metrics import LATENCY_BUCKETS
from agent.monitor.binning import MAX_COMPARED_EDGES, FeatureBinner
from agent.monitor.summary import SCHEMA, WindowSummary, merge
from hub.packager import profile as hub_profile

NAN = float("nan")


class Clock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def numeric(name: str, edges: list[float]) -> dict[str, object]:
    return {"name": name, "kind": "numeric", "bin_edges": edges, "counts": [], "missing": 0}


PROFILE = {
    "n": 10,
    "features": [
        numeric("a", [0.0, 1.0, 2.0, 3.0]),
        numeric("b", [5.0, 5.0]),  # constant in the sample: one bin
        {"name": "c", "kind": "categorical", "categories": [3, 1, 2], "counts": [], "other": 0},
    ],
    "prediction": {"kind": "classification", "labels": ["0", "1", "2"], "counts": [4, 3, 3]},
}


# value of feature "a" -> its bin (edges 0, 1, 2, 3), or None for missing
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0.0, 0),  # first edge: first bin
        (0.5, 0),
        (1.0, 1),  # an inner edge opens the next bin (e_i <= v < e_(i+1))
        (2.999, 2),
        (3.0, 2),  # the last edge is in the last bin (closed)
        (-7.0, 0),  # below the reference range: first bin
        (1e9, 2),  # above: last bin
        (float("-inf"), 0),
        (float("inf"), 2),
        (NAN, None),
    ],
)
def test_numeric_binning_table(value: float, expected: int | None) -> None:
    binner = FeatureBinner.from_profile(PROFILE)
    x = np.array([[value, 5.0, 3.0]], dtype=np.float32)
    binned = binner.bin_rows(x)
    a = binned.per_feature()[0]
    if expected is None:
        assert a.tolist() == [0, 0, 0]
        assert binned.missing[0] == 1
    else:
        assert a.tolist() == [int(i == expected) for i in range(3)]
        assert binned.missing[0] == 0
    assert binned.other[0] == 0


@pytest.mark.parametrize(("value", "expected"), [(4.0, 0), (5.0, 0), (6.0, 0), (NAN, None)])
def test_single_bin_feature(value: float, expected: int | None) -> None:
    binned = FeatureBinner.from_profile(PROFILE).bin_rows(np.array([[0.0, value, 3.0]]))
    assert binned.per_feature()[1].tolist() == ([0] if expected is None else [1])
    assert binned.missing[1] == (1 if expected is None else 0)


@pytest.mark.parametrize(
    ("value", "counts", "other", "missing"),
    [
        (3.0, [1, 0, 0], 0, 0),  # categories keep the profile's order, not sorted
        (1.0, [0, 1, 0], 0, 0),
        (2.0, [0, 0, 1], 0, 0),
        (7.0, [0, 0, 0], 1, 0),
        (1.5, [0, 0, 0], 1, 0),
        (NAN, [0, 0, 0], 0, 1),
    ],
)
def test_categorical_codes(value: float, counts: list[int], other: int, missing: int) -> None:
    binned = FeatureBinner.from_profile(PROFILE).bin_rows(np.array([[0.0, 5.0, value]]))
    assert binned.per_feature()[2].tolist() == counts
    assert (binned.other[2], binned.missing[2]) == (other, missing)


def test_categorical_text_values() -> None:
    profile = {"features": [{"name": "colour", "kind": "categorical", "categories": ["red", "blue"]}]}
    binner = FeatureBinner.from_profile(profile)
    x = np.array([["red"], ["blue"], ["red"], ["green"], [""]], dtype=object)
    binned = binner.bin_rows(x)
    assert binned.counts.tolist() == [2, 1]
    assert (binned.other[0], binned.missing[0]) == (1, 1)
    with_none = np.array([["blue"], [None], [b"red"]], dtype=object)
    binned = binner.bin_rows(with_none)
    assert binned.counts.tolist() == [1, 1]
    assert binned.missing[0] == 1


def test_numeric_feature_without_reference_bins_counts_other() -> None:
    profile = {"features": [numeric("x", []), numeric("y", [0.0, 1.0])]}
    binned = FeatureBinner.from_profile(profile).bin_rows(np.array([[1.0, 0.5], [NAN, 0.5], [2.0, NAN]]))
    assert binned.per_feature()[0].tolist() == []
    assert binned.other.tolist() == [2, 0]
    assert binned.missing.tolist() == [1, 1]
    assert binned.counts.tolist() == [2]


def test_bad_profiles_and_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="not the inputs"):
        FeatureBinner.from_profile(PROFILE, ("a", "b", "z"))
    FeatureBinner.from_profile(PROFILE, ("a", "b", "c"))
    with pytest.raises(ValueError, match="unsorted"):
        FeatureBinner.from_profile({"features": [numeric("x", [2.0, 1.0])]})
    with pytest.raises(ValueError, match="unknown kind"):
        FeatureBinner.from_profile({"features": [{"name": "x", "kind": "text"}]})
    with pytest.raises(ValueError, match="3 features"):
        FeatureBinner.from_profile(PROFILE).bin_rows(np.zeros((4, 2)))


def test_binning_matches_the_profile_builder_on_a_large_batch() -> None:
    """The agent's vectorised binning equals hub.packager.profile.bin_counts, column by column."""
    rng = np.random.default_rng(7)
    reference = rng.normal(size=(500, 6)).astype(np.float32)
    reference[:, 3] = np.round(reference[:, 3])  # ties: deduplicated edges
    reference[rng.random(reference.shape) < 0.05] = np.nan
    names = tuple(f"f{i}" for i in range(6))
    prof = hub_profile.reference_profile(reference, names, {"kind": "classification"})
    # the reference counts itself exactly
    binned = FeatureBinner.from_profile(prof, names).bin_rows(reference)
    for f, feature in enumerate(prof["features"]):
        assert binned.per_feature()[f].tolist() == feature["counts"]
        assert binned.missing[f] == feature["missing"]
    # and live data, shifted and wider than the reference, the same way as the builder would
    live = (rng.normal(size=(20_000, 6)) * 2 + 0.5).astype(np.float32)
    live[rng.random(live.shape) < 0.1] = np.nan
    binned = FeatureBinner.from_profile(prof, names).bin_rows(live)
    for f, feature in enumerate(prof["features"]):
        edges = feature["bin_edges"]
        assert binned.per_feature()[f].tolist() == hub_profile.bin_counts(edges, live[:, f])
        assert binned.missing[f] == int(np.isnan(live[:, f]).sum())


@pytest.mark.parametrize("n_bins", [1, 3, 10, 25, 26, 60])
def test_both_ways_of_binning_match_the_profile_builder(n_bins: int) -> None:
    """Up to MAX_COMPARED_EDGES interior edges the agent compares values with every edge, beyond it
    searches them (25 bins have 24 interior edges, 26 have 25). Either way the counts are the
    builder's: values exactly on edges, duplicate edges, features with different numbers of
    edges, out of range, infinite and missing values included."""
    assert MAX_COMPARED_EDGES == 24
    rng = np.random.default_rng(n_bins)
    features, reference = [], []
    for f in range(5):
        sample = rng.normal(size=400) * (f + 1)
        if f == 1:
            sample = np.round(sample)  # ties: fewer, deduplicated edges
        edges = hub_profile.bin_edges(sample, max(1, n_bins - 2 * f))
        if f == 2:
            edges = sorted([*edges, edges[len(edges) // 2]])  # a duplicate edge (hand-written profile)
        features.append(numeric(f"f{f}", edges))
        reference.append(edges)
    binner = FeatureBinner.from_profile({"features": features})
    live = rng.normal(size=(3000, 5)) * 3
    for f, edges in enumerate(reference):
        live[: len(edges), f] = edges  # every edge itself
    live[rng.random(live.shape) < 0.05] = np.nan
    live[rng.random(live.shape) < 0.01] = np.inf
    live[rng.random(live.shape) < 0.01] = -np.inf
    binned = binner.bin_rows(live)
    for f, edges in enumerate(reference):
        assert binned.per_feature()[f].tolist() == hub_profile.bin_counts(edges, live[:, f])
        assert binned.missing[f] == int(np.isnan(live[:, f]).sum())


def summary(clock: Clock, **kw: object) -> WindowSummary:
    args: dict[str, object] = {
        "model": "wine",
        "version": 3,
        "profile": PROFILE,
        "labels": ("0", "1", "2"),
        "task": "classification",
        "window_requests": 100,
        "clock": clock,
    }
    args.update(kw)
    return WindowSummary(**args)  # type: ignore[arg-type]


def rows(n: int) -> np.ndarray:
    return np.tile(np.array([[0.5, 5.0, 1.0]], dtype=np.float32), (n, 1))


def test_classification_counts_from_label_or_probabilities() -> None:
    clock = Clock()
    s = summary(clock)
    s.observe(rows(4), {"label": np.array([0, 2, 2, 9]), "probabilities": np.zeros((4, 3))}, 0.001, True)
    probs = np.array([[0.1, 0.8, 0.1], [0.7, 0.2, 0.1]], dtype=np.float32)
    s.observe(rows(2), {"probabilities": probs}, 0.002, True)
    s.observe(rows(1), {}, 0.002, True)  # no prediction output: missing
    w = s.close(clock.t + 1)
    assert w["prediction"] == {
        "kind": "classification",
        "labels": ["0", "1", "2"],
        "counts": [2, 1, 2],
        "other": 1,  # label 9 is not a class
        "missing": 1,
    }
    assert w["rows"] == 7


def test_classification_text_labels() -> None:
    clock = Clock()
    prof = {"features": [], "prediction": {"kind": "classification", "labels": ["setosa", "virginica"]}}
    s = WindowSummary("iris", 1, prof, ("setosa", "virginica"), "classification", 10, clock=clock)
    s.observe(None, {"label": np.array([b"virginica", b"setosa", b"virginica"], dtype=object)}, 0.0, True)
    s.observe(None, {"label": np.array(["virginica", "nope"])}, 0.0, True)
    assert s.close(clock.t)["prediction"]["counts"] == [1, 3]


def test_regression_counts_in_the_profile_prediction_bins() -> None:
    clock = Clock()
    prof = {
        "features": [numeric("x", [0.0, 1.0])],
        "prediction": {"kind": "regression", "bin_edges": [10.0, 20.0, 30.0], "counts": [1, 1], "missing": 0},
    }
    s = WindowSummary("house", 2, prof, (), "regression", None, 60.0, clock)
    preds = np.array([[5.0], [10.0], [19.9], [20.0], [30.0], [99.0], [NAN]], dtype=np.float32)
    s.observe(np.zeros((7, 1)), {"prediction": preds}, 0.01, True)
    w = s.close(clock.t + 1)
    assert w["prediction"] == {"kind": "regression", "counts": [3, 3], "other": 0, "missing": 1}
    assert w["features"][0]["counts"] == [7]


def test_task_other_has_no_prediction_and_an_empty_profile_no_features() -> None:
    clock = Clock()
    s = WindowSummary("m", 1, {}, (), "other", 5, clock=clock)
    s.observe(np.zeros((3, 8)), {"y": np.zeros(3)}, 0.0, True)
    w = s.close(clock.t)
    assert w["prediction"] is None
    assert w["features"] == []
    assert w["rows"] == 3


def test_observe_counts_requests_errors_latency_and_features() -> None:
    clock = Clock()
    s = summary(clock)
    x = np.array([[0.5, 5.0, 3.0], [2.5, NAN, 2.0], [NAN, 5.0, 9.0]], dtype=np.float32)
    s.observe(x, {"label": np.array([0, 1, 1])}, 0.0003, True)
    s.observe(np.zeros((1, 99)), None, 7.0, False)  # a failed request: malformed inputs are not binned
    s.observe(x[:1], {"label": np.array([0])}, 0.0001, True)  # exactly on a bound: counted in it
    w = s.close(clock.t + 5)
    assert (w["requests"], w["errors"], w["rows"]) == (3, 1, 4)
    lat = w["latency"]
    assert lat["bounds"] == list(LATENCY_BUCKETS)
    expected = [0] * (len(LATENCY_BUCKETS) + 1)
    expected[0] += 1  # 0.0001 <= 0.0001
    expected[LATENCY_BUCKETS.index(0.0005)] += 1  # 0.00025 < 0.0003 <= 0.0005
    expected[-1] += 1  # 7 s: above the last bound
    assert lat["counts"] == expected
    assert lat["sum_us"] == 300 + 7_000_000 + 100
    assert w["features"] == [
        {"name": "a", "kind": "numeric", "counts": [2, 0, 1], "missing": 1, "other": 0},
        {"name": "b", "kind": "numeric", "counts": [3], "missing": 1, "other": 0},
        {"name": "c", "kind": "categorical", "counts": [2, 0, 1], "missing": 0, "other": 1},
    ]
    for entry in [*w["features"], w["prediction"]]:
        assert sum(entry["counts"]) + entry["missing"] + entry["other"] == w["rows"]
    assert w["schema"] == SCHEMA
    assert (w["model"], w["version"], w["start"], w["end"], w["windows"]) == (
        "wine",
        3,
        clock.t,
        clock.t + 5,
        1,
    )
    assert json.loads(json.dumps(w)) == w  # JSON-ready: plain ints, floats, strings, lists


def test_window_closes_on_request_count() -> None:
    clock = Clock()
    s = summary(clock, window_requests=3)
    for _ in range(2):
        s.observe(rows(2), {"label": np.array([1, 1])}, 0.001, True)
    assert not s.due(clock.t + 1e6 / 1e3)
    s.observe(rows(2), {"label": np.array([1, 1])}, 0.001, False)
    assert s.due(clock.t)
    first = s.close(clock.t + 2)
    assert (first["requests"], first["errors"], first["rows"]) == (3, 1, 4)
    assert first["prediction"]["counts"] == [0, 4, 0]
    # the next window starts empty, where the last one ended
    assert not s.due(clock.t + 2)
    second = s.close(clock.t + 3)
    assert (second["start"], second["end"]) == (clock.t + 2, clock.t + 3)
    assert (second["requests"], second["rows"], second["prediction"]["counts"]) == (0, 0, [0, 0, 0])
    assert all(sum(f["counts"]) == 0 for f in second["features"])


def test_window_closes_on_time() -> None:
    clock = Clock()
    s = summary(clock, window_requests=None, window_seconds=60.0)
    s.observe(rows(1), {"label": np.array([2])}, 0.001, True)
    assert not s.due(clock.t + 59.9)
    assert s.due(clock.t + 60.0)
    w = s.close(clock.t + 60.5)
    assert not s.due(clock.t + 61.0)
    assert s.due(clock.t + 120.5)
    assert w["requests"] == 1


def test_window_closes_on_whichever_comes_first() -> None:
    clock = Clock()
    s = summary(clock, window_requests=2, window_seconds=10.0)
    s.observe(rows(1), None, 0.001, True)
    assert not s.due(clock.t + 1)
    assert s.due(clock.t + 10)
    s.observe(rows(1), None, 0.001, True)
    assert s.due(clock.t + 1)


def test_window_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="needs"):
        summary(Clock(), window_requests=None)
    with pytest.raises(ValueError, match=">= 1"):
        summary(Clock(), window_requests=0)


def test_merge_of_two_devices() -> None:
    c1, c2 = Clock(100.0), Clock(90.0)
    a, b = summary(c1), summary(c2)
    a.observe(rows(2), {"label": np.array([0, 1])}, 0.001, True)
    b.observe(rows(3), {"label": np.array([2, 2, 2])}, 0.2, True)
    b.observe(None, None, 0.2, False)
    wa, wb = a.close(150.0), b.close(140.0)
    total = merge(wa, wb)
    assert (total["start"], total["end"], total["windows"]) == (90.0, 150.0, 2)
    assert (total["requests"], total["errors"], total["rows"]) == (3, 1, 5)
    assert total["prediction"]["counts"] == [1, 1, 3]
    assert total["features"][0]["counts"] == [5, 0, 0]
    assert sum(total["latency"]["counts"]) == 3
    assert wa["requests"] == 1  # arguments unchanged
    with pytest.raises(ValueError, match="version"):
        merge(wa, {**wb, "version": 4})
    with pytest.raises(ValueError, match="prediction"):
        merge(wa, {**wb, "prediction": {**wb["prediction"], "labels": ["a", "b", "c"]}})


counts3 = st.lists(st.integers(0, 10**6), min_size=3, max_size=3)


@st.composite
def windows(draw: st.DrawFn) -> dict[str, object]:
    def entry(extra: dict[str, object]) -> dict[str, object]:
        return {
            **extra,
            "counts": draw(counts3),
            "missing": draw(st.integers(0, 99)),
            "other": draw(st.integers(0, 99)),
        }

    start = draw(st.floats(0, 1e9, allow_nan=False))
    return {
        "schema": SCHEMA,
        "model": "wine",
        "version": 3,
        "start": start,
        "end": start + draw(st.floats(0, 1e6, allow_nan=False)),
        "windows": 1,
        "requests": draw(st.integers(0, 10**6)),
        "errors": draw(st.integers(0, 10**3)),
        "rows": draw(st.integers(0, 10**7)),
        "latency": {
            "bounds": list(LATENCY_BUCKETS),
            "counts": draw(st.lists(st.integers(0, 1000), min_size=15, max_size=15)),
            "sum_us": draw(st.integers(0, 10**12)),
        },
        "features": [entry({"name": "a", "kind": "numeric"}), entry({"name": "c", "kind": "categorical"})],
        "prediction": entry({"kind": "classification", "labels": ["0", "1", "2"]}),
    }


@settings(max_examples=150, deadline=None)
@given(windows(), windows(), windows())
def test_merge_is_associative_and_commutative(
    a: dict[str, object], b: dict[str, object], c: dict[str, object]
) -> None:
    assert merge(a, b) == merge(b, a)
    assert merge(merge(a, b), c) == merge(a, merge(b, c))
    assert merge(merge(a, b), c)["windows"] == 3


def test_merging_consecutive_windows_equals_one_long_window() -> None:
    rng = np.random.default_rng(1)
    batches = [rng.normal(1.5, 1.5, size=(int(rng.integers(1, 64)), 3)).astype(np.float32) for _ in range(30)]
    labels: list[np.ndarray] = [np.asarray(rng.integers(0, 3, size=b.shape[0])) for b in batches]
    lat = rng.uniform(0, 0.3, size=30)
    clock = Clock(0.0)
    long = summary(clock, window_requests=1000)
    short = summary(Clock(0.0), window_requests=7)
    merged = None
    for i, (x, y) in enumerate(zip(batches, labels, strict=True)):
        long.observe(x, {"label": y}, float(lat[i]), True)
        short.observe(x, {"label": y}, float(lat[i]), True)
        if short.due(float(i)):
            w = short.close(float(i))
            merged = w if merged is None else merge(merged, w)
    assert merged is not None
    merged = merge(merged, short.close(30.0))
    whole = long.close(30.0)
    assert merged["windows"] == 5
    assert {**merged, "windows": 1} == whole


def test_the_summary_module_imports_no_hub_sklearn_or_scipy() -> None:
    import subprocess
    import sys

    code = (
        "import sys, agent.monitor.summary; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'hub', 'sklearn', 'scipy'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
