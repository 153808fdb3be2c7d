"""agent.serving.jsonrows: a batch's JSON answers, cut from text rendered once per batch.

Each answer must be byte for byte what the per-answer encoder writes for the same rows, for every
datatype orjson writes as numbers, any shape after the rows, any split of the batch into
requests, and ids and names that need escaping. What it cannot write, it declines (None).
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from agent.runtime.batcher import Batcher, BatchOutputs, Tensors, outcome_of
from agent.serving.jsonrows import JsonRows
from agent.serving.oip import encode_infer_response

ROWS = 7
SPLITS = [[1] * ROWS, [3, 1, 2, 1], [ROWS]]


def _numbers(dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(sum(shape))
    if np.dtype(dtype).kind == "b":
        return rng.random(shape) < 0.5
    if np.dtype(dtype).kind in "iu":
        info = np.iinfo(dtype)
        extremes = np.array([info.min, info.max, 0], dtype=dtype)
        arr = rng.integers(0, min(info.max, 1000), size=shape).astype(dtype)
        flat = arr.reshape(-1)
        flat[: extremes.size] = extremes[: flat.size]
        return arr
    arr = (rng.standard_normal(shape) * 1e3).astype(dtype)
    flat = arr.reshape(-1)
    flat[:4] = np.array([np.nan, np.inf, -np.inf, 1e-7])[: flat.size]  # written as null, and tiny
    return arr


OUTPUTS: dict[str, dict[str, np.ndarray]] = {
    "classifier": {
        "label": _numbers(np.int64, (ROWS,)),
        "probabilities": _numbers(np.float32, (ROWS, 2)),
    },
    "wide": {"y": _numbers(np.float64, (ROWS, 5))},
    "three-d": {"y": _numbers(np.float32, (ROWS, 2, 3)), "z": _numbers(np.int8, (ROWS, 1, 1, 2))},
    "small types": {
        "a": _numbers(np.float16, (ROWS, 3)),
        "b": _numbers(np.uint64, (ROWS,)),
        "c": _numbers(np.bool_, (ROWS, 2)),
        "d": _numbers(np.uint8, (ROWS, 4)),
        "e": _numbers(np.int32, (ROWS, 1)),
    },
}


@pytest.mark.parametrize("outputs", list(OUTPUTS.values()), ids=list(OUTPUTS))
@pytest.mark.parametrize("split", SPLITS, ids=["singles", "mixed", "one request"])
@pytest.mark.parametrize(
    ("model", "request_id"),
    [("bench-tabular", "1a2b"), ('mo"del\\ü', 'id "quoted"\n\t\u2028 é')],
    ids=["plain", "escaped"],
)
def test_each_answer_is_what_the_per_answer_encoder_writes(
    outputs: dict[str, np.ndarray], split: list[int], model: str, request_id: str
) -> None:
    rendered = JsonRows(model, "12", outputs)
    start = 0
    for count in split:
        rows = {name: arr[start : start + count] for name, arr in outputs.items()}
        expected, header_len = encode_infer_response(model, "12", request_id, rows, None, False)
        assert header_len is None
        assert rendered.answer(request_id, start, count) == expected
        start += count
    assert start == ROWS


@pytest.mark.parametrize(
    "outputs",
    [
        {"label": np.array(["a", "b"], dtype=object), "p": np.zeros((2, 2), np.float32)},  # BYTES
        {"y": np.zeros((2, 0), np.float32)},  # no numbers in a row
        {"total": np.array(3.0, np.float32)},  # no rows at all
    ],
    ids=["bytes", "empty rows", "scalar"],
)
def test_outputs_it_cannot_cut_are_declined(outputs: dict[str, np.ndarray]) -> None:
    assert JsonRows("m", "1", outputs).answer("x", 0, 1) is None


class _Recorder:
    """A ticket that keeps what the batcher hands it."""

    cancelled = False
    prediction_id = None
    prediction_seq = -1

    def __init__(self) -> None:
        self.got: list[tuple[Tensors | BaseException | None, BatchOutputs | None, int, int]] = []

    def deliver(
        self, outcome: Tensors | BaseException | None, batch: BatchOutputs | None, start: int, count: int
    ) -> None:
        self.got.append((outcome, batch, start, count))


def test_the_batcher_hands_each_request_the_shared_outputs_and_its_first_row() -> None:
    """Requests that shared a call get the same BatchOutputs, where their rows start and how many,
    and no outcome (it is those rows, cut out by whoever needs them). A request that ran alone
    gets its outcome and no BatchOutputs."""

    def model(inputs: Any) -> dict[str, np.ndarray]:
        return {"y": inputs["x"] * 2}

    sizes = [1, 3, 2]
    tickets = [_Recorder() for _ in [*sizes, 1]]

    async def main() -> None:
        b = Batcher(model, None, enabled=True, max_batch_rows=6)
        for k, (n, t) in enumerate(zip(sizes, tickets, strict=False)):
            b.submit_ticket({"x": np.full((n, 2), k, np.float32)}, n, t)
        await asyncio.sleep(0)
        b.submit_ticket({"x": np.ones((1, 2), np.float32)}, 1, tickets[-1])  # alone in its batch
        await asyncio.sleep(0)

    asyncio.run(main())
    shared = {id(t.got[0][1]) for t in tickets[:3]}
    assert len(shared) == 1
    start = 0
    for k, (n, t) in enumerate(zip(sizes, tickets, strict=False)):
        [(outcome, batch, first, count)] = t.got
        assert batch is not None and outcome is None
        assert (first, count) == (start, n)
        mine = outcome_of(outcome, batch, first, count)
        assert not isinstance(mine, BaseException)
        np.testing.assert_array_equal(mine["y"], np.full((n, 2), 2 * k, np.float32))
        start += n
    [(alone_outcome, alone, _start, _count)] = tickets[-1].got
    assert alone is None and not isinstance(alone_outcome, BaseException) and alone_outcome is not None
    np.testing.assert_array_equal(alone_outcome["y"], np.full((1, 2), 2, np.float32))
