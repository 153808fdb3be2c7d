"""Token buckets keyed by who asks (an operator token's name, a client address).

    limiter = RateLimiter(rate_per_s=50.0, burst=200)
    wait = limiter.take("ci", now)      # 0.0: allowed (one token spent); else seconds to wait
    wait = limiter.peek("ci", now)      # the same answer without spending

A bucket holds at most `burst` tokens and gains `rate_per_s` a second; each request spends
one. A rate of 0 turns the limiter off (every call answers 0.0).

Pure: the caller passes the time (a monotonic clock). The state is in memory, so it is per
hub process: behind a load balancer with N hub processes a client gets up to N times the
rate. At most `max_keys` buckets are kept: beyond that, buckets that have filled up again
(which are the same as no bucket) are forgotten first, then the oldest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_MAX_KEYS = 10_000


@dataclass
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    def __init__(self, rate_per_s: float, burst: int, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        if rate_per_s < 0 or (rate_per_s > 0 and burst < 1):
            raise ValueError("a rate limit needs rate_per_s >= 0 and burst >= 1")
        self.rate = rate_per_s
        self.burst = float(burst)
        self.max_keys = max_keys
        self._buckets: dict[str, _Bucket] = {}

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def _refilled(self, key: str, now: float) -> _Bucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            return _Bucket(self.burst, now)
        tokens = min(self.burst, bucket.tokens + max(0.0, now - bucket.at) * self.rate)
        return _Bucket(tokens, now)

    def peek(self, key: str, now: float) -> float:
        """Seconds until `key` may make a request (0.0: now), spending nothing."""
        if not self.enabled:
            return 0.0
        bucket = self._refilled(key, now)
        return 0.0 if bucket.tokens >= 1.0 else (1.0 - bucket.tokens) / self.rate

    def take(self, key: str, now: float) -> float:
        """Spend one token of `key`'s bucket: 0.0, or the seconds to wait when it is empty."""
        if not self.enabled:
            return 0.0
        bucket = self._refilled(key, now)
        if bucket.tokens < 1.0:
            self._buckets[key] = bucket
            return (1.0 - bucket.tokens) / self.rate
        bucket.tokens -= 1.0
        self._buckets.pop(key, None)
        self._buckets[key] = bucket  # most recently used last
        if len(self._buckets) > self.max_keys:
            self._forget(now)
        return 0.0

    def _forget(self, now: float) -> None:
        for key in [k for k in self._buckets if self._refilled(k, now).tokens >= self.burst]:
            del self._buckets[key]
        while len(self._buckets) > self.max_keys:
            del self._buckets[next(iter(self._buckets))]

    def __len__(self) -> int:
        return len(self._buckets)


def retry_after(wait_s: float) -> str:
    """The Retry-After header's value: whole seconds, at least 1."""
    return str(max(1, math.ceil(wait_s)))
