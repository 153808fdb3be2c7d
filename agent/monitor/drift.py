"""Drift statistics over binned counts: PSI, a binned two-sample KS, chi-square, multiple-testing
correction, and a persistence rule (k windows in a row). Pure: no I/O, numpy and `math` only.

Every test takes *counts* -- the reference profile's per-bin counts (hub/packager/profile.py) and the
live window's counts in the same bins -- never raw values, so a window costs memory independent of its
size and the hub can add devices' counts together and run the same functions on the sums.

Numbers that shaped the defaults (../shared/docs/references.md, Drift), for n = 1000 reference rows,
m = 500 window rows, 10 bins:

- PSI with no drift averages about (B - 1)(1/n + 1/m) = 0.027 and passes 0.1 reliably only near a 0.4 sigma
  mean shift; with small windows (m = 50) its noise alone averages 0.19. So PSI is for publishing, and
  decides drift only when the caller sets `DriftDetector(psi_threshold=...)`.
- Binned KS: D_crit(alpha = 0.05) = 1.358 * sqrt((n + m)/(n m)) = 0.074 on raw data; about 95% power at a
  0.23 sigma shift. Binning can only lower D (the CDFs are compared at the bin edges only), so judged by
  the Kolmogorov tail the binned test would be conservative (about 0.012-0.025 false alarms at alpha
  0.05 on deciles); its p-value is therefore taken from the maximum of a Brownian bridge at the edges
  (`bridge_max_sf`), which brings the false-alarm rate back to alpha and the power up to the exact
  test's on a mean shift, whose CDF gap peaks at the median (an edge).
- A false-alarm rate of 0.05 per window multiplies over windows and devices: p-values are corrected across
  features (Benjamini-Hochberg or Bonferroni) and an alert needs k windows in a row.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

Counts = Sequence[int] | Sequence[float] | NDArray[np.integer] | NDArray[np.floating]
Method = Literal["bh", "bonferroni"]

PSI_EPS = 1e-4
MIN_EXPECTED = 5.0
# The binned KS p-value integrates the Brownian bridge numerically on a grid of points per standard
# deviation of its smallest step (at most BRIDGE_MAX_GRID points): about 0.2 ms for 10 bins, within
# 1e-3 of the closed forms and of a simulation (tests/agent/test_drift.py).
BRIDGE_POINTS_PER_SD = 6
BRIDGE_MAX_GRID = 1500


def _pair(
    reference_counts: Counts, observed_counts: Counts
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    ref = np.asarray(reference_counts, dtype=np.float64).ravel()
    obs = np.asarray(observed_counts, dtype=np.float64).ravel()
    if ref.shape != obs.shape:
        raise ValueError(f"bin count mismatch: reference has {ref.size} bins, observed {obs.size}")
    if np.any(ref < 0) or np.any(obs < 0) or not (np.all(np.isfinite(ref)) and np.all(np.isfinite(obs))):
        raise ValueError("counts must be finite and non-negative")
    return ref, obs


# --- special functions -------------------------------------------------------------------------------


def chi2_sf(x: float, dof: int) -> float:
    """P(X >= x) for X ~ chi-square(dof): the regularized upper incomplete gamma Q(dof/2, x/2).

    Series for P when x/2 < dof/2 + 1, Lentz's continued fraction for Q otherwise (Numerical Recipes 6.2);
    both converge to ~1e-15 relative. dof = 0 is a point mass at 0: sf = 1 for x <= 0, else 0.
    """
    if dof < 0:
        raise ValueError("dof must be >= 0")
    if math.isnan(x):
        return math.nan
    if x <= 0.0:
        return 1.0
    if dof == 0:
        return 0.0
    if math.isinf(x):
        return 0.0
    a, z = dof / 2.0, x / 2.0
    log_prefix = a * math.log(z) - z - math.lgamma(a)
    if z < a + 1.0:
        # P(a, z) = e^-z z^a / Gamma(a + 1) * sum_n z^n / ((a + 1)...(a + n))
        term = total = 1.0 / a
        ap = a
        for _ in range(10_000):
            ap += 1.0
            term *= z / ap
            total += term
            if abs(term) < abs(total) * 1e-16:
                break
        return max(0.0, 1.0 - total * math.exp(log_prefix))
    # Q(a, z) = e^-z z^a / Gamma(a) * 1/(z + 1 - a - 1(1 - a)/(z + 3 - a - ...)), modified Lentz
    tiny = 1e-300
    b = z + 1.0 - a
    c = 1.0 / tiny
    d = 1.0 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-16:
            break
    return min(1.0, math.exp(log_prefix) * h)


def kolmogorov_sf(lam: float) -> float:
    """P(K > lam) for the Kolmogorov distribution: 2 sum_{j>=1} (-1)^(j-1) exp(-2 j^2 lam^2).

    For lam < 1 that alternating series converges slowly, so the Jacobi-theta form of the CDF is used
    there: P(K <= lam) = sqrt(2 pi)/lam * sum_{j>=1} exp(-(2j - 1)^2 pi^2 / (8 lam^2)).
    """
    if math.isnan(lam):
        return math.nan
    if lam <= 0.0:
        return 1.0
    if lam < 1.0:
        s = 0.0
        for j in range(1, 50):
            t = math.exp(-((2 * j - 1) ** 2) * math.pi**2 / (8.0 * lam * lam))
            s += t
            if t < 1e-17 * s:
                break
        return min(1.0, max(0.0, 1.0 - math.sqrt(2.0 * math.pi) / lam * s))
    s = 0.0
    for j in range(1, 100):
        t = math.exp(-2.0 * j * j * lam * lam)
        s += t if j % 2 == 1 else -t
        if t < 1e-17:
            break
    return min(1.0, max(0.0, 2.0 * s))


def ks_p_value(d: float, n: float, m: float) -> float:
    """Asymptotic two-sample KS p-value with Stephens' small-sample correction (Numerical Recipes 14.3):
    Q_KS((sqrt(ne) + 0.12 + 0.11/sqrt(ne)) * D), ne = n m / (n + m)."""
    if n <= 0 or m <= 0:
        return 1.0
    en = math.sqrt(n * m / (n + m))
    return kolmogorov_sf((en + 0.12 + 0.11 / en) * d)


# --- the tests -------------------------------------------------------------------------------------


def psi(reference_counts: Counts, observed_counts: Counts, eps: float = PSI_EPS) -> float:
    """Population stability index: sum_i (o_i - r_i) ln(o_i / r_i) over the bins' proportions.

    Smoothing: each proportion is floored at `eps` (1e-4, i.e. 0.01%) before the sum, so an empty bin on
    either side adds a large but finite term (a bin holding 10% on one side and nothing on the other adds
    about 0.1 * ln(0.1 / 1e-4) = 0.69, "major" on its own) instead of infinity. Proportions are not
    renormalised after flooring; the floor's effect on non-empty bins is below 1e-4.
    An empty reference or window carries no evidence: PSI 0.0.
    """
    ref, obs = _pair(reference_counts, observed_counts)
    n, m = ref.sum(), obs.sum()
    if n <= 0 or m <= 0:
        return 0.0
    r = np.maximum(ref / n, eps)
    o = np.maximum(obs / m, eps)
    return float(np.sum((o - r) * np.log(o / r)))


def _normal_pdf(d: NDArray[np.floating[Any]], var: float) -> NDArray[np.float64]:
    out: NDArray[np.float64] = np.exp(-d * d / (2.0 * var)) / math.sqrt(2.0 * math.pi * var)
    return out


def bridge_max_sf(x: float, points: Sequence[float] | NDArray[np.float64]) -> float:
    """P(max_j |B(t_j)| >= x) for a Brownian bridge B at the points t_j in (0, 1).

    The null distribution of sqrt(n m / (n + m)) * D when D is taken at a few fixed points only (the bin
    edges) rather than over the whole line. Computed, not simulated: B is Brownian motion W pinned at
    W(1) = 0, and W is Markov, so the density of W(t_j) on paths that stayed inside (-x, x) so far is
    carried from point to point by Gaussian kernels on a grid (midpoint rule), then weighed by the
    density of coming back to 0 at time 1: P(max < x) = integral f_k(y) phi(y; 1 - t_k) dy / phi(0; 1).
    """
    # Sorted, not np.unique: its check for masked arrays imports numpy.ma, 1.2 MB of RSS for the
    # rest of the agent's life from the first window's drift test on. Repeats go below (a step of
    # 0 is under `finest`).
    t = np.sort(np.asarray(points, dtype=np.float64).ravel())
    t = t[(t > 0.0) & (t < 1.0)]
    if t.size == 0 or not x > 0.0:
        return 1.0
    # A step whose standard deviation is below the finest grid's spacing cannot be carried by a
    # kernel on it (the midpoint rule then multiplies the mass: p fell to 0 for a step of 1e-7, a
    # bin of a few rows in a profile of millions). Such a point is merged into the one before (or
    # dropped near 0 or 1, where B stays near 0): B barely moves in it, so P changes by less than
    # the grid's own error.
    finest = (2.0 * x / BRIDGE_MAX_GRID) ** 2
    keep = []
    last = 0.0
    for tj in t.tolist():
        if tj - last >= finest and 1.0 - tj >= finest:
            keep.append(tj)
            last = tj
    if not keep:
        return 1.0
    t = np.asarray(keep)
    steps = np.diff(np.concatenate(([0.0], t)))
    smallest_sd = math.sqrt(min(float(steps.min()), 1.0 - float(t[-1])))
    grid = int(min(BRIDGE_MAX_GRID, max(50, math.ceil(2.0 * x / smallest_sd * BRIDGE_POINTS_PER_SD))))
    h = 2.0 * x / grid
    y = -x + h * (np.arange(grid) + 0.5)
    density = _normal_pdf(y, float(steps[0]))
    if steps.size > 1:
        # The kernel depends on y_i - y_j only: each step is a convolution, done by FFT (grid log
        # grid), not a grid x grid matrix of exponentials (about 0.4 s per call for 100 bins and
        # x = 5, on the event loop's tick). Zero-padded to 4 grid points: no wrap-around.
        size = 4 * grid
        offsets = h * (np.arange(size) - (size // 2))
        for dt in steps[1:]:
            kernel = np.fft.rfft(np.fft.ifftshift(_normal_pdf(offsets, float(dt))))
            full = np.fft.irfft(np.fft.rfft(density, size) * kernel, size)
            density = np.maximum(full[:grid], 0.0) * h
    back = _normal_pdf(y, 1.0 - float(t[-1]))
    inside = float(np.sum(density * back) * h) * math.sqrt(2.0 * math.pi)  # / phi(0; 1)
    return min(1.0, max(0.0, 1.0 - inside))


def binned_ks(reference_counts: Counts, observed_counts: Counts) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov on binned counts: (D, p-value).

    D = max over bin edges of |F_ref - F_obs|, the empirical CDFs built from the cumulative counts.
    The p-value accounts for D being a maximum over the inner edges only: under no drift,
    sqrt(n m / (n + m)) * D tends to the maximum of |B| over the pooled CDF's values at those edges
    (B a Brownian bridge), computed by `bridge_max_sf`. The classical Kolmogorov tail (the maximum over
    the whole line, `ks_p_value`) would be conservative here -- with 10 bins about 0.012 false alarms
    at alpha = 0.05 instead of 0.05 (tests/benchmarks/drift_power.py), losing power on small shifts.
    The smaller of the two is returned: the Kolmogorov tail is an upper bound of the discrete one,
    and keeps its relative precision far in the tail, where the grid's absolute error (about 1e-4)
    would dominate. An empty reference or window: (0.0, 1.0).
    """
    ref, obs = _pair(reference_counts, observed_counts)
    n, m = float(ref.sum()), float(obs.sum())
    if n <= 0 or m <= 0:
        return 0.0, 1.0
    cum_ref, cum_obs = np.cumsum(ref) / n, np.cumsum(obs) / m
    d = float(np.max(np.abs(cum_ref - cum_obs)))
    if d == 0.0:
        return 0.0, 1.0
    continuous = ks_p_value(d, n, m)
    pooled = (np.cumsum(ref) + np.cumsum(obs))[:-1] / (n + m)
    discrete = bridge_max_sf(d * math.sqrt(n * m / (n + m)), pooled)
    return d, min(continuous, discrete)


