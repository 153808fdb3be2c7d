"""The busy poll after answers: the adaptive window (pure) and the poll on a real event loop."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from agent.serving.busypoll import MIN_WINDOW_S, START_FRACTION, BusyPoll, PollWindow

MAX = 100e-6


def test_starts_at_a_quarter_of_the_maximum() -> None:
    assert PollWindow(MAX).window_s == pytest.approx(MAX * START_FRACTION)


def test_off_stays_off() -> None:
    w = PollWindow(0.0)
    for gap in (1e-6, 50e-6, 1.0):
        w.arrived_after_sleep(gap)
    assert w.window_s == 0.0


def test_grows_to_the_maximum_while_requests_follow_soon() -> None:
    w = PollWindow(MAX)
    seen = []
    for _ in range(5):
        w.arrived_after_sleep(60e-6)  # later than the window, within the maximum
        seen.append(w.window_s)
    assert seen[0] == pytest.approx(2 * MAX * START_FRACTION)
    assert seen[-1] == pytest.approx(MAX)
    assert all(s <= MAX for s in seen)


def test_sparse_traffic_turns_it_off_and_close_traffic_back_on() -> None:
    w = PollWindow(MAX)
    steps = 0
    while w.window_s > 0:
        w.arrived_after_sleep(0.033)  # a camera's frames: 33 ms apart
        steps += 1
        assert steps < 10, "the window must reach zero in a few requests"
    assert w.window_s == 0.0
    # Halving stops below the minimum instead of going on for ever.
    assert steps == math.ceil(math.log2(MAX * START_FRACTION / MIN_WINDOW_S))
    w.arrived_after_sleep(30e-6)
    assert w.window_s == pytest.approx(MAX * START_FRACTION)


async def _spin_until(predicate: object, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline
        await asyncio.sleep(0.001)


def test_polls_for_the_window_then_stops() -> None:
    async def main() -> BusyPoll:
        poll = BusyPoll(MAX)
        poll.window.window_s = MAX
        started = time.monotonic()
        poll.answered()
        assert poll.polling
        await _spin_until(lambda: not poll.polling)
        assert time.monotonic() - started >= MAX
        return poll

    poll = asyncio.run(main())
    # Nothing arrived: the poll's time is all cost, about one window (loop iterations add a little).
    assert MAX * 0.5 <= poll.spent_s < 0.05


def test_a_request_caught_while_polling_keeps_the_window() -> None:
    async def main() -> BusyPoll:
        poll = BusyPoll(MAX)
        poll.window.window_s = MAX
        poll.answered()
        poll.arrived(time.monotonic())  # during the poll
        await _spin_until(lambda: not poll.polling)
        return poll

    poll = asyncio.run(main())
    assert poll.window.window_s == MAX


def test_one_verdict_per_answer() -> None:
    async def main() -> BusyPoll:
        poll = BusyPoll(MAX)
        poll.answered()
        await _spin_until(lambda: not poll.polling)
        now = time.monotonic()
        poll.arrived(now + 1.0)  # long after: shrink once
        poll.arrived(now + 2.0)  # more bytes of the same request: no second verdict
        return poll

    poll = asyncio.run(main())
    assert poll.window.window_s == pytest.approx(MAX * START_FRACTION / 2)


def test_off_never_schedules_anything() -> None:
    async def main() -> BusyPoll:
        poll = BusyPoll(0.0)
        poll.answered()
        return poll

    poll = asyncio.run(main())
    assert not poll.polling
    assert poll.spent_s == 0.0
