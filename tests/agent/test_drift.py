"""Drift statistics (agent/monitor/drift.py): special functions against scipy, the tests against the
numbers in ../shared/docs/references.md (Drift), and seeded simulations of power and false alarms.

scipy is a test-only comparison here; the agent itself must not import it.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from agent.monitor import (
    DriftDetector,
    binned_ks,
    bridge_max_sf,
    chi2_sf,
    chi_square,
    correct,
    kolmogorov_sf,
    ks_p_value,
    merge_sparse_bins,
    psi,
)
from hub.packager.profile import bin_counts, bin_edges

stats = pytest.importorskip("scipy.stats")

N_REF, M_WIN = 1000, 500


def _reference(rng: np.random.Generator, n: int = N_REF) -> tuple[list[float], list[int]]:
    """A reference profile's numeric feature, binned as the packager does (deciles of the sample)."""
    values = rng.standard_normal(n)
    edges = bin_edges(values)
    return edges, bin_counts(edges, values)


def _window(rng: np.random.Generator, edges: list[float], shift: float, m: int = M_WIN) -> list[int]:
    return bin_counts(edges, rng.standard_normal(m) + shift)


# --- special functions ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("x", "dof", "table"),
    [
        pytest.param(3.841, 1, 0.05, id="1dof-5pct"),
        pytest.param(6.635, 1, 0.01, id="1dof-1pct"),
        pytest.param(5.991, 2, 0.05, id="2dof-5pct"),
        pytest.param(16.919, 9, 0.05, id="9dof-5pct"),
        pytest.param(21.666, 9, 0.01, id="9dof-1pct"),
        pytest.param(43.773, 30, 0.05, id="30dof-5pct"),
        pytest.param(124.342, 100, 0.05, id="100dof-5pct"),
    ],
)
def test_chi2_sf_matches_printed_tables(x: float, dof: int, table: float) -> None:
    assert chi2_sf(x, dof) == pytest.approx(table, abs=5e-5)


@pytest.mark.parametrize(
    ("x", "dof"),
    [
        pytest.param(x, d, id=f"x{x}-dof{d}")
        for x, d in [
            (1e-6, 1),
            (0.1, 2),
            (0.5, 1),
            (1.0, 1),
            (4.0, 3),
            (9.0, 9),
            (17.0, 9),
            (25.0, 4),
            (60.0, 30),
            (100.0, 9),
            (250.0, 200),
            (1000.0, 3),
            (1e-3, 50),
        ]
    ],
)
def test_chi2_sf_matches_scipy(x: float, dof: int) -> None:
    expected = float(stats.chi2.sf(x, dof))
    assert chi2_sf(x, dof) == pytest.approx(expected, rel=1e-10, abs=1e-300)


@pytest.mark.parametrize(
    ("x", "dof", "expected"),
    [
        pytest.param(0.0, 3, 1.0, id="zero"),
        pytest.param(-1.0, 3, 1.0, id="negative"),
        pytest.param(1.0, 0, 0.0, id="dof0-positive"),
        pytest.param(0.0, 0, 1.0, id="dof0-zero"),
        pytest.param(math.inf, 4, 0.0, id="inf"),
    ],
)
def test_chi2_sf_edges(x: float, dof: int, expected: float) -> None:
    assert chi2_sf(x, dof) == expected


@pytest.mark.parametrize("lam", [0.05, 0.3, 0.5, 0.8, 0.99, 1.0, 1.01, 1.2, 1.358, 1.628, 2.0, 3.0, 5.0])
def test_kolmogorov_sf_matches_scipy(lam: float) -> None:
    assert kolmogorov_sf(lam) == pytest.approx(float(stats.kstwobign.sf(lam)), rel=1e-10, abs=1e-15)


@pytest.mark.parametrize(
    ("lam", "expected"),
    [
        pytest.param(1.358, 0.05, id="5pct"),
        pytest.param(1.628, 0.01, id="1pct"),
        pytest.param(1.224, 0.10, id="10pct"),
    ],
)
def test_kolmogorov_sf_known_quantiles(lam: float, expected: float) -> None:
    assert kolmogorov_sf(lam) == pytest.approx(expected, abs=5e-4)


