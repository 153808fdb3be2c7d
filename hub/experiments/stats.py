"""Comparing an experiment's two arms, pure: proportions, their intervals and tests, the verdict.

- `two_proportion_test`: the candidate's proportion against the stable's. The z statistic uses
  the pooled standard error (under the null hypothesis both arms share one proportion); the
  confidence interval of the difference (candidate - stable) uses the unpooled one (each arm its
  own proportion), as the textbook Wald interval does. The p-value is two-sided, from the
  normal tail `erfc(|z| / sqrt 2)` (no scipy in the hub).
- `wilson_interval`: the interval of one proportion (agreement with the stable version in
  shadow mode, each arm's accuracy); unlike the Wald interval it stays inside [0, 1] and keeps
  its coverage near 0 and 1, where accuracy and agreement rates usually sit.
- `compare`: one metric (accuracy: higher is better; error rate: lower is better) with a
  verdict: no verdict below `min_n` per arm ("not enough data"); otherwise "candidate better"
  or "candidate worse" when p < alpha, else "no significant difference".
- `overall`: "candidate worse" if a metric says so, else "candidate better" if one says so,
  "not enough data" while a metric that has data in both arms is below its minimum, else
  "no significant difference" (a metric without any data, such as accuracy when no app sends
  labels, does not hold the verdict back).

Each metric is tested at `alpha` on its own (two metrics: the chance of some false verdict is up
to about 2 alpha), and a verdict read repeatedly while data accrues is more often wrong than
alpha says (peeking): decide the sample size up front and read the verdict once it is reached.
In shadow mode both arms answer the same requests, so the samples are paired; the unpaired test
ignores that positive correlation and is conservative there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

DEFAULT_ALPHA = 0.05
DEFAULT_MIN_LABELLED = 100  # labelled predictions per arm before an accuracy verdict
DEFAULT_MIN_REQUESTS = 500  # requests per arm before an error-rate verdict
DEFAULT_MIN_COMPARED = 100  # shadow comparisons before the agreement rate counts as measured

BETTER, WORSE, SAME, NOT_ENOUGH = (
    "candidate better",
    "candidate worse",
    "no significant difference",
    "not enough data",
)


@dataclass(frozen=True)
class Thresholds:
    """When a verdict may be given, and at which level."""

    alpha: float = DEFAULT_ALPHA
    min_labelled: int = DEFAULT_MIN_LABELLED
    min_requests: int = DEFAULT_MIN_REQUESTS
    min_compared: int = DEFAULT_MIN_COMPARED

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be between 0 and 1, not {self.alpha!r}")
        for name in ("min_labelled", "min_requests", "min_compared"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, not {value!r}")


def normal_two_sided_p(z: float) -> float:
    """P(|Z| >= |z|) for a standard normal Z."""
    return math.erfc(abs(z) / math.sqrt(2.0))


def normal_quantile(p: float) -> float:
    """The z with P(Z <= z) = p, by bisection on erfc (to ~1e-12; enough for an interval)."""
    if not 0.0 < p < 1.0:
        raise ValueError("p must be in (0, 1)")
    low, high = -40.0, 40.0
    for _ in range(200):
        mid = (low + high) / 2.0
        if 0.5 * math.erfc(-mid / math.sqrt(2.0)) < p:
            low = mid
        else:
            high = mid
        if high - low < 1e-13:
            break
    return (low + high) / 2.0


def _check_counts(k: int, n: int) -> None:
    if k < 0 or n < 0 or k > n:
        raise ValueError(f"a proportion needs 0 <= successes <= trials, not {k} of {n}")


def wilson_interval(k: int, n: int, alpha: float = DEFAULT_ALPHA) -> tuple[float, float] | None:
    """The Wilson score interval of k successes in n trials; None without trials."""
    _check_counts(k, n)
    if n == 0:
        return None
    z = normal_quantile(1.0 - alpha / 2.0)
    p = k / n
    denominator = 1.0 + z * z / n
    centre = (p + z * z / (2.0 * n)) / denominator
    half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4.0 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class TwoProportions:
    """The candidate's proportion k1/n1 against the stable's k2/n2."""

    k1: int
    n1: int
    k2: int
    n2: int
    p1: float
    p2: float
    difference: float  # p1 - p2
    z: float
    p_value: float
    ci: tuple[float, float]  # of the difference, at 1 - alpha
    alpha: float


def two_proportion_test(k1: int, n1: int, k2: int, n2: int, alpha: float = DEFAULT_ALPHA) -> TwoProportions:
    """Two-sided two-proportion z-test of p1 = p2 (pooled SE) and the unpooled (Wald) confidence
    interval of p1 - p2. When both arms are all successes or all failures the difference cannot
    be told from zero: z = 0, p = 1."""
    _check_counts(k1, n1)
    _check_counts(k2, n2)
    if n1 == 0 or n2 == 0:
        raise ValueError("both arms need at least one trial")
    p1, p2 = k1 / n1, k2 / n2
    pooled = (k1 + k2) / (n1 + n2)
    se_pooled = math.sqrt(pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n2))
    z = (p1 - p2) / se_pooled if se_pooled > 0 else 0.0
    se = math.sqrt(p1 * (1.0 - p1) / n1 + p2 * (1.0 - p2) / n2)
    half = normal_quantile(1.0 - alpha / 2.0) * se
    diff = p1 - p2
    ci = (diff - half, diff + half)
    return TwoProportions(k1, n1, k2, n2, p1, p2, diff, z, normal_two_sided_p(z), ci, alpha)


def _arm(k: int, n: int, alpha: float) -> dict[str, Any]:
    ci = wilson_interval(k, n, alpha)
    return {"count": k, "n": n, "rate": k / n if n else None, "ci": list(ci) if ci is not None else None}


def compare(
    metric: str,
    candidate: tuple[int, int],
    stable: tuple[int, int],
    *,
    higher_is_better: bool,
    min_n: int,
    alpha: float = DEFAULT_ALPHA,
) -> dict[str, Any]:
    """One metric's test and verdict, as plain JSON: (successes, trials) per arm, where a
    "success" is what the metric counts (correct predictions; errors)."""
    (k1, n1), (k2, n2) = candidate, stable
    doc: dict[str, Any] = {
        "metric": metric,
        "test": "two-proportion z-test",
        "higher_is_better": higher_is_better,
        "alpha": alpha,
        "min_per_arm": min_n,
        "candidate": _arm(k1, n1, alpha),
        "stable": _arm(k2, n2, alpha),
        "difference": None,
        "difference_ci": None,
        "z": None,
        "p_value": None,
        "has_data": n1 > 0 and n2 > 0,
    }
    if min(n1, n2) < min_n:
        doc["verdict"] = NOT_ENOUGH
        doc["why"] = f"{min(n1, n2)} of the {min_n} per arm needed"
        if n1 == 0 or n2 == 0:
            return doc
    t = two_proportion_test(k1, n1, k2, n2, alpha)
    doc.update(difference=t.difference, difference_ci=list(t.ci), z=t.z, p_value=t.p_value)
    if "verdict" in doc:
        return doc  # the figures so far, without a verdict
    if t.p_value >= alpha:
        doc["verdict"], doc["why"] = SAME, f"p = {t.p_value:.3g} >= {alpha:g}"
    else:
        good = (t.difference > 0) == higher_is_better
        doc["verdict"], doc["why"] = (BETTER if good else WORSE), f"p = {t.p_value:.3g} < {alpha:g}"
    return doc


def overall(tests: list[dict[str, Any]]) -> str:
    """The experiment's verdict from its metrics' verdicts (see the module docstring)."""
    verdicts = [t["verdict"] for t in tests]
    if WORSE in verdicts:
        return WORSE
    if BETTER in verdicts:
        return BETTER
    if any(t["verdict"] == NOT_ENOUGH and t["has_data"] for t in tests):
        return NOT_ENOUGH
    if SAME in verdicts:
        return SAME
    return NOT_ENOUGH


def agreement(compared: int, agreed: int, thresholds: Thresholds = Thresholds()) -> dict[str, Any]:
    """Shadow mode: how often the candidate answered as the stable version did."""
    ci = wilson_interval(agreed, compared, thresholds.alpha)
    return {
        "compared": compared,
        "agreed": agreed,
        "rate": agreed / compared if compared else None,
        "ci": list(ci) if ci is not None else None,
        "enough": compared >= thresholds.min_compared,
        "min_compared": thresholds.min_compared,
    }


def verdict(arms: dict[str, dict[str, int]], thresholds: Thresholds = Thresholds()) -> dict[str, Any]:
    """The tests and the verdict from each arm's totals ("candidate" and "stable", each with
    requests, errors, labelled and correct)."""
    c, s = arms["candidate"], arms["stable"]
    tests = [
        compare(
            "accuracy",
            (c["correct"], c["labelled"]),
            (s["correct"], s["labelled"]),
            higher_is_better=True,
            min_n=thresholds.min_labelled,
            alpha=thresholds.alpha,
        ),
        compare(
            "error rate",
            (c["errors"], c["requests"]),
            (s["errors"], s["requests"]),
            higher_is_better=False,
            min_n=thresholds.min_requests,
            alpha=thresholds.alpha,
        ),
    ]
    return {"verdict": overall(tests), "alpha": thresholds.alpha, "tests": tests}
