"""A response cache for one model version: identical inputs within a time window get the answer again.

Pure: numpy, hashlib and the standard library; no clock read behind the caller's back (`now` is
passed in, or the injected clock is used). One `ResponseCache` belongs to one loaded version (the
registry makes it at load when the model's config turns it on, and it goes with the version when
the version is unloaded), so answers are never shared across versions, whatever the keys.

Keys: `input_key` hashes (blake2b, 128 bits) the canonical form of a request's inputs -- each
input's name, dtype (with byte order), shape and raw buffer bytes, inputs in name order -- so the
same tensors sent as JSON or as binary give the same key, and tensors that differ in any of those
give different keys (1.0 as FP32 and as FP64 are different requests). BYTES (object) tensors are
hashed element by element, with each element's kind and length.

Values: the output tensors, copied when stored (the batcher's outputs are views of the whole
batch) and made read-only, so what a caller gets can neither change the entry nor keep a batch
alive. Bounds: `max_entries` and `max_bytes` (the outputs' bytes plus a fixed overhead per entry);
the least recently used entries go first. An entry lives `ttl_s` seconds from when its answer was
computed; a hit does not extend it. Expired entries are dropped when met (and counted as such).

Not thread-safe: every call happens on the event loop thread, as the rest of the serving path.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_ENTRIES",
    "ENTRY_OVERHEAD_BYTES",
    "CacheSettings",
    "ResponseCache",
    "input_key",
]

DEFAULT_MAX_ENTRIES = 1024
DEFAULT_MAX_BYTES = 16 * 1024 * 1024
# What an entry costs besides its arrays' buffers (the key, the dict, numpy's array headers):
# counted so that many tiny answers cannot exceed max_bytes unseen.
ENTRY_OVERHEAD_BYTES = 256
_KEY_BYTES = 16

Outputs = dict[str, np.ndarray]


@dataclass(frozen=True)
class CacheSettings:
    """The cache of one model: `ttl_s` > 0 turns it on."""

    ttl_s: float
    max_entries: int = DEFAULT_MAX_ENTRIES
    max_bytes: int = DEFAULT_MAX_BYTES

    def __post_init__(self) -> None:
        if not self.ttl_s > 0:  # also refuses NaN
            raise ValueError("ttl_s must be a positive number (a cache with no time window is off)")
        if self.max_entries < 1 or self.max_bytes < 1:
            raise ValueError("max_entries and max_bytes must be at least 1")


def _hash_objects(h: Any, arr: np.ndarray) -> None:
    for value in arr.ravel():
        if isinstance(value, str):
            raw = value.encode("utf-8", "surrogatepass")
            h.update(b"s%d:" % len(raw))
        elif isinstance(value, bytes | bytearray | memoryview):
            raw = bytes(value)
            h.update(b"b%d:" % len(raw))
        else:  # not what the OIP codec makes; hashed by its repr so it still never collides with text
            raw = repr(value).encode()
            h.update(b"r%d:" % len(raw))
        h.update(raw)


def input_key(inputs: Mapping[str, np.ndarray]) -> bytes:
    """The cache key of a request's inputs (16 bytes): equal exactly when every input has the same
    name, dtype, shape and bytes."""
    # Imported here, not with the module: hashlib brings OpenSSL's digests (0.7 MB resident), and
    # the serving path loads this module whether or not a model has a cache.
    import hashlib

    h = hashlib.blake2b(digest_size=_KEY_BYTES)
    for name in sorted(inputs) if len(inputs) > 1 else inputs:
        arr = inputs[name]
        h.update(f"{len(name)}:{name}{arr.dtype.str}{arr.shape}".encode())
        if arr.dtype.hasobject:
            _hash_objects(h, arr)
        elif arr.flags.c_contiguous:
            h.update(arr.data)
        else:
            h.update(np.ascontiguousarray(arr).data)
    return h.digest()


def _nbytes(arr: np.ndarray) -> int:
    size = int(arr.nbytes)
    if arr.dtype.hasobject:  # the pointers, plus what they point at
        size += sum(len(v) if isinstance(v, str | bytes) else 64 for v in arr.ravel())
    return size


def _frozen(arr: np.ndarray) -> np.ndarray:
    copy = np.array(arr, copy=True)
    copy.flags.writeable = False
    return copy


class _Entry:
    __slots__ = ("expires", "nbytes", "outputs")

    def __init__(self, outputs: Outputs, nbytes: int, expires: float) -> None:
        self.outputs = outputs
        self.nbytes = nbytes
        self.expires = expires


class ResponseCache:
    """The answers of one model version by input key: TTL, then least recently used by entries and bytes."""

    def __init__(
        self,
        model: str,
        version: int,
        settings: CacheSettings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model = model
        self.version = version
        self.settings = settings
        self.ttl_s = settings.ttl_s
        self.max_entries = settings.max_entries
        self.max_bytes = settings.max_bytes
        self.clock = clock
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self.bytes = 0
        # Counters (since the version was loaded).
        self.hits = 0
        self.misses = 0  # looked up, not there (or expired): the model answered
        self.bypassed = 0  # requests not looked up (parameters that may change the answer)
        self.evictions = 0  # entries dropped to stay within max_entries / max_bytes
        self.expired = 0  # entries dropped because their ttl had passed
        self.too_large = 0  # answers not stored: alone bigger than max_bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    def keys(self) -> Iterator[bytes]:
        """From the least to the most recently used."""
        return iter(self._entries)

    def get(self, key: bytes, now: float | None = None) -> Outputs | None:
        """The cached outputs (read-only arrays) for `key`, counted as a hit; else None, a miss."""
        entry = self._entries.get(key)
        if entry is not None:
            if (self.clock() if now is None else now) < entry.expires:
                self._entries.move_to_end(key)
                self.hits += 1
                return entry.outputs
            self._drop(key, entry)
            self.expired += 1
        self.misses += 1
        return None

    def put(self, key: bytes, outputs: Mapping[str, np.ndarray], now: float | None = None) -> bool:
        """Store a copy of `outputs` under `key`; False when it alone would not fit in max_bytes."""
        nbytes = ENTRY_OVERHEAD_BYTES + sum(_nbytes(a) for a in outputs.values())
        if nbytes > self.max_bytes:
            self.too_large += 1
            return False
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old.nbytes
        expires = (self.clock() if now is None else now) + self.ttl_s
        self._entries[key] = _Entry({k: _frozen(v) for k, v in outputs.items()}, nbytes, expires)
        self.bytes += nbytes
        entries = self._entries
        while len(entries) > self.max_entries or self.bytes > self.max_bytes:
            _, entry = entries.popitem(last=False)  # the least recently used
            self.bytes -= entry.nbytes
            self.evictions += 1
        return True

    def _drop(self, key: bytes, entry: _Entry) -> None:
        del self._entries[key]
        self.bytes -= entry.nbytes

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def status(self) -> dict[str, Any]:
        looked_up = self.hits + self.misses
        return {
            "ttl_s": self.ttl_s,
            "max_entries": self.max_entries,
            "max_bytes": self.max_bytes,
            "entries": len(self._entries),
            "bytes": self.bytes,
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": self.hits / looked_up if looked_up else None,
            "bypassed": self.bypassed,
            "evictions": self.evictions,
            "expired": self.expired,
            "too_large": self.too_large,
        }


def metric_families(caches: list[ResponseCache]) -> Iterator[Any]:
    """Prometheus metric families of these caches, by model and version (called at a scrape, once
    prometheus_client is imported: see agent.metrics.Metrics.collectors)."""
    from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

    labels = ["model", "version"]
    counters = [
        ("hits", "Inference requests answered from the response cache"),
        ("misses", "Inference requests looked up in the response cache and answered by the model"),
        ("evictions", "Response cache entries dropped to stay within its entries and bytes"),
        ("expired", "Response cache entries dropped because their time to live had passed"),
    ]
    gauges = [
        ("entries", "Answers held in the response cache"),
        ("bytes", "Bytes held in the response cache (outputs plus a fixed overhead per entry)"),
    ]
    families: list[tuple[str, Any]] = [
        (attr, CounterMetricFamily(f"outpost_cache_{attr}", text, labels=labels)) for attr, text in counters
    ]
    families += [
        (attr, GaugeMetricFamily(f"outpost_cache_{attr}", text, labels=labels)) for attr, text in gauges
    ]
    for cache in caches:
        values = [cache.model, str(cache.version)]
        for attr, family in families:
            value = len(cache) if attr == "entries" else getattr(cache, attr)
            family.add_metric(values, value)
    for _, family in families:
        yield family