def merge_sparse_bins(
    reference_counts: Counts, observed_counts: Counts, min_expected: float = MIN_EXPECTED
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Merge adjacent bins, left to right, until each group's smaller expected cell reaches `min_expected`.

    A bin's expected count in the smaller sample is (r_i + o_i) * min(n, m) / (n + m); groups are closed
    once that reaches the minimum, and a short tail is merged into the last closed group. Bins are in
    profile order (numeric bins are ordered, so neighbours are merged; for categories the order is the
    profile's, with "other" last). Returns the merged (reference, observed) counts.
    """
    ref, obs = _pair(reference_counts, observed_counts)
    n, m = ref.sum(), obs.sum()
    if n <= 0 or m <= 0:
        return ref[:0], obs[:0]
    scale = min(n, m) / (n + m)
    groups_r: list[float] = []
    groups_o: list[float] = []
    acc_r = acc_o = 0.0
    for r_i, o_i in zip(ref.tolist(), obs.tolist(), strict=True):
        acc_r += r_i
        acc_o += o_i
        if (acc_r + acc_o) * scale >= min_expected:
            groups_r.append(acc_r)
            groups_o.append(acc_o)
            acc_r = acc_o = 0.0
    if acc_r + acc_o > 0:
        if groups_r:
            groups_r[-1] += acc_r
            groups_o[-1] += acc_o
        else:
            groups_r.append(acc_r)
            groups_o.append(acc_o)
    return np.asarray(groups_r, dtype=np.float64), np.asarray(groups_o, dtype=np.float64)


def chi_square(
    reference_counts: Counts, observed_counts: Counts, min_expected: float = MIN_EXPECTED
) -> tuple[float, int, float]:
    """Pearson chi-square test of homogeneity, reference vs window: (statistic, dof, p-value).

    The reference is a sample too, so this is the 2 x K contingency test: the expected window count of a
    bin is its pooled proportion (r_i + o_i)/(n + m) scaled to the window total m (and likewise for the
    reference row). The goodness-of-fit form -- expected = reference proportion * m -- treats the
    reference as exact and, for n = 1000 and m = 500, inflates the statistic's null variance by about
    1 + m/n = 1.5, i.e. about 0.2 false alarms per window at alpha = 0.05 with 9 dof, not 0.05. The two
    agree when n >> m.

    Sparse bins: adjacent bins are merged (`merge_sparse_bins`) until every expected cell is >= 5, so
    the chi-square approximation holds and a bin empty in the reference cannot make the statistic
    infinite. dof = groups - 1; with a single group there is nothing to test: (0.0, 0, 1.0).
    """
    ref, obs = merge_sparse_bins(reference_counts, observed_counts, min_expected)
    k = int(ref.size)
    if k < 2:
        return 0.0, 0, 1.0
    n, m = ref.sum(), obs.sum()
    pooled = (ref + obs) / (n + m)
    e_ref, e_obs = pooled * n, pooled * m
    stat = float(np.sum((ref - e_ref) ** 2 / e_ref) + np.sum((obs - e_obs) ** 2 / e_obs))
    dof = k - 1
    return stat, dof, chi2_sf(stat, dof)


def correct(p_values: Sequence[float], method: Method = "bh", alpha: float = 0.05) -> list[bool]:
    """Which of the p-values are significant after correcting for testing them all at once.

    - "bonferroni": p_i <= alpha / m; controls the chance of any false positive (FWER).
    - "bh": Benjamini-Hochberg step-up; with p sorted ascending, find the largest rank k where
      p_(k) <= k alpha / m and reject ranks 1..k; controls the expected share of false discoveries (FDR),
      and equals alpha FWER when nothing drifts. Never less powerful than Bonferroni.
    NaN p-values (a test that could not run) are never significant but count in m (conservative).
    """
    if method not in ("bh", "bonferroni"):
        raise ValueError(f"unknown correction method {method!r}")
    if not 0.0 < alpha < 1.0:
        raise ValueError("alpha must be in (0, 1)")
    m = len(p_values)
    if m == 0:
        return []
    p = [math.inf if math.isnan(v) else float(v) for v in p_values]
    if method == "bonferroni":
        return [v <= alpha / m for v in p]
    order = sorted(range(m), key=lambda i: p[i])
    cutoff = 0
    for rank, i in enumerate(order, start=1):
        if p[i] <= rank * alpha / m:
            cutoff = rank
    significant = [False] * m
    for i in order[:cutoff]:
        significant[i] = True
    return significant


# --- persistence ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WindowVerdict:
    """One window's outcome.

    drifted_features: features significant this window (after correction, or over the PSI threshold).
    alert: some feature has drifted in each of the last k windows (a level, true while it lasts; the
        caller edge-detects to notify once).
    streak: the longest current per-feature run of drifted windows.
    alerting_features: the features whose run has reached k.
    feature_streaks: every feature's current run (0 when it did not drift this window).
    """

    drifted_features: list[str]
    alert: bool
    streak: int
    alerting_features: list[str] = field(default_factory=list)
    feature_streaks: dict[str, int] = field(default_factory=dict)


class DriftDetector:
    """Corrects each window's per-feature p-values across features, then requires persistence.

    Persistence is per feature: an alert needs the *same* feature to drift in k windows in a row. Real
    drift persists in the features it affects, and under no drift the per-window false-positive rate of a
    given feature is about alpha / F (Bonferroni or BH), so a k = 3 run is ~(alpha/F)^3 per feature per
    window -- effectively never -- while "any feature, k windows in a row" would fire at about alpha^3.
    The price: drift that hops between correlated features window to window is caught later.

    Prediction drift is just another entry (e.g. "prediction") in the p-value dict. A feature missing
    from a window's dict (no data) has its run reset. PSI values count only with `psi_threshold` set
    (a feature with PSI above it drifts too); None, the default, as PSI is noisy for small windows.
    """

    def __init__(
        self, alpha: float = 0.05, k: int = 3, method: Method = "bh", psi_threshold: float | None = None
    ) -> None:
        if k < 1:
            raise ValueError("k must be >= 1")
        correct([], method, alpha)  # validates method and alpha
        self.alpha = alpha
        self.k = k
        self.method: Method = method
        self.psi_threshold = psi_threshold
        self._streaks: dict[str, int] = {}

    def reset(self) -> None:
        self._streaks.clear()

    def update(
        self, feature_p_values: Mapping[str, float], psi_values: Mapping[str, float] | None = None
    ) -> WindowVerdict:
        names = list(feature_p_values)
        significant = correct([feature_p_values[f] for f in names], self.method, self.alpha)
        drifted = {f for f, s in zip(names, significant, strict=True) if s}
        if self.psi_threshold is not None and psi_values:
            drifted |= {f for f, v in psi_values.items() if v > self.psi_threshold}
        every = set(self._streaks) | set(names) | set(psi_values or {})
        self._streaks = {f: self._streaks.get(f, 0) + 1 for f in every if f in drifted}
        streaks = {f: self._streaks.get(f, 0) for f in sorted(every)}
        alerting = sorted(f for f, s in self._streaks.items() if s >= self.k)
        ordered = [f for f in names if f in drifted] + sorted(drifted - set(names))
        return WindowVerdict(
            drifted_features=ordered,
            alert=bool(alerting),
            streak=max(self._streaks.values(), default=0),
            alerting_features=alerting,
            feature_streaks=streaks,
        )
