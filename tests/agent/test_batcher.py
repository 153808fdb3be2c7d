"""agent.runtime.batcher: merging concurrent requests, splitting results, isolating failures.

The model is a pure-numpy fake that records every call, run on a real ThreadPoolExecutor, so
what is tested is the batcher's scheduling on a real event loop, not a mock of it.

Determinism: `submit` dispatches synchronously, and a finished run is only noticed by the
event loop (a callback), so requests submitted with no `await` between them all see the same
state: the first runs, the others queue behind it. No sleeps are needed to "get the timing".
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from agent.runtime.batcher import Batcher, run_batch


class FakeModel:
    """y = 2x and per-row sums; a request with a negative value fails, as a bad input would."""

    def __init__(self, *, scalar_output: bool = False) -> None:
        self.calls: list[int] = []  # rows of each call, in call order
        self.gate = threading.Event()
        self.gate.set()
        self.scalar_output = scalar_output
        self._lock = threading.Lock()

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        with self._lock:
            self.calls.append(x.shape[0])
        assert self.gate.wait(10), "test never opened the gate"
        if (x < 0).any():
            raise ValueError("negative input")
        out = {"y": x * 2, "rowsum": x.sum(axis=tuple(range(1, x.ndim)))}
        if self.scalar_output:
            out["total"] = np.array(x.sum())  # 0-d: cannot be split by rows
        return out


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="test-batcher")
    yield pool
    pool.shutdown(wait=True)


def rows(n: int, start: float = 0.0, width: int = 2, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    return {"x": (np.arange(n * width, dtype=dtype) + start).reshape(n, width)}


def make(
    model: FakeModel, executor: ThreadPoolExecutor, **kwargs: Any
) -> tuple[Batcher, list[tuple[int, int]]]:
    batches: list[tuple[int, int]] = []
    options: dict[str, Any] = {"enabled": True, "max_batch_rows": 64, **kwargs}
    b = Batcher(model, executor, on_batch=lambda n, r: batches.append((n, r)), **options)
    return b, batches


def check(result: dict[str, np.ndarray], inputs: dict[str, np.ndarray]) -> None:
    np.testing.assert_array_equal(result["y"], inputs["x"] * 2)
    np.testing.assert_array_equal(result["rowsum"], inputs["x"].sum(axis=1))


def test_single_request_runs_at_once(executor: ThreadPoolExecutor) -> None:
    model = FakeModel()

    async def main() -> None:
        b, batches = make(model, executor)
        inputs = rows(3)
        fut = b.submit(inputs, 3)
        # Dispatched inside submit: with one client nothing waits.
        assert batches == [(1, 3)]
        assert b.busy
        check(await fut, inputs)
        assert not b.busy

    asyncio.run(main())
    assert model.calls == [3]


def test_requests_queued_behind_a_run_are_merged_and_split(executor: ThreadPoolExecutor) -> None:
    model = FakeModel()

    async def main() -> None:
        b, batches = make(model, executor)
        model.gate.clear()
        first = rows(1)
        reqs = [rows(2, 100), rows(3, 200), rows(1, 300)]
        f0 = b.submit(first, 1)
        futs = [b.submit(r, r["x"].shape[0]) for r in reqs]
        assert b.queued == 3
        model.gate.set()
        check(await f0, first)
        for fut, r in zip(futs, reqs, strict=True):
            got = await fut
            assert got["y"].shape == r["x"].shape  # each gets exactly its own rows back
            check(got, r)
        assert batches == [(1, 1), (3, 6)]

    asyncio.run(main())
    assert model.calls == [1, 6]


def test_incompatible_requests_are_not_merged(executor: ThreadPoolExecutor) -> None:
    model = FakeModel()
    reqs = [
        rows(2, width=2),
        rows(1, width=3),  # other trailing shape
        rows(1, width=3),  # same as the one before: these two merge
        rows(2, width=2, dtype=np.float64),  # other dtype
    ]

    async def main() -> None:
        b, batches = make(model, executor)
        f0 = b.submit(rows(1), 1)
        futs = [b.submit(r, r["x"].shape[0]) for r in reqs]
        await f0
        for fut, r in zip(futs, reqs, strict=True):
            got = await fut
            assert got["y"].dtype == r["x"].dtype
            check(got, r)
        assert batches == [(1, 1), (1, 2), (2, 2), (1, 2)]

    asyncio.run(main())


def test_max_batch_rows_is_respected(executor: ThreadPoolExecutor) -> None:
    model = FakeModel()
    sizes = [3, 2, 1, 4, 1]

    async def main() -> None:
        b, batches = make(model, executor, max_batch_rows=4)
        f0 = b.submit(rows(1), 1)
        reqs = [rows(n, 10 * i) for i, n in enumerate(sizes)]
        futs = [b.submit(r, n) for r, n in zip(reqs, sizes, strict=True)]
        await f0
        for fut, r in zip(futs, reqs, strict=True):
            check(await fut, r)
        # In order, never past 4 rows: [3] (3+2 > 4), [2, 1], [4], [1].
        assert batches == [(1, 1), (1, 3), (2, 3), (1, 4), (1, 1)]

    asyncio.run(main())
    assert max(model.calls) <= 4


def test_request_larger_than_max_batch_rows_runs_alone(executor: ThreadPoolExecutor) -> None:
    model = FakeModel()

    async def main() -> None:
        b, batches = make(model, executor, max_batch_rows=4)
        big, small = rows(10), rows(1)
        f0 = b.submit(rows(1), 1)
        f_big = b.submit(big, 10)
        f_small = b.submit(small, 1)
        await f0
        check(await f_big, big)
        check(await f_small, small)
        assert [n for n, _ in batches] == [1, 1, 1]

    asyncio.run(main())
    assert model.calls == [1, 10, 1]


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"max_batch_rows": 4}, id="oversized"),
        pytest.param({"enabled": False}, id="batching-disabled"),
    ],
)
def test_on_batch_reports_the_rows_of_an_unbatched_request(
    executor: ThreadPoolExecutor, options: dict[str, Any]
) -> None:
    model = FakeModel()

    async def main() -> None:
        b, batches = make(model, executor, **options)
        await b.submit(rows(10), 10)
        assert batches == [(1, 10)]

    asyncio.run(main())


def test_batching_disabled_runs_one_by_one(executor: ThreadPoolExecutor) -> None:
    model = FakeModel()

    async def main() -> None:
        b, batches = make(model, executor, enabled=False)
        futs = [b.submit(rows(2), 2) for _ in range(3)]
        await asyncio.gather(*futs)
        assert [n for n, _ in batches] == [1, 1, 1]

    asyncio.run(main())
    assert model.calls == [2, 2, 2]


def test_failing_batch_is_retried_one_by_one(executor: ThreadPoolExecutor) -> None:
    model = FakeModel()
    good1, bad, good2 = rows(2, 10), rows(1, -5), rows(3, 20)

    async def main() -> None:
        b, _ = make(model, executor)
        f0 = b.submit(rows(1), 1)
        f1, f_bad, f2 = (b.submit(r, r["x"].shape[0]) for r in (good1, bad, good2))
        await f0
        check(await f1, good1)
        check(await f2, good2)
        with pytest.raises(ValueError, match="negative input"):
            await f_bad

    asyncio.run(main())
    # The merged run of 6 rows failed; then each request alone, so only the bad one fails.
    assert model.calls == [1, 6, 2, 1, 3]


def test_error_of_a_lone_request_reaches_its_caller(executor: ThreadPoolExecutor) -> None:
    model = FakeModel()

    async def main() -> None:
        b, _ = make(model, executor)
        with pytest.raises(ValueError, match="negative input"):
            await b.submit(rows(1, -9), 1)
        check(await b.submit(rows(1), 1), rows(1))  # the batcher is still usable

    asyncio.run(main())
    assert model.calls == [1, 1]


def test_output_that_cannot_be_split_falls_back_to_single_runs(executor: ThreadPoolExecutor) -> None:
    # A 0-d output (a total over the batch) has no rows to split: merging would be wrong.
    model = FakeModel(scalar_output=True)
    a, c = rows(1, 1), rows(2, 5)

    async def main() -> None:
        b, _ = make(model, executor)
        f0 = b.submit(rows(1), 1)
        fa, fc = b.submit(a, 1), b.submit(c, 2)
        await f0
        got_a, got_c = await fa, await fc
        assert got_a["total"] == a["x"].sum()
        assert got_c["total"] == c["x"].sum()
        check(got_c, c)

    asyncio.run(main())
    assert model.calls == [1, 3, 1, 2]


def test_cancelled_requests_do_not_break_the_others(executor: ThreadPoolExecutor) -> None:
    model = FakeModel()

    async def main() -> None:
        b, batches = make(model, executor)
        model.gate.clear()
        first = rows(1)
        f0 = b.submit(first, 1)  # in flight; its caller goes away
        r1, r2, r3 = rows(2, 10), rows(1, 20), rows(3, 30)
        f1, f2, f3 = b.submit(r1, 2), b.submit(r2, 1), b.submit(r3, 3)
        f0.cancel()
        f2.cancel()  # queued; its caller goes away
        model.gate.set()
        check(await f1, r1)
        check(await f3, r3)
        assert f0.cancelled()
        assert f2.cancelled()
        # The cancelled queued request was dropped before running, not run for nobody.
        assert batches == [(1, 1), (2, 5)]
        assert not b.busy

    asyncio.run(main())
    assert model.calls == [1, 5]


def test_all_queued_cancelled_leaves_the_batcher_idle(executor: ThreadPoolExecutor) -> None:
    model = FakeModel()

    async def main() -> None:
        b, _ = make(model, executor)
        f0 = b.submit(rows(1), 1)
        queued = [b.submit(rows(1), 1) for _ in range(3)]
        for f in queued:
            f.cancel()
        await f0
        await asyncio.sleep(0)  # let the finish callback dispatch the (cancelled) queue
        assert not b.busy
        check(await b.submit(rows(2), 2), rows(2))

    asyncio.run(main())
    assert model.calls == [1, 2]


def test_max_delay_waits_for_company(executor: ThreadPoolExecutor) -> None:
    model = FakeModel()

    async def main() -> None:
        b, batches = make(model, executor, max_delay_s=0.2)
        a, c = rows(1), rows(2, 10)
        started = time.monotonic()
        fa = b.submit(a, 1)
        assert batches == []  # not run yet: waiting for company
        await asyncio.sleep(0.005)
        fc = b.submit(c, 2)
        check(await fa, a)
        check(await fc, c)
        assert time.monotonic() - started >= 0.19
        assert batches == [(2, 3)]

    asyncio.run(main())
    assert model.calls == [3]


def test_max_delay_stops_waiting_once_the_batch_is_full(executor: ThreadPoolExecutor) -> None:
    model = FakeModel()

    async def main() -> None:
        b, batches = make(model, executor, max_batch_rows=4, max_delay_s=5.0)
        fa = b.submit(rows(1), 1)
        fc = b.submit(rows(3), 3)
        assert batches == [(2, 4)]  # full: dispatched at once, not after 5 s
        await asyncio.wait_for(asyncio.gather(fa, fc), 2)

    asyncio.run(main())


def test_max_delay_still_waits_after_an_oversized_request(executor: ThreadPoolExecutor) -> None:
    model = FakeModel()

    async def main() -> None:
        b, batches = make(model, executor, max_batch_rows=4, max_delay_s=0.05)
        await b.submit(rows(10), 10)  # too big to batch: runs alone
        fa = b.submit(rows(1), 1)
        fc = b.submit(rows(1), 1)
        await asyncio.gather(fa, fc)
        assert batches == [(1, 10), (2, 2)]

    asyncio.run(main())


def test_max_inflight_runs_batches_in_parallel(executor: ThreadPoolExecutor) -> None:
    model = FakeModel()

    async def main() -> None:
        b, batches = make(model, executor, max_inflight=2)
        model.gate.clear()
        fa = b.submit(rows(1), 1)
        fb = b.submit(rows(2), 2)
        fc = b.submit(rows(3), 3)
        assert batches == [(1, 1), (1, 2)]  # two workers busy, the third waits
        assert b.queued == 1
        model.gate.set()
        await asyncio.gather(fa, fb, fc)

    asyncio.run(main())
    assert sorted(model.calls) == [1, 2, 3]


@pytest.mark.parametrize(
    "sizes",
    [pytest.param([1], id="one"), pytest.param([1, 1], id="two"), pytest.param([3, 1, 4, 1, 5], id="five")],
)
def test_run_batch_splits_by_rows(sizes: list[int]) -> None:
    model = FakeModel()
    batch = [rows(n, 100 * i) for i, n in enumerate(sizes)]
    results = run_batch(model, list(batch), sizes)
    assert model.calls == [sum(sizes)]
    for got, r in zip(results, batch, strict=True):
        assert isinstance(got, dict)
        check(got, r)


# -- inline mode (no executor): tiny models run on the event loop thread -------------------------


def make_inline(model: FakeModel, **kwargs: Any) -> tuple[Batcher, list[tuple[int, int]]]:
    batches: list[tuple[int, int]] = []
    options: dict[str, Any] = {"enabled": True, "max_batch_rows": 64, **kwargs}
    b = Batcher(model, None, on_batch=lambda n, r: batches.append((n, r)), **options)
    return b, batches


def test_inline_requests_of_one_loop_iteration_share_one_call() -> None:
    model = FakeModel()
    reqs = [rows(1), rows(2, 10), rows(3, 20)]

    async def main() -> None:
        b, batches = make_inline(model)
        assert b.inline
        futs = [b.submit(r, r["x"].shape[0]) for r in reqs]
        assert batches == []  # runs at the end of this iteration, not inside submit
        for fut, r in zip(futs, reqs, strict=True):
            check(await fut, r)
        assert batches == [(3, 6)]
        assert not b.busy

    asyncio.run(main())
    assert model.calls == [6]


def test_inline_lone_request_does_not_wait() -> None:
    model = FakeModel()

    async def main() -> None:
        b, _ = make_inline(model)
        fut = b.submit(rows(2), 2)
        await asyncio.sleep(0)  # one loop iteration is all it takes
        assert fut.done()
        check(fut.result(), rows(2))

    asyncio.run(main())


def test_inline_respects_max_batch_rows_and_compatibility() -> None:
    model = FakeModel()
    reqs = [rows(3), rows(2, 10), rows(1, 20), rows(1, 30, width=3)]

    async def main() -> None:
        b, batches = make_inline(model, max_batch_rows=4)
        futs = [b.submit(r, r["x"].shape[0]) for r in reqs]
        for fut, r in zip(futs, reqs, strict=True):
            check(await fut, r)
        assert batches == [(1, 3), (2, 3), (1, 1)]

    asyncio.run(main())


def test_inline_failure_is_isolated_and_cancelled_requests_are_skipped() -> None:
    model = FakeModel()
    good1, bad, gone, good2 = rows(1, 1), rows(1, -1), rows(2, 5), rows(2, 9)

    async def main() -> None:
        b, batches = make_inline(model)
        f1, f_bad, f_gone, f2 = (b.submit(r, r["x"].shape[0]) for r in (good1, bad, gone, good2))
        f_gone.cancel()
        check(await f1, good1)
        check(await f2, good2)
        with pytest.raises(ValueError, match="negative input"):
            await f_bad
        assert batches == [(3, 4)]

    asyncio.run(main())
    assert model.calls == [4, 1, 1, 2]  # merged run failed, then one by one


def test_inline_max_delay_collects_requests_across_iterations() -> None:
    model = FakeModel()

    async def main() -> None:
        b, batches = make_inline(model, max_delay_s=0.2)
        fa = b.submit(rows(1), 1)
        await asyncio.sleep(0.01)
        assert batches == []
        fc = b.submit(rows(1, 3), 1)
        check(await fa, rows(1))
        check(await fc, rows(1, 3))
        assert batches == [(2, 2)]

    asyncio.run(main())


@pytest.mark.parametrize("inline", [False, True], ids=["executor", "inline"])
def test_outstanding_forgets_requests_whose_client_has_gone(
    executor: ThreadPoolExecutor, inline: bool
) -> None:
    """`outstanding` (how busy a shadow experiment's candidate is) counts submitted requests until
    they are delivered or dropped: a request cancelled while queued is never delivered, and an
    app-side counter of it (the old LoadedVersion.inflight) grew for good."""
    model = FakeModel()

    async def main() -> None:
        b, _batches = make_inline(model) if inline else make(model, executor)
        model.gate.clear()
        first = b.submit(rows(1), 1)
        gone = [b.submit(rows(1, 10 * i), 1) for i in range(5)]
        kept = b.submit(rows(2, 100), 2)
        assert b.outstanding == 7
        for fut in gone:
            fut.cancel()  # the clients hung up while their requests queued
        model.gate.set()
        await first
        await kept
        assert b.outstanding == 0

    asyncio.run(main())
