"""agent.runtime.experiment: how an on-device experiment routes requests and judges a shadow's answers.
The routing of real requests through the agent is in tests/e2e/test_experiments.py."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from agent.monitor.summary import merge
from agent.runtime.experiment import ExperimentRoute, agreement


def route(mode: str = "ab", weight: int = 0, sample: int = 0, inflight: int = 0) -> ExperimentRoute:
    arm: Any = SimpleNamespace(version=3, inflight=inflight)
    return ExperimentRoute(mode, arm, "salt", weight=weight, sample=sample)  # type: ignore[arg-type]


def test_ab_split_follows_the_weight_and_keys_stick() -> None:
    r = route(weight=25)
    picks = [r.picks_arm(None) for _ in range(4000)]
    assert abs(sum(picks) / len(picks) - 0.25) < 0.03
    assert r.counts["candidate"] + r.counts["stable"] == 4000
    for key in ("a", "b", 17):
        first = r.picks_arm(key)
        assert all(r.picks_arm(key) is first for _ in range(30))


def test_shadow_samples_and_drops_when_the_candidate_is_busy() -> None:
    r = route("shadow", sample=50)
    copied = sum(r.shadow_wanted() for _ in range(4000))
    assert abs(copied / 4000 - 0.5) < 0.03 and r.counts["dropped"] == 0
    busy = route("shadow", sample=100, inflight=8)
    assert not any(busy.shadow_wanted() for _ in range(10))
    assert busy.counts["dropped"] == 10 and busy.counts["candidate"] == 0
    assert busy.status() == {"mode": "shadow", "candidate": 3, "sample": 100, "copied": 0, "dropped": 10}


@pytest.mark.parametrize(
    ("primary", "shadow", "expected"),
    [
        ({"label": np.array([0, 1, 2])}, {"label": np.array([0, 2, 2])}, (3, 2)),
        (  # no label output: the argmax of the probabilities
            {"probabilities": np.array([[0.9, 0.1], [0.2, 0.8]])},
            {"probabilities": np.array([[0.6, 0.4], [0.7, 0.3]])},
            (2, 1),
        ),
        (  # regression: equal to a relative 1e-3
            {"prediction": np.array([[1.0], [2.0], [3.0]])},
            {"prediction": np.array([[1.0005], [2.1], [3.0]])},
            (3, 2),
        ),
        ({"label": np.array([0, 1])}, {"other": np.array([0, 1])}, (0, 0)),  # nothing to compare
    ],
    ids=["labels", "probabilities", "values", "disjoint"],
)
def test_agreement(
    primary: dict[str, np.ndarray], shadow: dict[str, np.ndarray], expected: tuple[int, int]
) -> None:
    assert agreement(primary, shadow) == expected


def test_shadow_counts_merge_and_absent_means_zero() -> None:
    base = {
        "schema": "outpost-summary/1",
        "model": "m",
        "version": 3,
        "start": 0.0,
        "end": 1.0,
        "windows": 1,
        "requests": 1,
        "errors": 0,
        "rows": 1,
        "latency": {"bounds": [0.1], "counts": [1, 0], "sum_us": 5},
        "features": [],
        "prediction": None,
        "feedback": None,
    }
    a = {**base, "shadow": {"compared": 10, "agreed": 9}}
    b = {**base, "shadow": {"compared": 5, "agreed": 5}}
    assert merge(a, b)["shadow"] == {"compared": 15, "agreed": 14}
    assert merge(a, {**base, "shadow": None})["shadow"] == {"compared": 10, "agreed": 9}
    assert merge(base, base)["shadow"] is None  # windows of older agents have no key at all
