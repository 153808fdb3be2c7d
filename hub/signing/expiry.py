"""How long each role's signature is good for, and when the hub signs it again.

Devices refuse expired metadata, so a role is re-signed once less than `refresh_margin`
of its period is left: with the defaults the timestamp (1 day) is renewed when under 8
hours remain, leaving a hub that polls `refresh()` every few minutes a wide safety net.
Root and targets are offline roles: the running hub only reports that they need an
operator (see `RefreshReport.offline_expiring`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta

from hub.signing.layout import DEPLOY, MODELS, ROOT, SNAPSHOT, TARGETS, TIMESTAMP, is_group_role

Clock = Callable[[], datetime]
"""Returns the current time as an aware datetime; injected so tests can move time."""


def system_clock() -> datetime:
    return datetime.now(UTC)


def utc_now(clock: Clock) -> datetime:
    """The clock's time in UTC, whole seconds (TUF's `expires` has no fractions)."""
    now = clock()
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("the clock must return an aware datetime")
    return now.astimezone(UTC).replace(microsecond=0)


@dataclass(frozen=True)
class ExpiryPolicy:
    """Signature lifetime per role; `group` applies to every `group-<name>` role."""

    root: timedelta = timedelta(days=365)
    targets: timedelta = timedelta(days=365)
    models: timedelta = timedelta(days=90)
    deploy: timedelta = timedelta(days=90)
    group: timedelta = timedelta(days=90)
    snapshot: timedelta = timedelta(days=7)
    timestamp: timedelta = timedelta(days=1)
    refresh_margin: float = 1 / 3

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, timedelta) and value < timedelta(seconds=1):
                raise ValueError(f"expiry period of {f.name} must be at least one second, got {value}")
        if not 0 < self.refresh_margin < 1:
            raise ValueError(f"refresh_margin must be between 0 and 1, got {self.refresh_margin}")

    def period(self, role: str) -> timedelta:
        if is_group_role(role):
            return self.group
        periods = {
            ROOT: self.root,
            TARGETS: self.targets,
            MODELS: self.models,
            DEPLOY: self.deploy,
            SNAPSHOT: self.snapshot,
            TIMESTAMP: self.timestamp,
        }
        try:
            return periods[role]
        except KeyError:
            raise ValueError(f"no expiry period for role {role!r}") from None

    def expires(self, role: str, now: datetime) -> datetime:
        return now + self.period(role)

    def renew_at(self, role: str, expires: datetime) -> datetime:
        """When metadata of `role` that expires at `expires` should be signed again."""
        return expires - self.period(role) * self.refresh_margin
