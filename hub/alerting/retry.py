"""When a delivery is tried again, and when the hub gives up. Pure: no I/O, no clock.

An attempt ends in one of three ways (`classify`):

- delivered: any 2xx answer;
- retry: no answer (connection refused or reset, DNS, TLS, timeout), 5xx, 408 or 429;
- permanent: any other answer (4xx: the webhook refuses this request and would refuse it again;
  3xx: redirects are not followed, a webhook URL should be the final one).

A retry waits `base_s * 2**(attempts - 1)` seconds, at most `max_backoff_s`, or longer when the
receiver's Retry-After asks (seconds or an HTTP date; at most `max_retry_after_s`). The hub gives
up - the delivery is recorded as failed with the last error - after `max_attempts` attempts or
when the next attempt would come more than `max_age_s` after the alert was queued.
"""

from __future__ import annotations

import email.utils
from dataclasses import dataclass
from datetime import datetime

DELIVERED, RETRY, PERMANENT = "delivered", "retry", "permanent"
RETRYABLE_STATUS = frozenset({408, 429})

DEFAULT_MAX_ATTEMPTS = 8
DEFAULT_BASE_S = 2.0
DEFAULT_MAX_BACKOFF_S = 300.0
DEFAULT_MAX_AGE_S = 86400.0
DEFAULT_MAX_RETRY_AFTER_S = 3600.0


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    base_s: float = DEFAULT_BASE_S
    max_backoff_s: float = DEFAULT_MAX_BACKOFF_S
    max_age_s: float = DEFAULT_MAX_AGE_S
    max_retry_after_s: float = DEFAULT_MAX_RETRY_AFTER_S

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("alert_max_attempts must be >= 1")
        if not (self.base_s > 0 and self.max_backoff_s >= self.base_s and self.max_age_s > 0):
            raise ValueError("alert_backoff_s must be > 0, alert_backoff_max_s >= it, alert_max_age_s > 0")

    def backoff(self, attempts: int) -> float:
        """The wait after the `attempts`-th failed attempt (1, 2, ...)."""
        return min(self.max_backoff_s, self.base_s * 2.0 ** min(max(attempts - 1, 0), 62))


@dataclass(frozen=True)
class Attempt:
    """What one POST came back with: a status (and Retry-After), or an error without one."""

    status: int | None
    error: str = ""
    retry_after: str | None = None


@dataclass(frozen=True)
class Step:
    """What to record after an attempt: the new state, when to try next (seconds from now, for
    `pending`) and the error to keep."""

    state: str  # "delivered" | "pending" | "failed"
    delay_s: float = 0.0
    error: str = ""


def classify(a: Attempt) -> str:
    if a.status is None:
        return RETRY
    if 200 <= a.status < 300:
        return DELIVERED
    if a.status >= 500 or a.status in RETRYABLE_STATUS:
        return RETRY
    return PERMANENT


def retry_after_s(value: str | None, now: datetime) -> float | None:
    """Retry-After in seconds from `now` (delta-seconds or an HTTP date); None if absent or bad."""
    if not value:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, (when - now).total_seconds())


def describe(a: Attempt) -> str:
    return a.error if a.status is None else f"HTTP {a.status}" + (f": {a.error}" if a.error else "")


def next_step(policy: RetryPolicy, attempts: int, age_s: float, a: Attempt, now: datetime) -> Step:
    """After the `attempts`-th attempt (counting this one) of a delivery queued `age_s` ago."""
    outcome = classify(a)
    if outcome == DELIVERED:
        return Step("delivered")
    error = describe(a)
    if outcome == PERMANENT:
        return Step("failed", error=f"{error} (not retried)")
    if attempts >= policy.max_attempts:
        return Step("failed", error=f"{error} (gave up after {attempts} attempts)")
    delay = policy.backoff(attempts)
    asked = retry_after_s(a.retry_after, now)
    if asked is not None:
        delay = max(delay, min(asked, policy.max_retry_after_s))
    if age_s + delay > policy.max_age_s:
        return Step("failed", error=f"{error} (gave up: older than {policy.max_age_s:g} s)")
    return Step("pending", delay, error)