def test_ks_critical_d_for_1000_vs_500() -> None:
    """references.md: D_crit = 1.358 * sqrt((n + m)/(n m)) = 0.074 at alpha 0.05, n = 1000, m = 500."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ks_p_value(mid, N_REF, M_WIN) > 0.05 else (lo, mid)
    assert hi == pytest.approx(0.074, abs=0.001)
    assert hi == pytest.approx(1.358 * math.sqrt((N_REF + M_WIN) / (N_REF * M_WIN)), rel=0.01)


# --- PSI -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reference", "observed", "expected"),
    [
        pytest.param([100] * 10, [50] * 10, 0.0, id="identical-proportions"),
        pytest.param([10, 20, 30], [10, 20, 30], 0.0, id="identical-counts"),
        # (0.5-0.25)ln(0.5/0.25) + (0.5-0.75)ln(0.5/0.75)
        pytest.param([25, 75], [50, 50], 0.25 * math.log(2) - 0.25 * math.log(2 / 3), id="two-bins"),
        pytest.param([0, 0], [5, 5], 0.0, id="empty-reference"),
        pytest.param([5, 5], [0, 0], 0.0, id="empty-window"),
    ],
)
def test_psi_values(reference: list[int], observed: list[int], expected: float) -> None:
    assert psi(reference, observed) == pytest.approx(expected, abs=1e-12)


def test_psi_empty_bin_is_finite_through_the_floor() -> None:
    # 10% of the window in a bin the reference never saw: about 0.1 * ln(0.1 / 1e-4) = 0.69
    value = psi([0, 50, 50], [10, 45, 45])
    assert math.isfinite(value)
    assert 0.6 < value < 0.9
    assert psi([0, 50, 50], [10, 45, 45], eps=1e-2) < value


def test_psi_rejects_mismatched_bins() -> None:
    with pytest.raises(ValueError, match="mismatch"):
        psi([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="non-negative"):
        psi([1, -2], [1, 2])


def test_psi_simulated_noise_floor_and_shift() -> None:
    """No drift: PSI averages about (B - 1)(1/n + 1/m) = 0.027; a 0.4 sigma shift passes 0.1."""
    rng = np.random.default_rng(11)
    null, shifted = [], []
    for _ in range(150):
        edges, ref = _reference(rng)
        null.append(psi(ref, _window(rng, edges, 0.0)))
        shifted.append(psi(ref, _window(rng, edges, 0.4)))
    assert float(np.mean(null)) == pytest.approx(9 * (1 / N_REF + 1 / M_WIN), rel=0.3)
    assert float(np.mean(shifted)) > 0.1
    assert float(np.mean(np.asarray(shifted) > 0.1)) > 0.8


# --- binned KS ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reference", "observed", "d"),
    [
        pytest.param([100] * 10, [50] * 10, 0.0, id="identical"),
        pytest.param([50, 50], [100, 0], 0.5, id="all-in-first-bin"),
        pytest.param([10, 0, 0], [0, 0, 10], 1.0, id="disjoint"),
        pytest.param([25, 25, 25, 25], [10, 20, 30, 40], 0.2, id="gradual"),
    ],
)
def test_binned_ks_d(reference: list[int], observed: list[int], d: float) -> None:
    got_d, p = binned_ks(reference, observed)
    assert got_d == pytest.approx(d)
    assert 0.0 <= p <= 1.0
    if d == 0.0:
        assert p == 1.0


def test_binned_ks_empty_is_no_evidence() -> None:
    assert binned_ks([0, 0, 0], [1, 2, 3]) == (0.0, 1.0)


@pytest.mark.parametrize(("x", "t"), [(0.5, 0.5), (0.8, 0.5), (0.6, 0.2), (1.1, 0.9)])
def test_bridge_max_at_one_point_is_the_normal_tail(x: float, t: float) -> None:
    # B(t) ~ N(0, t (1 - t)): P(|B(t)| >= x) = 2 (1 - Phi(x / sqrt(t (1 - t)))).
    expected = 2.0 * stats.norm.sf(x / math.sqrt(t * (1.0 - t)))
    assert bridge_max_sf(x, [t]) == pytest.approx(expected, abs=2e-4)


@pytest.mark.parametrize("x", [0.8, 1.0, 1.36])
def test_bridge_max_at_many_points_approaches_the_kolmogorov_tail(x: float) -> None:
    # Over ever more points the maximum of |B| tends to its supremum over (0, 1).
    p = bridge_max_sf(x, np.linspace(0.0025, 0.9975, 399))
    assert p <= kolmogorov_sf(x)
    assert p == pytest.approx(kolmogorov_sf(x), rel=0.2)  # a grid of points converges slowly


def test_bridge_max_at_decile_edges_matches_a_simulation() -> None:
    rng = np.random.default_rng(5)
    t = np.linspace(0.1, 0.9, 9)
    w = np.cumsum(
        rng.standard_normal((200_000, 10)) * np.sqrt(np.diff(np.concatenate(([0.0], t, [1.0])))), axis=1
    )
    maxima = np.max(np.abs(w[:, :-1] - t * w[:, -1:]), axis=1)
    for x in (0.8, 1.0, 1.2, 1.5):
        simulated = float(np.mean(maxima >= x))
        se = math.sqrt(simulated * (1 - simulated) / maxima.size)
        assert bridge_max_sf(x, t) == pytest.approx(simulated, abs=4 * se + 1e-4)


@pytest.mark.parametrize("step", [1e-5, 1e-6, 1e-7, 1e-9], ids=["1e-5", "1e-6", "1e-7", "1e-9"])
@pytest.mark.parametrize("x", [0.8, 1.0, 1.36])
def test_bridge_max_with_a_tiny_step_is_the_max_without_it(x: float, step: float) -> None:
    """Two points a tiny step apart (a bin of a few rows in a profile of millions): the bridge
    barely moves between them. Before, a step finer than the grid inflated the density and p fell
    to 0 (a false alarm in every window)."""
    assert bridge_max_sf(x, [0.3, 0.3 + step, 0.6]) == pytest.approx(bridge_max_sf(x, [0.3, 0.6]), abs=1e-3)
    assert bridge_max_sf(x, [step, 0.5, 1.0 - step]) == pytest.approx(bridge_max_sf(x, [0.5]), abs=1e-3)


def test_binned_ks_keeps_its_false_alarm_rate_with_a_nearly_empty_reference_bin() -> None:
    reference = np.array([1_000_000] * 5 + [1] + [1_000_000] * 5, dtype=np.float64)
    rng = np.random.default_rng(1)
    windows = rng.multinomial(1000, reference / reference.sum(), size=200)
    alarms = sum(binned_ks(reference, w)[1] < 0.05 for w in windows)
    assert alarms / len(windows) < 0.08  # alpha 0.05; it was 0.34


def test_bridge_max_degenerate_cases() -> None:
    points = [0.1, 0.3, 0.5, 0.7, 0.9]
    assert bridge_max_sf(1.0, points) == bridge_max_sf(1.0, list(reversed(points)))
    assert bridge_max_sf(1.0, []) == 1.0 and bridge_max_sf(1.0, [0.0, 1.0]) == 1.0
    assert bridge_max_sf(0.0, points) == 1.0


def test_binned_ks_is_below_the_kolmogorov_tail_and_never_above_it() -> None:
    # The maximum over 9 edges is smaller than the supremum: the same D is rarer, p smaller.
    rng = np.random.default_rng(11)
    edges, ref = _reference(rng)
    for shift in (0.1, 0.15, 0.2):
        obs = _window(rng, edges, shift)
        d, p = binned_ks(ref, obs)
        assert p <= ks_p_value(d, sum(ref), sum(obs)) + 1e-12


def test_binned_ks_power_and_size_on_decile_bins() -> None:
    """references.md: about 95% power at a 0.23 sigma mean shift for n = 1000, m = 500, alpha 0.05 (raw data).
    On decile bins, seeded: the false-alarm rate is alpha's (the Kolmogorov tail alone gave about 0.02)
    and the power near the raw-data test's."""
    rng = np.random.default_rng(2024)
    trials = 400
    hits = false_pos = 0
    for _ in range(trials):
        edges, ref = _reference(rng)
        hits += binned_ks(ref, _window(rng, edges, 0.23))[1] < 0.05
        false_pos += binned_ks(ref, _window(rng, edges, 0.0))[1] < 0.05
    assert hits / trials >= 0.9
    assert 0.025 <= false_pos / trials <= 0.08


