"""The response cache (agent.runtime.cache): keys, time to live, LRU bounds, read-only answers."""

from __future__ import annotations

import numpy as np
import pytest

from agent.runtime.cache import ENTRY_OVERHEAD_BYTES, CacheSettings, ResponseCache, input_key


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _cache(ttl: float = 10.0, entries: int = 100, nbytes: int = 1 << 20) -> tuple[ResponseCache, Clock]:
    clock = Clock()
    return ResponseCache("m", 1, CacheSettings(ttl, entries, nbytes), clock), clock


def _out(value: float, n: int = 1) -> dict[str, np.ndarray]:
    return {"y": np.full((n,), value, np.float32)}


X = np.arange(4, dtype=np.float32).reshape(1, 4)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        pytest.param({"x": X}, {"x": X.astype(np.float64)}, id="dtype"),
        pytest.param({"x": X}, {"x": X.reshape(2, 2)}, id="shape"),
        pytest.param({"x": X}, {"x": X.reshape(4)}, id="rank"),
        pytest.param({"x": X}, {"z": X}, id="name"),
        pytest.param({"x": X}, {"x": X + np.float32(1e-6)}, id="bytes"),
        pytest.param({"x": X}, {"x": X.astype(">f4")}, id="byte order"),
        pytest.param({"x": X}, {"x": X, "z": X}, id="one more input"),
        pytest.param({"a": X[:, :2], "b": X[:, 2:]}, {"a": X[:, :3], "b": X[:, 3:]}, id="split point"),
        pytest.param({"ab": X}, {"a": X}, id="name prefix"),
        pytest.param(
            {"s": np.array(["ab", "c"], dtype=object)},
            {"s": np.array(["a", "bc"], dtype=object)},
            id="text split",
        ),
        pytest.param(
            {"s": np.array(["a"], dtype=object)}, {"s": np.array([b"a"], dtype=object)}, id="str vs bytes"
        ),
    ],
)
def test_keys_differ(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert input_key(a) != input_key(b)


def test_keys_equal_for_equal_tensors_however_made() -> None:
    json_like = {"x": np.array([[0.0, 1.0, 2.0, 3.0]], dtype=np.float32)}
    binary_like = {"x": np.frombuffer(X.tobytes(), dtype="<f4").reshape(1, 4)}
    assert input_key(json_like) == input_key(binary_like) == input_key({"x": X})
    # Input order does not matter; a non-contiguous view hashes like its copy.
    two = {"a": X, "b": X * 2}
    assert input_key(two) == input_key({"b": X * 2, "a": X})
    wide = np.arange(8, dtype=np.float32).reshape(2, 4)
    assert input_key({"x": wide[:, ::2]}) == input_key({"x": np.ascontiguousarray(wide[:, ::2])})
    strings = {"s": np.array(["héllo", "w"], dtype=object)}
    assert input_key(strings) == input_key({"s": np.array(["héllo", "w"], dtype=object)})
    assert len(input_key(strings)) == 16


def test_hit_returns_a_read_only_copy() -> None:
    cache, _ = _cache()
    batch = np.arange(6, dtype=np.float32)
    view = {"y": batch[2:4]}  # as the batcher hands out a request's slice of the batch
    key = input_key({"x": X})
    assert cache.get(key) is None
    assert cache.put(key, view)
    batch[:] = -1  # the batch's buffer is reused or changed: the entry is not
    got = cache.get(key)
    assert got is not None
    assert got["y"].tolist() == [2.0, 3.0]
    assert not got["y"].flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        got["y"][0] = 7
    assert got["y"].base is None or got["y"].base is not batch
    assert (cache.hits, cache.misses) == (1, 1)


def test_ttl_expiry_counts_a_miss_and_is_not_extended_by_hits() -> None:
    cache, clock = _cache(ttl=10.0)
    cache.put(b"k", _out(1.0))
    clock.now += 9.9
    assert cache.get(b"k") is not None  # a hit does not extend the entry's life
    clock.now += 0.1
    assert cache.get(b"k") is None
    assert (cache.hits, cache.misses, cache.expired, len(cache), cache.bytes) == (1, 1, 1, 0, 0)
    cache.put(b"k", _out(2.0))  # stored again: a fresh window
    clock.now += 5
    got = cache.get(b"k")
    assert got is not None and got["y"][0] == 2.0


def test_lru_by_entries() -> None:
    cache, _ = _cache(entries=3)
    for k in (b"a", b"b", b"c"):
        cache.put(k, _out(1.0))
    assert cache.get(b"a") is not None  # a is now the most recently used
    cache.put(b"d", _out(1.0))
    assert list(cache.keys()) == [b"c", b"a", b"d"]
    assert b"b" not in cache
    assert cache.evictions == 1 and len(cache) == 3


def test_lru_by_bytes() -> None:
    entry = ENTRY_OVERHEAD_BYTES + 100 * 4  # 100 float32
    cache, _ = _cache(entries=100, nbytes=3 * entry)
    for k in (b"a", b"b", b"c"):
        cache.put(k, _out(1.0, 100))
    assert cache.bytes == 3 * entry
    cache.get(b"a")
    cache.put(b"d", _out(1.0, 150))  # needs room for 1.5 entries: b and c go
    assert list(cache.keys()) == [b"a", b"d"]
    assert cache.evictions == 2
    assert cache.bytes == 2 * entry + 50 * 4 <= cache.max_bytes


def test_answer_bigger_than_the_cache_is_not_stored() -> None:
    cache, _ = _cache(nbytes=ENTRY_OVERHEAD_BYTES + 40)
    cache.put(b"small", _out(1.0, 10))
    assert not cache.put(b"big", _out(1.0, 11))
    assert list(cache.keys()) == [b"small"] and cache.too_large == 1 and cache.evictions == 0


def test_replacing_a_key_keeps_the_byte_count_right() -> None:
    cache, _ = _cache()
    cache.put(b"k", _out(1.0, 10))
    cache.put(b"k", _out(2.0, 20))
    assert len(cache) == 1 and cache.bytes == ENTRY_OVERHEAD_BYTES + 80


def test_versions_never_mixed() -> None:
    """One cache per loaded version: an answer stored by version 1 is not in version 2's cache,
    even for the same input key."""
    clock = Clock()
    v1 = ResponseCache("m", 1, CacheSettings(60.0), clock)
    v2 = ResponseCache("m", 2, CacheSettings(60.0), clock)
    key = input_key({"x": X})
    v1.put(key, _out(1.0))
    assert v2.get(key) is None
    v2.put(key, _out(2.0))
    one, two = v1.get(key), v2.get(key)
    assert one is not None and two is not None
    assert (one["y"][0], two["y"][0]) == (1.0, 2.0)


def test_status_and_settings() -> None:
    cache, _ = _cache()
    cache.put(b"k", _out(1.0))
    cache.get(b"k")
    cache.get(b"x")
    doc = cache.status()
    assert doc["hits"] == 1 and doc["misses"] == 1 and doc["hit_rate"] == 0.5 and doc["entries"] == 1
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="ttl_s"):
            CacheSettings(bad)
    with pytest.raises(ValueError, match="max_entries"):
        CacheSettings(1.0, 0)


