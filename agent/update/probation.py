"""Probation of a new version: does it answer as well as the version it replaces? Pure.

    tracker = ProbationTracker(manifest.probation, started_at=now, reference_p50_s=window.p50())
    loaded.observer = tracker.record            # (ok, seconds) of every answer the candidate gives
    verdict = tracker.verdict(now)              # PENDING, PASSED or FAILED with a reason

The reference is the previous version's p50 latency over its own recent answers: keep a
`LatencyWindow` per serving version and pass its `p50()` when probation starts. `now` is any
monotonic clock in seconds, the same for `started_at`.

Rules (thresholds from the package's `ProbationPolicy`):

- The version PASSES once it has answered `min_requests` times and `min_seconds` have passed, with
  an error rate of at most `max_error_rate` and a p50 latency of at most `max_latency_ratio` times
  the reference. At that point it FAILS otherwise, the reason naming the threshold.
- Fail fast on errors: from `min(FAIL_FAST_MIN_REQUESTS, min_requests)` answers on, the version
  fails at once, without waiting for `min_seconds`, when its error rate is over the threshold
  beyond doubt: the lower bound of the Wilson interval (99.9 %, one-sided) is over it. A plain rate
  would not do: a version with a true 1 % error rate has an 18 % chance of one error in its first
  20 answers, which is 5 % and over a 2 % threshold. A broken version (every answer an error)
  still fails after the first 20.
- Latency is the p50 (robust to a few slow answers) of the last `LATENCY_WINDOW` successful
  answers (errors are often fast and would flatter it), judged at the end only. A p50 within
  `LATENCY_SLACK_S` (0.25 ms) of the reference passes at any ratio: below that, the ratio of two
  p50s measures the CPU's scheduling more than the model. No reference (a
  first install), a reference of 0 or `max_latency_ratio` 0 (no version can be 0x as fast) turn the
  check off.
- Low traffic: a device that never sees `min_requests` answers would keep two versions loaded for
  ever; after `max_seconds` (default a day) without a failure the version passes on what it showed.

Memory is bounded: two counters and a fixed-size window. Not thread-safe: feed it from one thread.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from enum import StrEnum

from agent.package.manifest import ProbationPolicy

FAIL_FAST_MIN_REQUESTS = 20  # answers before errors can fail a version ahead of min_seconds
# One-sided 99.9 % normal quantile for the Wilson lower bound: stricter than one test would need,
# because the verdict is asked again after every answer (each look is another chance to err).
FAIL_FAST_Z = 3.090
LATENCY_WINDOW = 512  # last successful answers whose p50 is compared
# A p50 at most this much over the reference is never "slower", whatever the ratio: at a tenth of
# a millisecond, a shared CPU's scheduling moves a p50 by 2x between two windows of the same
# model (seen in `make demo`: 2.2x between two versions of one model, a rollback for nothing).
LATENCY_SLACK_S = 0.00025
DEFAULT_MAX_SECONDS = 24 * 3600.0  # probation ends (passes) after this with too few answers


class Outcome(StrEnum):
    PENDING = "pending"
    PASSED = "passed"
    FAILED = "failed"


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    reason: str  # for a person: what was measured against which threshold

    @property
    def done(self) -> bool:
        return self.outcome is not Outcome.PENDING


class LatencyWindow:
    """The last `size` latencies (seconds) and their p50: bounded memory."""

    def __init__(self, size: int = LATENCY_WINDOW) -> None:
        if size < 1:
            raise ValueError("LatencyWindow: size must be at least 1")
        self._values: deque[float] = deque(maxlen=size)

    def add(self, seconds: float) -> None:
        if math.isfinite(seconds) and seconds >= 0:  # a clock glitch must not poison the median
            self._values.append(seconds)

    def __len__(self) -> int:
        return len(self._values)

    def p50(self) -> float | None:
        """The median of the window (mean of the two middle values), None when empty."""
        if not self._values:
            return None
        ordered = sorted(self._values)
        mid = len(ordered) // 2
        return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def wilson_lower_bound(errors: int, n: int, z: float = FAIL_FAST_Z) -> float:
    """Lower bound of the Wilson score interval of the error rate `errors / n`."""
    if n <= 0 or errors <= 0:
        return 0.0
    p = errors / n
    z2 = z * z
    centre = p + z2 / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, (centre - spread) / (1 + z2 / n))


class ProbationTracker:
    """Counts a candidate's answers and judges them against its probation policy."""

    def __init__(
        self,
        policy: ProbationPolicy,
        started_at: float,
        reference_p50_s: float | None = None,
        *,
        window: int = LATENCY_WINDOW,
        max_seconds: float = DEFAULT_MAX_SECONDS,
    ) -> None:
        self.policy = policy
        self.started_at = started_at
        self.reference_p50_s = reference_p50_s
        self.max_seconds = max_seconds
        self.requests = 0
        self.errors = 0
        self.latency = LatencyWindow(window)

    def record(self, ok: bool, latency_s: float) -> None:
        """One answer of the candidate: ok, or a model failure; how long it took."""
        self.requests += 1
        if ok:
            self.latency.add(latency_s)
        else:
            self.errors += 1

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def _latency(self) -> tuple[float, float] | None:
        """The candidate's p50 and the reference's; None when not comparable (see the module doc)."""
        ref = self.reference_p50_s
        p50 = self.latency.p50()
        if ref is None or not ref > 0 or p50 is None or not self.policy.max_latency_ratio > 0:
            return None
        return p50, ref

    def verdict(self, now: float) -> Verdict:
        policy = self.policy
        n = self.requests
        elapsed = max(0.0, now - self.started_at)
        rate_text = f"error rate {self.error_rate:.1%} over {policy.max_error_rate:.1%} after {n} requests"
        fail_fast_after = max(1, min(FAIL_FAST_MIN_REQUESTS, policy.min_requests))
        if n >= fail_fast_after and wilson_lower_bound(self.errors, n) > policy.max_error_rate:
            return Verdict(Outcome.FAILED, rate_text)
        enough = n >= policy.min_requests and elapsed >= policy.min_seconds
        if not enough and elapsed < self.max_seconds:
            return Verdict(
                Outcome.PENDING,
                f"{n} of {policy.min_requests} requests, {elapsed:.0f} of {policy.min_seconds:.0f} s",
            )
        if self.error_rate > policy.max_error_rate:
            return Verdict(Outcome.FAILED, rate_text)
        latency = self._latency()
        if latency is None:
            latency_text = "latency not compared"
        else:
            p50, ref = latency
            ratio = p50 / ref
            over = ratio > policy.max_latency_ratio
            if over and p50 - ref > LATENCY_SLACK_S:
                return Verdict(
                    Outcome.FAILED,
                    f"p50 latency {ratio:.1f}x the previous version's (max {policy.max_latency_ratio:.1f}x)",
                )
            latency_text = f"p50 latency {ratio:.2f}x the previous version's" + (
                f" (within {LATENCY_SLACK_S * 1e3:g} ms of it)" if over else ""
            )
        low_traffic = "" if enough else f" (only {n} requests in {elapsed:.0f} s: passed on time)"
        return Verdict(
            Outcome.PASSED,
            f"{n} requests in {elapsed:.0f} s, error rate {self.error_rate:.1%}, {latency_text}{low_traffic}",
        )
