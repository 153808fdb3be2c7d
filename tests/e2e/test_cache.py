"""The response cache end to end: the real agent process on a real Unix socket.

Repeated inputs are answered from the cache (the same outputs, a fresh prediction id, JSON and
binary alike), counted in /metrics, /v1/status and the monitor's summary window (a real Mosquitto
and a subscriber read it), a hit's id can be scored by feedback, a new version never answers from
the old version's entries, requests with parameters bypass it, and it is off by default.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.e2e.test_monitoring import Collector, wait_for
from tests.support.agentproc import AgentProcess, running_agent
from tests.support.broker import Mosquitto, mosquitto_available
from tests.support.packages import affine_package, wine_versions

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("packages")
    return {
        "affine1": affine_package(root / "affine-1", version=1, scale=2.0),
        "affine2": affine_package(root / "affine-2", version=2, scale=3.0),
    }


def infer(
    agent: AgentProcess, model: str, name: str, rows: np.ndarray, version: str | None = None, **extra: Any
) -> dict[str, Any]:
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
    body = {
        "inputs": [
            {"name": name, "datatype": "FP32", "shape": list(rows.shape), "data": rows.ravel().tolist()}
        ],
        **extra,
    }
    status, doc = agent.json("POST", path, body)
    assert status == 200, doc
    return dict(doc)


def infer_binary(agent: AgentProcess, model: str, name: str, rows: np.ndarray) -> dict[str, Any]:
    """The binary tensor extension for the input; the outputs come back as JSON."""
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": name,
                    "datatype": "FP32",
                    "shape": list(rows.shape),
                    "parameters": {"binary_data_size": rows.nbytes},
                }
            ]
        }
    ).encode()
    status, _, data = agent.request(
        "POST",
        f"/v2/models/{model}/infer",
        header + rows.astype("<f4").tobytes(),
        {"Inference-Header-Content-Length": str(len(header))},
    )
    assert status == 200, data
    return dict(json.loads(data))


def outputs(doc: dict[str, Any]) -> dict[str, Any]:
    return {o["name"]: (o["datatype"], o["shape"], o["data"]) for o in doc["outputs"]}


def metric(text: str, name: str, model: str, version: int) -> float | None:
    found = re.search(rf'^{name}\{{model="{model}",version="{version}"\}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else None


def cache_status(agent: AgentProcess, model: str, version: int) -> dict[str, Any] | None:
    _, doc = agent.json("GET", "/v1/status")
    (entry,) = [m for m in doc["models"] if m["name"] == model]
    (v,) = [v for v in entry["versions"] if v["version"] == version]
    found: dict[str, Any] | None = v.get("cache")
    return found


@pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed (make sysdeps)")
def test_repeats_are_answered_from_the_cache_counted_in_metrics_and_the_summary_and_scorable(
    tmp_path: Path,
) -> None:
    (wine,) = wine_versions(tmp_path / "wine", versions=(1,)).values()
    sample = np.loadtxt(tmp_path / "wine" / "wine-sample.csv", delimiter=",", skiprows=1)[:, :-1]
    a, b = sample[:1].astype(np.float32), sample[1:3].astype(np.float32)
    with Mosquitto(tmp_path / "broker") as broker:
        collector = Collector(broker.url)
        agent = AgentProcess(
            tmp_path / "dev",
            extra={
                "mqtt": {"url": broker.url, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
                "monitor": {"window_requests": 7, "window_s": 3600.0},
                "runtime": {"models": {"wine": {"cache_ttl_s": 600.0}}},
            },
        )
        agent.install(wine)
        agent.start()
        try:
            first = infer(agent, "wine", "input", a)  # a miss: the model answers
            again = [infer(agent, "wine", "input", a) for _ in range(3)]  # hits
            binary = infer_binary(agent, "wine", "input", a)  # the same tensor as binary: a hit
            keyed = infer(agent, "wine", "input", a, id="mine-1")  # a client's id: a hit
            other = infer(agent, "wine", "input", b)  # another input (two rows): a miss
            for doc in [*again, binary, keyed]:
                assert outputs(doc) == outputs(first)
                assert doc["model_version"] == "1"
            ids = [d["id"] for d in (first, *again, binary, keyed, other)]
            assert len(set(ids)) == 7 and keyed["id"] == "mine-1"
            assert outputs(other) != outputs(first)

            cache = cache_status(agent, "wine", 1)
            assert cache is not None
            assert (cache["hits"], cache["misses"], cache["entries"]) == (5, 2, 2)
            assert cache["ttl_s"] == 600.0 and cache["hit_rate"] == pytest.approx(5 / 7)
            text = agent.request("GET", "/metrics")[2].decode()
            assert metric(text, "outpost_cache_hits_total", "wine", 1) == 5
            assert metric(text, "outpost_cache_misses_total", "wine", 1) == 2
            assert metric(text, "outpost_cache_entries", "wine", 1) == 2
            assert metric(text, "outpost_cache_bytes", "wine", 1) == cache["bytes"] > 0
            assert metric(text, "outpost_cache_evictions_total", "wine", 1) == 0
            assert metric(text, "outpost_inference_requests_total", "wine", 1) == 7

            # The window of these seven requests: every one counted, hits apart, inputs binned.
            wait_for("the summary window", lambda: len(collector.of("summary")) >= 1)
            (window,) = collector.of("summary")
            assert window["requests"] == 7 and window["rows"] == 8 and window["errors"] == 0
            assert window["cache"] == {"hits": 5, "misses": 2}
            for feature in window["features"]:
                assert sum(feature["counts"]) + feature["missing"] + feature["other"] == 8, feature["name"]
            assert sum(window["prediction"]["counts"]) + window["prediction"]["other"] == 8

            # A hit's prediction id is scorable like any other.
            label = int(first["outputs"][0]["data"][0]) if first["outputs"][0]["name"] == "label" else 0
            status, scored = agent.json("POST", "/v1/feedback", {"id": again[1]["id"], "label": label})
            assert status == 200, scored
            assert scored["labelled"] == 1 and scored["version"] == 1
            status, scored = agent.json("POST", "/v1/feedback", {"id": "mine-1", "label": label})
            assert status == 200, scored
        finally:
            agent.kill()
            collector.close()


def test_a_new_version_never_answers_from_the_old_versions_entries(
    tmp_path: Path, packages: dict[str, Path]
) -> None:
    x = np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)
    config = {"runtime": {"cache_ttl_s": 600.0, "models": {"affine": {"cache_max_entries": 2}}}}
    with running_agent(tmp_path / "agent", packages["affine1"], extra=config) as agent:
        v1 = [infer(agent, "affine", "x", x) for _ in range(3)]
        assert {d["model_version"] for d in v1} == {"1"}
        assert outputs(v1[2])["y"][2] == (x * 2 + 1).ravel().tolist()
        assert (cache_status(agent, "affine", 1) or {})["hits"] == 2

        agent.install(packages["affine2"])  # the running agent loads it and makes it the default
        wait_for("version 2", lambda: infer(agent, "affine", "x", x * 0)["model_version"] == "2")
        v2 = infer(agent, "affine", "x", x)
        assert v2["model_version"] == "2"
        assert outputs(v2)["y"][2] == (x * 3 + 1).ravel().tolist()  # the model's, not v1's cached answer
        c2 = cache_status(agent, "affine", 2) or {}
        assert (c2["hits"], c2["misses"]) == (0, 2)
        again = infer(agent, "affine", "x", x)
        assert again["model_version"] == "2" and outputs(again) == outputs(v2)
        # Version 1 is still loaded: asked by number, it answers from its own entries.
        old = infer(agent, "affine", "x", x, version="1")
        assert old["model_version"] == "1" and outputs(old) == outputs(v1[0])
        assert (cache_status(agent, "affine", 1) or {})["hits"] == 3

        # cache_max_entries = 2 for this model: a third input evicts the least recently used.
        infer(agent, "affine", "x", x + 1)
        c2 = cache_status(agent, "affine", 2) or {}
        assert (c2["entries"], c2["evictions"]) == (2, 1)

        # Parameters other than binary_data_output and key bypass the cache.
        before = cache_status(agent, "affine", 2) or {}
        infer(agent, "affine", "x", x, parameters={"cache": False})
        after = cache_status(agent, "affine", 2) or {}
        assert after["bypassed"] == before["bypassed"] + 1 and after["hits"] == before["hits"]
        infer(agent, "affine", "x", x, parameters={"binary_data_output": False})
        assert (cache_status(agent, "affine", 2) or {})["hits"] == after["hits"] + 1


def test_off_by_default(tmp_path: Path, packages: dict[str, Path]) -> None:
    x = np.ones((1, 4), np.float32)
    with running_agent(tmp_path / "agent", packages["affine1"]) as agent:
        for _ in range(3):
            infer(agent, "affine", "x", x)
        assert cache_status(agent, "affine", 1) is None
        text = agent.request("GET", "/metrics")[2].decode()
        assert "outpost_cache_" not in text
        assert metric(text, "outpost_inference_requests_total", "affine", 1) == 3
