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
    arm: Any = SimpleNamespace(version=3, batcher=SimpleNamespace(outstanding=inflight))
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


@pytest.mark.parametrize(
    ("primary", "shadow", "expected"),
    [
        ({"label": np.zeros(0, np.int64)}, {"label": np.zeros(0, np.int64)}, (0, 0)),  # a 0-row request
        ({"out": np.array([b"a", b"b"], object)}, {"out": np.array([b"a", b"c"], object)}, (2, 1)),  # text
        ({"probabilities": np.ones((1, 2))}, {"probabilities": np.ones((1, 0))}, (0, 0)),  # no classes
    ],
    ids=["no-rows", "text", "no-columns"],
)
def test_agreement_of_odd_outputs_does_not_raise(
    primary: dict[str, np.ndarray], shadow: dict[str, np.ndarray], expected: tuple[int, int]
) -> None:
    assert agreement(primary, shadow) == expected


def test_a_shadow_copy_that_cannot_be_compared_does_not_stall_its_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The candidate's batcher delivers a shadow copy and a client's request in one batch: a copy
    whose answers cannot be compared must not keep the client's answer from being delivered."""
    import asyncio

    from agent.runtime import experiment
    from agent.runtime.batcher import Batcher
    from agent.serving.app import _ShadowTicket

    def cannot_compare(primary: Any, shadow: Any) -> tuple[int, int]:
        raise ValueError("outputs of another kind")

    monkeypatch.setattr(experiment, "agreement", cannot_compare)
    from tests.agent.test_monitor_service import loaded, monitor

    arm = loaded(version=3)
    monitor()[0].attach(arm)  # a real monitor: the copy's comparison is counted in its window

    async def main() -> dict[str, np.ndarray]:
        batcher = Batcher(
            lambda inputs: {"out": np.ones((len(inputs["x"]), 1))}, None, enabled=True, max_batch_rows=8
        )
        batcher.submit_ticket(
            {"x": np.ones((1, 2))}, 1, _ShadowTicket(arm, {"out": np.ones((1, 1))}, "p~shadow")
        )
        client = batcher.submit({"x": np.ones((1, 2))}, 1)
        return await asyncio.wait_for(client, 1.0)

    assert asyncio.run(main())["out"].shape == (1, 1)
    summary = arm.monitor.summary
    assert (summary.shadow_compared, summary.shadow_agreed) == (0, 0)
    assert arm.metrics.requests == 1  # the copy was answered and counted, not dropped


def test_clients_that_hang_up_on_the_candidate_do_not_stop_the_shadow_copies() -> None:
    """Eight clients of the candidate's own version (/versions/{v}) hang up while queued: their
    requests are dropped, never delivered, and must not count as copies in flight for good
    (before, every copy was then dropped as "busy" for the rest of the experiment)."""
    import asyncio

    from agent.metrics import VersionMetrics
    from agent.runtime.batcher import Batcher
    from agent.serving.app import _InferTicket
    from agent.serving.oip import InferRequest

    async def main() -> ExperimentRoute:
        batcher = Batcher(lambda i: {"out": np.ones((len(i["x"]), 1))}, None, enabled=True, max_batch_rows=8)
        arm: Any = SimpleNamespace(
            name="m",
            version=2,
            version_str="2",
            metrics=VersionMetrics("m", "2"),
            observer=None,
            monitor=None,
        )
        arm.batcher = batcher
        for seq in range(1, 9):
            parsed = InferRequest(None, {}, {"x": np.ones((1, 2))}, None, False, 1)
            ticket = _InferTicket(arm, parsed, 0.0, (f"ab-{seq:x}", seq))
            batcher.submit_ticket(parsed.inputs, 1, ticket)
            ticket.cancelled = True
        await asyncio.sleep(0.01)
        return ExperimentRoute("shadow", arm, "salt", sample=100)

    shadow = asyncio.run(main())
    assert all(shadow.shadow_wanted() for _ in range(3)) and shadow.counts["dropped"] == 0