def test_metric_families() -> None:
    from agent.runtime.cache import metric_families

    cache, _ = _cache()
    cache.put(b"k", _out(1.0))
    cache.get(b"k")
    families = {f.name: f for f in metric_families([cache])}
    assert families["outpost_cache_hits"].samples[0].value == 1
    assert families["outpost_cache_hits"].samples[0].labels == {"model": "m", "version": "1"}
    assert families["outpost_cache_entries"].samples[0].value == 1
    assert set(families) >= {
        "outpost_cache_misses",
        "outpost_cache_evictions",
        "outpost_cache_bytes",
        "outpost_cache_expired",
    }


# -- configuration ------------------------------------------------------------------------------


def test_config_default_per_model_and_off_by_default() -> None:
    from agent.config import parse_config

    cfg = parse_config({})
    assert cfg.runtime.cache_settings("wine") == (0.0, 1024, 16 * 1024 * 1024)
    cfg = parse_config(
        {
            "runtime": {
                "cache_ttl_s": 5,
                "cache_max_bytes": 4096,
                "models": {"wine": {"cache_ttl_s": 0}, "iris": {"cache_max_entries": 3}},
            }
        }
    )
    assert cfg.runtime.cache_settings("wine") == (0.0, 1024, 4096)
    assert cfg.runtime.cache_settings("iris") == (5.0, 3, 4096)
    assert cfg.runtime.cache_settings("other") == (5.0, 1024, 4096)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        pytest.param({"cache_ttl_s": -1}, "runtime.cache_ttl_s: must be a number of seconds", id="ttl<0"),
        pytest.param({"cache_ttl_s": float("nan")}, "runtime.cache_ttl_s", id="ttl nan"),
        pytest.param({"cache_max_entries": 0}, "runtime.cache_max_entries: must be at least 1", id="entries"),
        pytest.param({"cache_max_bytes": 0}, "runtime.cache_max_bytes: must be at least 1", id="bytes"),
        pytest.param({"cache_ttl_s": "5"}, "runtime.cache_ttl_s: expected a number", id="type"),
        pytest.param(
            {"models": {"wine": {"cache_ttl_s": -0.5}}}, "runtime.models.wine.cache_ttl_s", id="per-model ttl"
        ),
        pytest.param(
            {"models": {"wine": {"cache_max_bytes": -1}}},
            "runtime.models.wine.cache_max_bytes",
            id="per-model bytes",
        ),
        pytest.param(
            {"models": {"wine": {"cache_ttl": 5}}}, "unknown key runtime.models.wine.cache_ttl", id="typo"
        ),
    ],
)
def test_config_errors_name_the_key(doc: dict[str, object], message: str) -> None:
    from agent.config import parse_config
    from agent.errors import ConfigError

    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        parse_config({"runtime": doc})


