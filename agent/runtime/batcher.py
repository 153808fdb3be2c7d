"""Micro-batching of concurrent requests to one model version.

Requests that arrive while the model is busy wait in a queue; when a run ends,
everything queued (up to `max_batch_rows`) goes to onnxruntime as one call and
the outputs are split back. With one client nothing waits: a request arriving
at an idle model runs at once (unless `max_delay_s` asks to wait for company).

Batching must never change results. The registry checks that at load (rows one
by one against the same rows as one batch) and disables batching for a version
whose results differ. A batch that fails is retried request by request, so one
bad request cannot fail the others it was batched with.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from typing import Final, Protocol

import numpy as np

log = logging.getLogger(__name__)
# Bound once (Final: a C static when compiled): `time.monotonic()` looks the attribute up per call.
_monotonic: Final = time.monotonic

Tensors = dict[str, np.ndarray]
RunFn = Callable[[Mapping[str, np.ndarray]], Tensors]
# A batch that ran as one onnxruntime call: its inputs (concatenated) and its outputs.
BatchArrays = tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray]]


class BatchItem(Protocol):
    """One request of a batch, as a `BatchObserver` sees it."""

    @property
    def ticket(self) -> Ticket: ...

    @property
    def size(self) -> int: ...  # its rows

    @property
    def inputs(self) -> Mapping[str, np.ndarray]: ...


# Told of every batch after its answers were delivered, on the loop thread: its requests, their
# outcomes, and the batch's arrays (None when it ran request by request). The outcomes are None
# when several requests shared one call: each one's are then its rows of the outputs, `rows_of`
# gives them to whoever needs them. Handed over as they are, with no list built for it: the
# hand-over is on the serving path.
BatchObserver = Callable[
    [Sequence[BatchItem], "Sequence[Tensors | BaseException] | None", "BatchArrays | None"], None
]


def rows_of(outputs: Mapping[str, np.ndarray], start: int, count: int) -> Tensors:
    """The outcome of a request whose `count` rows start at row `start` of a batch's outputs."""
    return {name: arr[start : start + count] for name, arr in outputs.items()}


class _Item:
    """One queued request. A plain class: compiled, a dataclass's generated __init__ stays
    interpreted, and one is made per request."""

    __slots__ = ("inputs", "key", "rows", "size", "ticket")

    def __init__(
        self,
        inputs: Mapping[str, np.ndarray],
        rows: int,
        ticket: Ticket,
        key: tuple[object, ...] = (),
        size: int = 1,
    ) -> None:
        self.inputs = inputs
        self.rows = rows  # rows in the batch dimension; -1 when this request must run alone
        self.ticket = ticket
        self.key = key
        self.size = size  # rows it carries, for accounting and metrics, batchable or not