# --- chi-square -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reference", "observed"),
    [
        pytest.param([30, 50, 20], [20, 60, 20], id="three-categories"),
        pytest.param([100] * 10, [40, 60, 50, 50, 45, 55, 50, 50, 48, 52], id="ten-bins"),
        pytest.param([300, 200, 500], [100, 150, 250], id="unequal-totals"),
        pytest.param([500, 500], [200, 300], id="two-bins"),
    ],
)
def test_chi_square_matches_scipy_contingency(reference: list[int], observed: list[int]) -> None:
    stat, dof, p = chi_square(reference, observed)
    expected = stats.chi2_contingency(np.array([reference, observed]), correction=False)
    assert stat == pytest.approx(expected.statistic, rel=1e-10)
    assert dof == expected.dof
    assert p == pytest.approx(expected.pvalue, rel=1e-8)


@pytest.mark.parametrize(
    ("reference", "observed", "merged_ref", "merged_obs"),
    [
        pytest.param([100, 100], [50, 50], [100, 100], [50, 50], id="nothing-sparse"),
        # expected in the smaller row = (r + o) * 50/150: bins of 3 + 1 need merging
        pytest.param([3, 97, 3, 97], [1, 49, 1, 49], [100, 100], [50, 50], id="sparse-merged-right"),
        pytest.param([97, 3, 0], [49, 0, 1], [100], [50], id="short-tail-into-last-group"),
        pytest.param([0, 100, 100], [5, 50, 50], [100, 100], [55, 50], id="new-category-merged"),
    ],
)
def test_merge_sparse_bins(
    reference: list[int], observed: list[int], merged_ref: list[int], merged_obs: list[int]
) -> None:
    ref, obs = merge_sparse_bins(reference, observed)
    assert ref.tolist() == merged_ref
    assert obs.tolist() == merged_obs
    assert ref.sum() == sum(reference) and obs.sum() == sum(observed)


