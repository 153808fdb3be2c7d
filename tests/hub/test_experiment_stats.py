"""hub.experiments.stats: the two-proportion z-test, Wilson intervals and verdicts, against numbers
worked by hand and against scipy (the hub itself computes the normal tail with math.erfc)."""

from __future__ import annotations

import math

import pytest
from scipy import stats as sps

from hub.experiments import stats
from hub.experiments.stats import BETTER, NOT_ENOUGH, SAME, WORSE, Thresholds


def test_two_proportion_test_by_hand() -> None:
    # candidate 80/100 correct, stable 90/100. pooled p = 170/200 = 0.85;
    # pooled SE = sqrt(0.85 * 0.15 * (1/100 + 1/100)) = sqrt(0.00255) = 0.0504975;
    # z = -0.10 / 0.0504975 = -1.98030; two-sided p = 0.04767.
    # unpooled SE = sqrt(0.8 * 0.2 / 100 + 0.9 * 0.1 / 100) = sqrt(0.0025) = 0.05;
    # 95% CI of the difference = -0.10 +- 1.959964 * 0.05 = (-0.198, -0.002).
    t = stats.two_proportion_test(80, 100, 90, 100)
    assert t.difference == pytest.approx(-0.10)
    assert t.z == pytest.approx(-1.98030, abs=1e-5)
    assert t.p_value == pytest.approx(0.04767, abs=1e-5)
    assert t.ci == pytest.approx((-0.197998, -0.002002), abs=1e-6)


@pytest.mark.parametrize(
    ("k1", "n1", "k2", "n2"),
    [(80, 100, 90, 100), (455, 500, 470, 520), (3, 1000, 12, 1100), (1, 7, 6, 9), (500, 500, 498, 500)],
    ids=["by-hand", "close", "rare-errors", "tiny", "near-one"],
)
def test_two_proportion_test_matches_scipy(k1: int, n1: int, k2: int, n2: int) -> None:
    t = stats.two_proportion_test(k1, n1, k2, n2)
    p1, p2 = k1 / n1, k2 / n2
    pooled = (k1 + k2) / (n1 + n2)
    z = (p1 - p2) / math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    assert t.z == pytest.approx(z)
    assert t.p_value == pytest.approx(2 * sps.norm.sf(abs(z)), rel=1e-9)
    half = sps.norm.ppf(0.975) * math.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2)
    assert t.ci == pytest.approx((p1 - p2 - half, p1 - p2 + half), rel=1e-9)


def test_identical_all_or_nothing_arms_are_no_difference() -> None:
    t = stats.two_proportion_test(0, 600, 0, 900)
    assert (t.z, t.p_value, t.ci) == (0.0, 1.0, (0.0, 0.0))


def test_normal_quantile_matches_scipy() -> None:
    for p in (0.5, 0.9, 0.975, 0.995, 0.001):
        assert stats.normal_quantile(p) == pytest.approx(sps.norm.ppf(p), abs=1e-9)
    assert stats.normal_quantile(0.975) == pytest.approx(1.959964, abs=1e-6)


@pytest.mark.parametrize(("k", "n"), [(90, 100), (0, 50), (50, 50), (1, 3), (731, 1000)])
def test_wilson_interval_matches_scipy(k: int, n: int) -> None:
    expected = sps.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert stats.wilson_interval(k, n) == pytest.approx((expected.low, expected.high), abs=1e-9)


def test_wilson_interval_by_hand() -> None:
    # 90 of 100, z = 1.959964, z^2 = 3.841459: centre (0.9 + z^2/200) / (1 + z^2/100) = 0.885202,
    # half z * sqrt(0.0009 + z^2/40000) / (1 + z^2/100) = 0.059568 -> (0.825634, 0.944771)
    assert stats.wilson_interval(90, 100) == pytest.approx((0.825634, 0.944771), abs=1e-6)
    assert stats.wilson_interval(0, 0) is None
    with pytest.raises(ValueError):
        stats.wilson_interval(5, 4)


def _arm(requests: int, errors: int, labelled: int, correct: int) -> dict[str, int]:
    return {"requests": requests, "errors": errors, "labelled": labelled, "correct": correct}


@pytest.mark.parametrize(
    ("candidate", "stable", "verdict", "accuracy", "errors"),
    [
        (_arm(1000, 5, 400, 300), _arm(1000, 5, 400, 360), WORSE, WORSE, SAME),
        (_arm(1000, 5, 400, 360), _arm(1000, 5, 400, 300), BETTER, BETTER, SAME),
        (_arm(1000, 5, 400, 360), _arm(1000, 5, 400, 360), SAME, SAME, SAME),
        (_arm(1000, 60, 400, 360), _arm(1000, 5, 400, 360), WORSE, SAME, WORSE),
        (_arm(1000, 5, 400, 300), _arm(1000, 30, 400, 360), WORSE, WORSE, BETTER),  # worse wins
        (_arm(100, 1, 50, 20), _arm(100, 1, 50, 45), NOT_ENOUGH, NOT_ENOUGH, NOT_ENOUGH),
        (_arm(1000, 5, 0, 0), _arm(1000, 5, 0, 0), SAME, NOT_ENOUGH, SAME),  # no labels at all
        (_arm(1000, 5, 60, 50), _arm(1000, 5, 400, 300), NOT_ENOUGH, NOT_ENOUGH, SAME),
        (_arm(0, 0, 0, 0), _arm(0, 0, 0, 0), NOT_ENOUGH, NOT_ENOUGH, NOT_ENOUGH),
    ],
    ids=["acc-worse", "acc-better", "equal", "errors-worse", "mixed", "too-few", "no-labels",
         "labels-below-min", "nothing"],
)  # fmt: skip
def test_verdicts(
    candidate: dict[str, int], stable: dict[str, int], verdict: str, accuracy: str, errors: str
) -> None:
    result = stats.verdict({"candidate": candidate, "stable": stable}, Thresholds())
    assert result["verdict"] == verdict
    assert [t["verdict"] for t in result["tests"]] == [accuracy, errors]


def test_below_the_minimum_the_figures_are_shown_without_a_verdict() -> None:
    test = stats.compare("accuracy", (20, 50), (45, 50), higher_is_better=True, min_n=100)
    assert test["verdict"] == NOT_ENOUGH and test["why"] == "50 of the 100 per arm needed"
    assert test["p_value"] is not None and test["p_value"] < 0.05  # would be significant, yet no verdict


def test_agreement_rate_with_its_interval() -> None:
    a = stats.agreement(400, 380, Thresholds(min_compared=100))
    assert a["rate"] == 0.95 and a["enough"]
    assert a["ci"] == pytest.approx(list(stats.wilson_interval(380, 400)))
    assert stats.agreement(0, 0)["rate"] is None and not stats.agreement(0, 0)["enough"]


@pytest.mark.parametrize("bad", [{"alpha": 0.0}, {"alpha": 1.0}, {"min_labelled": 0}, {"min_requests": -1}])
def test_thresholds_are_checked(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Thresholds(**bad)  # type: ignore[arg-type]