class BatchOutputs:
    """The outputs of a batch that ran as one onnxruntime call, handed to each of its tickets with
    where the ticket's rows start in them. `rendered` keeps what the serving layer works out once
    per batch instead of once per answer (agent.serving.oip.JsonRows: every row's JSON text).

    A ticket's own outcome (a dict of views of its rows) is made only by a ticket that needs it:
    a JSON answer is cut from `rendered` without it."""

    __slots__ = ("arrays", "rendered")

    def __init__(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.arrays = arrays
        self.rendered: object = None

    def rows(self, start: int, count: int) -> Tensors:
        return rows_of(self.arrays, start, count)


def outcome_of(
    outcome: Tensors | BaseException | None, batch: BatchOutputs | None, start: int, count: int
) -> Tensors | BaseException:
    """What `Ticket.deliver` was given, as the request's outcome."""
    if outcome is not None:
        return outcome
    assert batch is not None  # the Ticket contract: no outcome only with the batch's outputs
    return batch.rows(start, count)


class Ticket(Protocol):
    """Who waits for one request's outcome. `deliver` is called once, on the loop thread. When the
    request shared a call with others, with no outcome but the batch's outputs and where the
    request's `count` rows start in them (`outcome_of` makes the outcome); else with the outcome,
    batch None."""

    @property
    def cancelled(self) -> bool: ...

    @property
    def prediction_id(self) -> str | None: ...

    @property
    def prediction_seq(self) -> int: ...  # the counter of an id the agent made, else -1

    def deliver(
        self, outcome: Tensors | BaseException | None, batch: BatchOutputs | None, start: int, count: int
    ) -> None: ...


class FutureTicket:
    """A Ticket that completes an asyncio future (for callers that want to await)."""

    __slots__ = ("future",)
    prediction_id = None
    prediction_seq = -1

    def __init__(self, future: asyncio.Future[Tensors]) -> None:
        self.future = future

    @property
    def cancelled(self) -> bool:
        return self.future.cancelled()

    def deliver(
        self, outcome: Tensors | BaseException | None, batch: BatchOutputs | None, start: int, count: int
    ) -> None:
        if self.future.cancelled():
            return
        result = outcome_of(outcome, batch, start, count)
        if isinstance(result, BaseException):
            self.future.set_exception(result)
        else:
            self.future.set_result(result)


def _compat_key(inputs: Mapping[str, np.ndarray]) -> tuple[object, ...]:
    # Requests can share a batch only when every input has the same dtype and
    # the same dimensions after the first.
    return tuple((name, arr.dtype.str, arr.shape[1:]) for name, arr in inputs.items())


def run_batch(
    run: RunFn, batch: list[Mapping[str, np.ndarray]], rows: list[int]
) -> list[Tensors | BaseException]:
    """Run several requests as one onnxruntime call; fall back to one by one on failure."""
    results, arrays = run_batch_arrays(run, batch, rows)
    if results is not None:
        return results
    assert arrays is not None
    outs: list[Tensors | BaseException] = []
    start = 0
    for n in rows:
        outs.append(rows_of(arrays[1], start, n))
        start += n
    return outs


def run_batch_arrays(
    run: RunFn, batch: list[Mapping[str, np.ndarray]], rows: list[int]
) -> tuple[list[Tensors | BaseException] | None, BatchArrays | None]:
    """`run_batch`, and the batch's own inputs and outputs when it ran as one call (None otherwise).

    When several requests ran as one call the outcomes are None: each request's are its rows of
    the outputs (`rows_of`), made only where needed (a JSON answer is cut from the batch's text)."""
    if len(batch) == 1:
        try:
            out = run(batch[0])
        except Exception as exc:
            return [exc], None
        return [out], (batch[0], out)
    try:
        merged = {name: np.concatenate([b[name] for b in batch]) for name in batch[0]}
        out = run(merged)
        total = sum(rows)
        if all(arr.ndim > 0 and arr.shape[0] == total for arr in out.values()):
            return None, (merged, out)
    except Exception:
        pass
    results: list[Tensors | BaseException] = []
    for item in batch:
        try:
            results.append(run(item))
        except Exception as exc:
            results.append(exc)
    return results, None


class Batcher:
    """Queues requests for one model version and runs them in batches on an executor."""

    def __init__(
        self,
        run: RunFn,
        executor: Executor | None,
        *,
        enabled: bool,
        max_batch_rows: int,
        max_delay_s: float = 0.0,
        max_inflight: int = 1,
        on_batch: Callable[[int, int], None] | None = None,
        uniform: bool = False,
    ) -> None:
        self._run = run
        self._executor = executor
        self.enabled = enabled
        self.max_batch_rows = max_batch_rows
        self.max_delay_s = max_delay_s
        self.max_inflight = max_inflight
        self._on_batch = on_batch
        # True when the model fixes every dimension after the first and the
        # server has checked each request against that signature: all batchable
        # requests are then compatible and need no per-request key.
        self._uniform = uniform
        self._queue: deque[_Item] = deque()
        self._queued_rows = 0
        self._inflight = 0
        # Requests submitted and neither delivered nor dropped (their client gone): how busy the
        # version is, as a shadow experiment judges it. Kept here, where a cancelled request is
        # dropped, so nothing outside has to learn of it.
        self.outstanding = 0
        self._timer: asyncio.TimerHandle | None = None
        self._inline_scheduled = False
        self.observer: BatchObserver | None = None  # the monitor's, when it watches this version
        # time.monotonic() of the last request (or of the start): the memory budget evicts the
        # least recently used versions first (agent.runtime.budget).
        self.last_used = time.monotonic()

    @property
    def inline(self) -> bool:
        """True when batches run on the event loop thread instead of the executor."""
        return self._executor is None

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def busy(self) -> bool:
        return self._inflight > 0 or bool(self._queue)

    def submit(self, inputs: Mapping[str, np.ndarray], rows: int) -> asyncio.Future[Tensors]:
        """Queue a request; the future completes with its outputs."""
        future: asyncio.Future[Tensors] = asyncio.get_running_loop().create_future()
        self.submit_ticket(inputs, rows, FutureTicket(future))
        return future

    def submit_ticket(self, inputs: Mapping[str, np.ndarray], rows: int, ticket: Ticket) -> None:
        """Queue a request; `ticket.deliver` gets its outputs or its exception.

        The serving path uses this rather than futures: no future, no extra
        loop iteration between the run and the response.
        """
        self.last_used = _monotonic()
        batchable = self.enabled and 0 < rows <= self.max_batch_rows
        key = _compat_key(inputs) if batchable and not self._uniform else ()
        size = max(rows, 1)
        self._queue.append(_Item(inputs, rows if batchable else -1, ticket, key, size))
        self._queued_rows += size
        self.outstanding += 1
        # The loop is looked up only where it is used: once per batch, not per request
        # (asyncio.get_running_loop() makes a getpid system call each time).
        if self._executor is None:
            # Inline: run at the end of this loop iteration, so every request that
            # arrived in the same read burst (on any connection) shares one call.
            if not self._inline_scheduled:
                self._inline_scheduled = True
                loop = asyncio.get_running_loop()
                if self.max_delay_s > 0 and batchable:
                    loop.call_later(self.max_delay_s, self._run_inline)
                else:
                    loop.call_soon(self._run_inline)
        elif self._inflight < self.max_inflight:
            if self.max_delay_s > 0 and batchable and self._queued_rows < self.max_batch_rows:
                if self._timer is None:
                    self._timer = asyncio.get_running_loop().call_later(self.max_delay_s, self._on_timer)
            else:
                self._dispatch()

    def _run_inline(self) -> None:
        self._inline_scheduled = False
        while self._queue:
            items = self._take_live()
            if not items:
                continue
            if self._on_batch is not None:
                self._on_batch(len(items), sum(i.size for i in items))
            outcomes, arrays = run_batch_arrays(self._run, [i.inputs for i in items], [i.rows for i in items])
            self._deliver(items, outcomes, arrays)

    def _on_timer(self) -> None:
        self._timer = None
        self._dispatch()

    def _take_live(self) -> list[_Item]:
        """The next batch, without the requests whose client has gone (dropped: never delivered)."""
        taken = self._take()
        items = [i for i in taken if not i.ticket.cancelled]
        self.outstanding -= len(taken) - len(items)
        return items

    def _take(self) -> list[_Item]:
        first = self._queue.popleft()
        taken = [first]
        if first.rows > 0:
            total = first.rows
            while self._queue:
                nxt = self._queue[0]
                if nxt.rows <= 0 or nxt.key != first.key or total + nxt.rows > self.max_batch_rows:
                    break
                taken.append(self._queue.popleft())
                total += nxt.rows
        self._queued_rows -= sum(i.size for i in taken)
        return taken

    def _dispatch(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        loop = asyncio.get_running_loop()
        executor = self._executor
        assert executor is not None
        while self._queue and self._inflight < self.max_inflight:
            items = self._take_live()
            if not items:
                continue
            self._inflight += 1
            if self._on_batch is not None:
                self._on_batch(len(items), sum(i.size for i in items))
            work = loop.run_in_executor(
                executor,
                run_batch_arrays,
                self._run,
                [i.inputs for i in items],
                [i.rows for i in items],
            )
            work.add_done_callback(lambda w, items=items: self._finish(w, items))  # type: ignore[misc]

    def _finish(
        self,
        work: asyncio.Future[tuple[list[Tensors | BaseException] | None, BatchArrays | None]],
        items: list[_Item],
    ) -> None:
        self._inflight -= 1
        exc = work.exception()
        if exc is not None:
            outcomes: list[Tensors | BaseException] | None = [exc] * len(items)
            arrays = None
        else:
            outcomes, arrays = work.result()
        self._deliver(items, outcomes, arrays)
        if self._queue:
            self._dispatch()

    def _deliver(
        self, items: list[_Item], outcomes: list[Tensors | BaseException] | None, arrays: BatchArrays | None
    ) -> None:
        self.outstanding -= len(items)
        if outcomes is None:
            # One call's outputs, shared by its requests (each gets them with where its rows
            # start): what is worked out from them once serves every answer.
            assert arrays is not None
            shared = BatchOutputs(arrays[1])
            start = 0
            for item in items:
                if not item.ticket.cancelled:
                    item.ticket.deliver(None, shared, start, item.rows)
                start += item.rows
        else:
            for item, outcome in zip(items, outcomes, strict=True):
                if not item.ticket.cancelled:
                    item.ticket.deliver(outcome, None, 0, item.size)
        observer = self.observer
        if observer is not None:  # after the answers: watching never delays them
            try:
                observer(items, outcomes, arrays)
            except Exception:  # the monitor's failure is its own; the batcher goes on
                log.exception("batch observer failed")