def test_chi_square_never_infinite_and_degenerate_cases() -> None:
    # a category the reference never saw: its own group once (0 + 30) * 500/1500 >= 5
    stat, dof, p = chi_square([0, 500, 500], [30, 240, 230])
    assert math.isfinite(stat) and dof == 2 and p < 1e-6
    stat, dof, p = chi_square([0, 500, 500], [3, 250, 247])  # too few to test alone: merged
    assert math.isfinite(stat) and dof == 1 and p > 0.5
    assert chi_square([10, 0], [2, 1]) == (0.0, 0, 1.0)  # one merged group: nothing to test
    assert chi_square([0, 0], [2, 1]) == (0.0, 0, 1.0)


def test_chi_square_size_and_power_simulated() -> None:
    """The homogeneity test holds its size with a sampled reference (n = 1000, m = 500) and detects a
    moderate change in category shares."""
    rng = np.random.default_rng(7)
    shares = np.array([0.4, 0.3, 0.2, 0.1])
    moved = np.array([0.32, 0.3, 0.25, 0.13])
    trials = 400
    false_pos = hits = 0
    for _ in range(trials):
        ref = rng.multinomial(N_REF, shares)
        false_pos += chi_square(ref, rng.multinomial(M_WIN, shares))[2] < 0.05
        hits += chi_square(ref, rng.multinomial(M_WIN, moved))[2] < 0.05
    assert false_pos / trials == pytest.approx(0.05, abs=0.03)
    assert hits / trials > 0.7


# --- multiple testing -----------------------------------------------------------------------------------

CRAFTED = [0.001, 0.008, 0.039, 0.041, 0.042, 0.06, 0.074, 0.205, 0.212, 0.216]


@pytest.mark.parametrize(
    ("p_values", "method", "expected"),
    [
        # Bonferroni: alpha/m = 0.005 -> only 0.001
        pytest.param(CRAFTED, "bonferroni", [True] + [False] * 9, id="bonferroni-crafted"),
        # BH thresholds k * 0.005: 0.005, 0.010, 0.015, ... -> ranks 1 and 2 pass, 3 (0.039 > 0.015) fails;
        # no later rank passes (0.042 > 0.025 at k=5)
        pytest.param(CRAFTED, "bh", [True, True] + [False] * 8, id="bh-crafted"),
        # BH thresholds 0.01, 0.02, ..., 0.05: every rank just misses
        pytest.param([0.025, 0.012, 0.045, 0.031, 0.9], "bh", [False] * 5, id="bh-none-when-no-rank-passes"),
        # step-up: rank 4 passes (0.038 <= 0.04), so rank 3 is in although 0.035 > 0.03
        pytest.param(
            [0.004, 0.012, 0.035, 0.038, 0.9], "bh", [True, True, True, True, False], id="bh-step-up"
        ),
        pytest.param(
            [0.004, 0.012, 0.035, 0.038, 0.9],
            "bonferroni",
            [True, False, False, False, False],
            id="bonferroni-same-list",
        ),
        pytest.param([0.03, 0.04, 0.045], "bh", [True, True, True], id="bh-all-under-alpha"),
        pytest.param(
            [0.03, 0.04, 0.045], "bonferroni", [False, False, False], id="bonferroni-all-under-alpha"
        ),
        pytest.param([math.nan, 0.001], "bh", [False, True], id="nan-never-significant"),
        pytest.param([], "bh", [], id="empty"),
    ],
)
def test_correct(p_values: list[float], method: str, expected: list[bool]) -> None:
    assert correct(p_values, method, 0.05) == expected  # type: ignore[arg-type]


def test_correct_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="method"):
        correct([0.1], "holm")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="alpha"):
        correct([0.1], "bh", alpha=0.0)


