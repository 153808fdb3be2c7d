"""The response cache's counts at the hub: summed across devices, a hit rate in the derived figures
and a line in `outpost fleet summary` (the device side is tests/agent/test_cache.py)."""

from __future__ import annotations

import io
from typing import Any

import pytest

from agent.monitor.summary import merge
from hub.fleet.aggregate import derived
from hub.hub_commands import summary_text

BOUNDS = [0.001, 0.01, 0.1]


def window(requests: int, cache: dict[str, int] | None) -> dict[str, Any]:
    return {
        "schema": "outpost-summary/1",
        "model": "m",
        "version": 1,
        "start": 0.0,
        "end": 60.0,
        "windows": 1,
        "requests": requests,
        "errors": 0,
        "rows": requests,
        "latency": {"bounds": BOUNDS, "counts": [requests, 0, 0, 0], "sum_us": 100 * requests},
        "features": [],
        "prediction": None,
        "feedback": None,
        "shadow": None,
        "cache": cache,
    }


def test_hits_add_up_across_devices_and_give_a_hit_rate() -> None:
    total = merge(window(100, {"hits": 80, "misses": 20}), window(50, None))  # a device without a cache
    total = merge(total, window(50, {"hits": 10, "misses": 30}))
    assert total["cache"] == {"hits": 90, "misses": 50}
    d = derived(total)
    assert d["cache"]["hits"] == 90 and d["cache"]["hit_rate"] == pytest.approx(90 / 140)
    assert "cache" not in derived(window(10, None))
    doc = {
        "model": "m",
        "version": 1,
        "devices": 3,
        "windows": 3,
        "since_iso": "2026-11-27T10:00:00",
        "until_iso": "2026-11-27T11:00:00",
        "summary": total,
        "derived": d,
        "per_device": [],
    }
    out = io.StringIO()
    summary_text(doc, out)
    assert "response cache  90 requests answered from it, 50 by the model (64.29% hits)" in out.getvalue()
