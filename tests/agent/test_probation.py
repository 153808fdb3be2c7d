"""agent.update.probation: verdicts on a candidate's answers, against its ProbationPolicy.

Each case feeds blocks of answers (count, ok, latency) and asks for the verdict at a time.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from agent.package.manifest import ProbationPolicy
from agent.update import LatencyWindow, Outcome, ProbationTracker
from agent.update.probation import DEFAULT_MAX_SECONDS, LATENCY_WINDOW, wilson_lower_bound

T0 = 1000.0  # started_at; verdicts are asked at T0 + seconds
POLICY = ProbationPolicy(min_requests=50, min_seconds=30.0, max_error_rate=0.02, max_latency_ratio=2.0)
MS = 0.001


@dataclass(frozen=True)
class Case:
    id: str
    answers: list[tuple[int, bool, float]]  # blocks of (count, ok, latency in seconds)
    at: float  # seconds after the start
    outcome: Outcome
    reason: str = ""  # a substring of the verdict's reason
    policy: ProbationPolicy = POLICY
    reference: float | None = 10 * MS
    extra: dict[str, float] = field(default_factory=dict)


CASES = [
    Case(
        "pending-too-few-requests",
        [(10, True, 10 * MS)],
        60,
        Outcome.PENDING,
        "10 of 50 requests, 60 of 30 s",
    ),
    Case(
        "pending-too-little-time",
        [(100, True, 10 * MS)],
        10,
        Outcome.PENDING,
        "100 of 50 requests, 10 of 30 s",
    ),
    Case("passes", [(100, True, 10 * MS)], 31, Outcome.PASSED, "100 requests in 31 s, error rate 0.0%"),
    Case(
        "passes-with-errors-under-the-threshold", [(98, True, 10 * MS), (1, False, 0.0)], 31, Outcome.PASSED
    ),
    Case(
        "error-rate-fails",
        [(186, True, 10 * MS), (14, False, 10 * MS)],
        31,
        Outcome.FAILED,
        "error rate 7.0% over 2.0% after 200 requests",
    ),
    Case(
        "error-rate-just-over-waits-for-the-end",
        [(97, True, 10 * MS), (3, False, 10 * MS)],
        10,
        Outcome.PENDING,
    ),
    Case(
        "error-rate-just-over-fails-at-the-end",
        [(97, True, 10 * MS), (3, False, 10 * MS)],
        30,
        Outcome.FAILED,
        "error rate 3.0% over 2.0% after 100 requests",
    ),
    Case(
        "fail-fast-broken-version",
        [(20, False, 1 * MS)],
        1,
        Outcome.FAILED,
        "error rate 100.0% over 2.0% after 20 requests",
    ),
    Case("fail-fast-needs-a-minimum-sample", [(19, False, 1 * MS)], 1, Outcome.PENDING),
    Case(
        "one-early-error-is-not-enough-to-fail-fast",
        [(19, True, 10 * MS), (1, False, 0.0)],
        1,
        Outcome.PENDING,
    ),
    Case(
        "fail-fast-after-10-of-120",
        [(110, True, 10 * MS), (10, False, 10 * MS)],
        5,
        Outcome.FAILED,
        "error rate 8.3% over 2.0% after 120 requests",
    ),
    Case(
        "fail-fast-sample-follows-a-small-min-requests",
        [(5, False, 1 * MS)],
        1,
        Outcome.FAILED,
        "after 5 requests",
        policy=ProbationPolicy(min_requests=5, min_seconds=30.0),
    ),
    Case(
        "zero-error-rate-allowed-fails-on-one-error",
        [(19, True, 10 * MS), (1, False, 10 * MS)],
        1,
        Outcome.FAILED,
        "error rate 5.0% over 0.0% after 20 requests",
        policy=ProbationPolicy(max_error_rate=0.0),
    ),
    Case(
        "latency-fails",
        [(100, True, 31 * MS)],
        31,
        Outcome.FAILED,
        "p50 latency 3.1x the previous version's (max 2.0x)",
    ),
    Case("latency-within", [(100, True, 19 * MS)], 31, Outcome.PASSED, "p50 latency 1.90x"),
    # Sub-millisecond models: a ratio over the maximum within LATENCY_SLACK_S (0.25 ms) of the
    # reference passes; past it, the ratio rules again.
    Case(
        "latency-ratio-over-but-within-the-slack",
        [(100, True, 0.22 * MS)],
        31,
        Outcome.PASSED,
        "p50 latency 2.20x the previous version's (within 0.25 ms of it)",
        reference=0.1 * MS,
    ),
    Case(
        "latency-ratio-over-at-the-slack-edge",
        [(100, True, 0.35 * MS)],
        31,
        Outcome.PASSED,
        "within 0.25 ms",
        reference=0.1 * MS,
    ),
    Case(
        "latency-ratio-over-past-the-slack",
        [(100, True, 0.36 * MS)],
        31,
        Outcome.FAILED,
        "p50 latency 3.6x the previous version's (max 2.0x)",
        reference=0.1 * MS,
    ),
    Case(
        "latency-p50-ignores-a-slow-minority",
        [(55, True, 10 * MS), (45, True, 1.0)],
        31,
        Outcome.PASSED,
    ),
    Case(
        "latency-p50-sees-a-slow-majority",
        [(45, True, 10 * MS), (55, True, 1.0)],
        31,
        Outcome.FAILED,
        "p50 latency 100.0x",
    ),
    Case(
        "latency-of-errors-does-not-count",
        [(50, True, 30 * MS), (1, False, 0.0)] * 1,
        31,
        Outcome.FAILED,
        "p50 latency 3.0x",
    ),
    Case(
        "latency-not-compared-without-reference",
        [(100, True, 1.0)],
        31,
        Outcome.PASSED,
        "latency not compared",
        reference=None,
    ),
    Case(
        "latency-not-compared-with-a-zero-reference",
        [(100, True, 1.0)],
        31,
        Outcome.PASSED,
        "latency not compared",
        reference=0.0,
    ),
    Case(
        "latency-check-off-with-zero-ratio",
        [(100, True, 1.0)],
        31,
        Outcome.PASSED,
        "latency not compared",
        policy=ProbationPolicy(max_latency_ratio=0.0),
    ),
    Case(
        "low-traffic-passes-after-max-seconds",
        [(3, True, 10 * MS)],
        DEFAULT_MAX_SECONDS,
        Outcome.PASSED,
        "only 3 requests",
    ),
    Case(
        "low-traffic-with-an-error-fails-after-max-seconds",
        [(2, True, 10 * MS), (1, False, 10 * MS)],
        DEFAULT_MAX_SECONDS,
        Outcome.FAILED,
        "error rate 33.3% over 2.0% after 3 requests",
    ),
    Case(
        "low-traffic-still-pending-before-max-seconds",
        [(3, True, 10 * MS)],
        DEFAULT_MAX_SECONDS - 1,
        Outcome.PENDING,
    ),
    Case(
        "time-only-policy-passes-without-requests",
        [],
        30,
        Outcome.PASSED,
        "0 requests in 30 s",
        policy=ProbationPolicy(min_requests=0, min_seconds=30.0),
    ),
    Case(
        "requests-only-policy-passes-at-once",
        [(10, True, 10 * MS)],
        0,
        Outcome.PASSED,
        policy=ProbationPolicy(min_requests=10, min_seconds=0.0),
    ),
    Case("clock-before-start-is-pending", [(100, True, 10 * MS)], -5, Outcome.PENDING, "0 of 30 s"),
]


def tracker_for(case: Case) -> ProbationTracker:
    tracker = ProbationTracker(case.policy, started_at=T0, reference_p50_s=case.reference)
    for count, ok, latency in case.answers:
        for _ in range(count):
            tracker.record(ok, latency)
    return tracker


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_verdict(case: Case) -> None:
    verdict = tracker_for(case).verdict(T0 + case.at)
    assert verdict.outcome is case.outcome, verdict.reason
    assert case.reason in verdict.reason
    assert verdict.done is (case.outcome is not Outcome.PENDING)


def test_memory_is_bounded_and_the_window_is_the_latest() -> None:
    tracker = ProbationTracker(POLICY, started_at=T0, reference_p50_s=10 * MS, window=100)
    for _ in range(5000):
        tracker.record(True, 1.0)  # slow at first ...
    for _ in range(5000):
        tracker.record(True, 10 * MS)  # ... then as fast as the previous version
    assert len(tracker.latency) == 100
    assert tracker.requests == 10_000
    assert tracker.verdict(T0 + 60).outcome is Outcome.PASSED


def test_default_window() -> None:
    tracker = ProbationTracker(POLICY, started_at=T0)
    for _ in range(LATENCY_WINDOW * 3):
        tracker.record(True, 0.01)
    assert len(tracker.latency) == LATENCY_WINDOW


def test_record_is_an_observer() -> None:
    """It fits LoadedVersion.observer: called with (ok, seconds)."""
    tracker = ProbationTracker(POLICY, started_at=T0)
    observer = tracker.record
    observer(True, 0.002)
    observer(False, 0.001)
    assert (tracker.requests, tracker.errors, tracker.error_rate) == (2, 1, 0.5)


def test_a_true_error_rate_under_the_threshold_rarely_fails_fast() -> None:
    """A version erring 1% of the time, threshold 2%: the fail-fast rule must not be a coin toss."""
    rng = random.Random(7)
    failed = 0
    for _ in range(500):
        tracker = ProbationTracker(POLICY, started_at=T0)
        for i in range(200):
            tracker.record(rng.random() >= 0.01, 10 * MS)
            if i >= 19 and tracker.verdict(T0 + 1).outcome is Outcome.FAILED:
                failed += 1
                break
    assert failed / 500 < 0.03


def test_a_broken_version_fails_within_twenty_answers() -> None:
    tracker = ProbationTracker(POLICY, started_at=T0)
    answers = 0
    while tracker.verdict(T0).outcome is not Outcome.FAILED:
        tracker.record(False, 0.0)
        answers += 1
    assert answers == 20


@pytest.mark.parametrize(
    ("values", "p50"),
    [
        ([], None),
        ([3.0], 3.0),
        ([1.0, 3.0], 2.0),
        ([5.0, 1.0, 3.0], 3.0),
        ([1.0, float("nan"), -1.0, 2.0], 1.5),
    ],
    ids=["empty", "one", "even", "odd", "ignores-nan-and-negative"],
)
def test_latency_window_p50(values: list[float], p50: float | None) -> None:
    window = LatencyWindow(10)
    for v in values:
        window.add(v)
    assert window.p50() == p50


def test_latency_window_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="size"):
        LatencyWindow(0)


@pytest.mark.parametrize(
    ("errors", "n", "low", "high"),
    [
        (0, 100, 0.0, 0.0),
        (0, 0, 0.0, 0.0),
        (20, 20, 0.67, 0.68),
        (1, 20, 0.004, 0.005),
        (7, 100, 0.023, 0.024),
    ],
    ids=["no-errors", "no-requests", "all-errors", "one-in-twenty", "seven-in-a-hundred"],
)
def test_wilson_lower_bound(errors: int, n: int, low: float, high: float) -> None:
    assert low <= wilson_lower_bound(errors, n) <= high
