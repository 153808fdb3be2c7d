"""Waiting for something a real process does: poll a check until it holds, or fail saying what."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_for(
    what: str,
    check: Callable[[], Any],
    timeout: float = 90.0,
    detail: Callable[[], Any] | None = None,
    every: float = 0.1,
) -> Any:
    """The first truthy value of `check()`; AssertionError naming `what` (and `detail()`, the
    state worth seeing when it fails) after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {detail() if detail else ''}")
        time.sleep(every)
    return value