def test_bh_is_never_less_powerful_than_bonferroni() -> None:
    rng = np.random.default_rng(5)
    for _ in range(200):
        p = (rng.uniform(size=20) ** 3).tolist()
        bh, bonf = correct(p, "bh"), correct(p, "bonferroni")
        assert all(b for b, f in zip(bh, bonf, strict=True) if f)


# --- persistence ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("windows", "alerts", "streaks"),
    [
        pytest.param([{"a": 1e-6}] * 3, [False, False, True], [1, 2, 3], id="three-in-a-row"),
        pytest.param(
            [{"a": 1e-6}, {"a": 1e-6}, {"a": 0.5}, {"a": 1e-6}],
            [False, False, False, False],
            [1, 2, 0, 1],
            id="broken-run",
        ),
        # drift hops between features: no single feature has 3 in a row
        pytest.param(
            [{"a": 1e-6, "b": 0.5}, {"a": 0.5, "b": 1e-6}, {"a": 1e-6, "b": 0.5}],
            [False, False, False],
            [1, 1, 1],
            id="hopping-is-per-feature",
        ),
        pytest.param(
            [{"a": 1e-6}, {"a": 1e-6}, {"b": 0.5}],
            [False, False, False],
            [1, 2, 0],
            id="missing-feature-resets",
        ),
        pytest.param([{"a": 1e-6}] * 4, [False, False, True, True], [1, 2, 3, 4], id="alert-is-a-level"),
    ],
)
def test_detector_persistence(
    windows: list[dict[str, float]], alerts: list[bool], streaks: list[int]
) -> None:
    detector = DriftDetector(alpha=0.05, k=3, method="bh")
    verdicts = [detector.update(w) for w in windows]
    assert [v.alert for v in verdicts] == alerts
    assert [v.streak for v in verdicts] == streaks


def test_detector_verdict_fields_and_psi_threshold() -> None:
    detector = DriftDetector(k=2, psi_threshold=0.25)
    v = detector.update({"a": 1e-6, "b": 0.4, "c": 0.9}, {"a": 0.3, "b": 0.01, "c": 0.5})
    assert v.drifted_features == ["a", "c"]
    assert v.feature_streaks == {"a": 1, "b": 0, "c": 1}
    v = detector.update({"a": 1e-6, "b": 0.4, "c": 0.9}, {"c": 0.01})
    assert v.alert and v.alerting_features == ["a"]
    # without a threshold PSI does not decide
    assert DriftDetector(k=1).update({"c": 0.9}, {"c": 5.0}).drifted_features == []
    with pytest.raises(ValueError, match="k"):
        DriftDetector(k=0)


def test_detector_reset() -> None:
    detector = DriftDetector(k=2)
    detector.update({"a": 1e-6})
    detector.reset()
    assert not detector.update({"a": 1e-6}).alert


def _simulate(shifts: dict[int, float], windows: int, seed: int, features: int = 20) -> list[bool]:
    rng = np.random.default_rng(seed)
    references = [_reference(rng) for _ in range(features)]
    detector = DriftDetector(alpha=0.05, k=3, method="bh")
    alerts = []
    for _ in range(windows):
        p_values = {}
        for i, (edges, ref) in enumerate(references):
            p_values[f"f{i}"] = binned_ks(ref, _window(rng, edges, shifts.get(i, 0.0)))[1]
        alerts.append(detector.update(p_values).alert)
    return alerts


def test_no_false_alarms_over_200_windows_without_drift() -> None:
    """20 features, 200 windows of 500 rows, BH at 0.05 and k = 3: no alert."""
    assert sum(_simulate({}, windows=200, seed=42)) == 0


def test_drift_in_one_feature_alerts_after_k_windows() -> None:
    """A 0.4 sigma shift in one of 20 features: an alert from the third window on (nearly always)."""
    alerts = _simulate({7: 0.4}, windows=10, seed=43)
    assert alerts[:2] == [False, False]
    assert sum(alerts[2:]) >= 7


def test_agent_monitor_imports_neither_scipy_nor_hub() -> None:
    code = (
        "import sys, agent.monitor\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('scipy', 'sklearn', 'hub')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_drift_test_leaves_numpy_ma_unloaded() -> None:
    """A closing window's drift test must not load numpy.ma (np.unique's masked-array check does):
    1.2 MB of RSS for the rest of the agent's life."""
    code = (
        "import sys\n"
        "from agent.monitor.drift import binned_ks\n"
        "binned_ks([40, 30, 20, 10], [10, 20, 30, 40])\n"
        "assert 'numpy.ma' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