# -- the monitor's window -----------------------------------------------------------------------


def test_summary_window_counts_hits_and_misses_and_windows_add_up() -> None:
    from agent.monitor.summary import merge
    from tests.agent.test_monitor_service import feed, loaded, monitor

    mon, clock, out = monitor()
    lv = loaded()
    lv.cache = ResponseCache("m", 1, CacheSettings(600.0), clock)
    mon.attach(lv)
    x = np.random.default_rng(3).standard_normal((8, 3)).astype(np.float32)
    for i in range(3):  # three misses, answered by the model
        assert lv.cache.get(b"%d" % i) is None
        lv.cache.put(b"%d" % i, {"y": x[i]})
    for i in range(5):  # five hits
        assert lv.cache.get(b"%d" % (i % 3)) is not None
    feed(lv, x)  # all eight are requests the version answered, each seen by the observer
    clock.t += 61
    mon.tick()
    (first,) = out.of("summary")
    assert first["requests"] == 8 and first["rows"] == 8
    assert first["cache"] == {"hits": 5, "misses": 3}
    lv.cache.get(b"0")
    feed(lv, x[:1])
    clock.t += 61
    mon.tick()
    second = out.of("summary")[1]
    assert second["cache"] == {"hits": 1, "misses": 0}
    assert merge(first, second)["cache"] == {"hits": 6, "misses": 3}
    assert merge(first, {**second, "cache": None})["cache"] == {"hits": 5, "misses": 3}


def test_summary_window_without_a_cache_says_null() -> None:
    from tests.agent.test_monitor_service import feed, loaded, monitor

    mon, clock, out = monitor()
    lv = loaded()
    mon.attach(lv)
    feed(lv, np.zeros((2, 3), np.float32))
    clock.t += 61
    mon.tick()
    assert out.of("summary")[0]["cache"] is None


def test_status_cli_shows_a_versions_cache(capsys: pytest.CaptureFixture[str]) -> None:
    from agent.cli import _print_status

    cache, _ = _cache()
    cache.put(b"k", _out(1.0))
    cache.get(b"k")
    version = {"version": 1, "state": "ready", "default": True, "batching": "on", "cache": cache.status()}
    _print_status({"models": [{"name": "m", "default_version": 1, "pinned": None, "versions": [version]}]})
    assert (
        "response cache: 1 entries, 260 bytes, 1 hits, 0 misses (100.0% hits), ttl 10.0 s"
        in capsys.readouterr().out
    )
