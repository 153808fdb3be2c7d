"""The token buckets of hub.api.ratelimit, on a hand-driven clock."""

from __future__ import annotations

import pytest

from hub.api.ratelimit import RateLimiter, retry_after


def test_a_burst_then_the_rate() -> None:
    limiter = RateLimiter(rate_per_s=2.0, burst=3)
    assert [limiter.take("a", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a", 0.0) == pytest.approx(0.5)  # one token comes in 1/rate s
    assert limiter.take("a", 0.25) == pytest.approx(0.25)
    assert limiter.take("a", 0.5) == 0.0
    assert limiter.take("a", 0.5) == pytest.approx(0.5)
    assert limiter.take("a", 100.0) == 0.0  # refilled, but never past the burst
    assert [limiter.take("a", 100.0) for _ in range(3)] == [0.0, 0.0, pytest.approx(0.5)]


def test_keys_have_their_own_buckets() -> None:
    limiter = RateLimiter(rate_per_s=1.0, burst=1)
    assert limiter.take("a", 0.0) == 0.0
    assert limiter.take("a", 0.0) > 0
    assert limiter.take("b", 0.0) == 0.0


def test_peek_spends_nothing() -> None:
    limiter = RateLimiter(rate_per_s=1.0, burst=1)
    assert limiter.peek("a", 0.0) == 0.0
    assert limiter.peek("a", 0.0) == 0.0
    assert limiter.take("a", 0.0) == 0.0
    assert limiter.peek("a", 0.0) == pytest.approx(1.0)
    assert limiter.peek("a", 0.5) == pytest.approx(0.5)


def test_a_refused_request_spends_nothing() -> None:
    limiter = RateLimiter(rate_per_s=1.0, burst=1)
    limiter.take("a", 0.0)
    for _ in range(10):
        assert limiter.take("a", 0.5) == pytest.approx(0.5)
    assert limiter.take("a", 1.0) == 0.0


def test_rate_zero_is_off() -> None:
    limiter = RateLimiter(rate_per_s=0.0, burst=0)
    assert not limiter.enabled
    assert all(limiter.take("a", 0.0) == 0.0 for _ in range(1000))
    assert len(limiter) == 0


@pytest.mark.parametrize(("rate", "burst"), [(-1.0, 10), (1.0, 0)], ids=["negative-rate", "no-burst"])
def test_bad_settings(rate: float, burst: int) -> None:
    with pytest.raises(ValueError, match="rate_per_s"):
        RateLimiter(rate, burst)


def test_memory_is_bounded_full_buckets_forgotten_first() -> None:
    limiter = RateLimiter(rate_per_s=1.0, burst=2, max_keys=3)
    limiter.take("busy", 0.0)
    limiter.take("busy", 0.0)  # empty at t=0
    for i in range(10):
        limiter.take(f"once-{i}", 1.0)  # one token left each
    assert len(limiter) <= 3
    assert limiter.peek("busy", 1.0) == 0.0  # refilled to 1 by now: kept or not, it may go on
    limiter = RateLimiter(rate_per_s=0.001, burst=2, max_keys=3)
    limiter.take("busy", 0.0)
    limiter.take("busy", 0.0)
    for i in range(2):
        limiter.take(f"full-{i}", 0.0)
    limiter.take("full-2", 0.0)  # over max_keys: the oldest, "busy", goes (nothing is full)
    assert len(limiter) == 3


@pytest.mark.parametrize(("wait", "header"), [(0.01, "1"), (1.0, "1"), (1.2, "2"), (30.0, "30")])
def test_retry_after_is_whole_seconds(wait: float, header: str) -> None:
    assert retry_after(wait) == header


def test_the_readme_shows_the_limits_defaults() -> None:
    """README.md's "Request limits" block says what hub.settings defaults to."""
    import re
    import tomllib
    from pathlib import Path

    from hub.settings import HubSettings

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("### Request limits", 1)[1]
    block = re.search(r"```toml\n(.*?)```", section, re.S)
    assert block is not None
    shown = tomllib.loads(block.group(1))
    defaults = HubSettings(Path("."))
    assert shown == {key: getattr(defaults, key) for key in shown}
    assert set(shown) >= {"max_request_bytes", "max_header_bytes", "api_rate_per_s", "anon_rate_per_s"}


@pytest.mark.parametrize(
    "values",
    [{"max_request_bytes": 0}, {"max_upload_bytes": -1}, {"api_rate_per_s": -1.0}, {"anon_burst": 0}],
    ids=["no-body", "negative-upload", "negative-rate", "no-burst"],
)
def test_bad_limits_are_refused(values: dict[str, float]) -> None:
    from hub.api.guard import RequestLimits, Throttle

    with pytest.raises(ValueError, match=r"must be|rate_per_s"):
        Throttle(RequestLimits(**values))
