"""Polling for the next request for a few microseconds after an answer, instead of sleeping.

Why: with one client in a closed loop (an app asking, getting its answer, asking again), the
next request arrives a few tens of microseconds after the answer went out. If the event loop
blocks in epoll meanwhile, the CPU goes idle, and waking it again costs more than the agent's
own work on the request: on the 2-core KVM guest of docs/benchmarks.md (whose kernel has the
guest's own halt-polling off) about 35 µs of an 85 µs round trip. The kernel's cpuidle-haltpoll
driver does the same thing where it is on; this does it in the agent, where it is known when a
request is likely.

The cost is CPU time while nothing arrives, so the window adapts, as haltpoll's does: it
grows while requests arrive soon after an answer and shrinks to nothing when they do not.
With sparse traffic (a camera's 30 frames a second) it stops after a few requests; under
load the loop never idles and the poll costs one callback per loop iteration.
`server.busy_poll_us = 0` turns it off.

`PollWindow` is the rule (pure, times passed in); `BusyPoll` runs it on an event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any, Final

# Bound once (Final: a C static when compiled): `time.monotonic()` looks the attribute up per call.
_monotonic: Final = time.monotonic

# The window starts, and restarts after shrinking to nothing, at a quarter of its maximum.
START_FRACTION = 0.25
# Below this a window is not worth a loop iteration: it shrinks to 0 (off until a request
# arrives soon enough to make it grow again).
MIN_WINDOW_S = 5e-6


class PollWindow:
    """How long to poll after an answer, adapted to how soon requests follow answers.

    `answered(now)` after writing answers; `arrived(now)` when a request's bytes come in and
    the loop was not polling (it had slept). A request that arrives while polling needs no
    call: the poll worked, the window stays.
    """

    __slots__ = ("max_s", "window_s")

    def __init__(self, max_s: float) -> None:
        self.max_s = max_s
        self.window_s = max_s * START_FRACTION if max_s > 0 else 0.0

    def arrived_after_sleep(self, gap_s: float) -> None:
        """A request arrived `gap_s` after the last answer, with the loop asleep by then."""
        if self.max_s <= 0:
            return
        if gap_s <= self.max_s:
            # A longer window would have caught it: grow (from the start value when off).
            start = self.max_s * START_FRACTION
            self.window_s = min(self.max_s, max(self.window_s * 2, start))
        else:
            # Too far apart to be worth polling for: halve, and stop below the minimum.
            self.window_s /= 2
            if self.window_s < MIN_WINDOW_S:
                self.window_s = 0.0


class BusyPoll:
    """Keeps the event loop polling (epoll with a zero timeout) while the window is open.

    Polling is a callback that schedules itself with `call_soon`: while one is pending the loop
    does not block in epoll, so a request that arrives is read at once, by a CPU that did not
    go idle. `spent_s` adds up the time between poll callbacks when nothing arrived: CPU time
    that sleeping would not have used (the cost, exported as a metric).
    """

    __slots__ = (
        "_arrivals",
        "_deadline",
        "_last_answer",
        "_loop",
        "_seen",
        "_tick",
        "polling",
        "spent_s",
        "window",
    )

    def __init__(self, max_s: float, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.window = PollWindow(max_s)
        self._loop = loop
        self.polling = False
        self._deadline = 0.0
        self._last_answer = 0.0  # 0: the last answer's gap was judged already
        self._arrivals = 0  # requests that arrived while polling
        self._seen = 0  # _arrivals at the previous poll callback
        self._tick = 0.0  # time of the previous poll callback
        self.spent_s = 0.0

    def answered(self) -> None:
        """Answers were written: poll for the next request for the current window."""
        now = _monotonic()
        self._last_answer = now
        window = self.window.window_s
        if window <= 0:
            return
        self._deadline = now + window
        if not self.polling:
            self.polling = True
            self._tick = now
            self._seen = self._arrivals
            loop = self._loop or asyncio.get_running_loop()
            self._loop = loop
            loop.call_soon(self._poll)

    def arrived(self, now: float) -> None:
        """A request's bytes came in (`now` is time.monotonic())."""
        if self.polling:
            self._arrivals += 1  # the poll caught it
        elif self._last_answer:
            self.window.arrived_after_sleep(now - self._last_answer)
            self._last_answer = 0.0  # one verdict per answer

    def _poll(self) -> None:
        now = time.monotonic()
        if self._arrivals == self._seen:
            self.spent_s += now - self._tick
        self._seen = self._arrivals
        self._tick = now
        if now < self._deadline:
            assert self._loop is not None
            self._loop.call_soon(self._poll)
        else:
            self.polling = False

    def metric_families(self) -> Iterator[Any]:
        """Its cost and current window as Prometheus families (called at a scrape, once
        prometheus_client is imported: see agent.metrics.Metrics.collectors)."""
        from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

        yield CounterMetricFamily(
            "outpost_busy_poll_seconds",
            "Time the event loop polled for a request after an answer with nothing arriving "
            "(CPU time that sleeping would have saved; server.busy_poll_us)",
            value=self.spent_s,
        )
        yield GaugeMetricFamily(
            "outpost_busy_poll_window_seconds",
            "How long the agent now polls for the next request after an answer (adaptive, 0: not polling)",
            value=self.window.window_s,
        )
