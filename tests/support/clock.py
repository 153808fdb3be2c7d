"""A clock the fleet tests set by hand: the hub's stores take `clock=` (a callable giving an
aware datetime), so retention and alert windows are tested without waiting."""

from __future__ import annotations

from datetime import UTC, datetime


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2024, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now
