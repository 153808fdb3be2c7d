"""The response cache on the serving path, in process (agent.serving.app with stand-in versions):
A/B experiments use the cache of the version that answers, hits send no shadow copies, a hit goes to
the monitor's and capture's observer with its own prediction id, and a version on probation does not
read its cache. The real agent process is in tests/e2e/test_cache.py."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import numpy as np
import orjson

from agent.metrics import Metrics, VersionMetrics
from agent.package.manifest import TensorSpec
from agent.runtime.batcher import Batcher, rows_of
from agent.runtime.cache import CacheSettings, ResponseCache
from agent.runtime.experiment import ExperimentRoute
from agent.serving.app import App
from agent.serving.http import Deferred, Response

INPUTS = (TensorSpec("x", "FP32", (-1, 2)),)
OUTPUTS = (TensorSpec("y", "FP32", (-1, 2)),)


def version(v: int, runs: list[int]) -> Any:
    def run(inputs: Any) -> dict[str, np.ndarray]:
        runs.append(v)
        return {"y": inputs["x"] * v}

    return SimpleNamespace(
        name="m",
        version=v,
        version_str=str(v),
        session=SimpleNamespace(input_map={s.name: s for s in INPUTS}, outputs=OUTPUTS),
        metrics=VersionMetrics("m", str(v)),
        batcher=Batcher(run, None, enabled=False, max_batch_rows=8),
        observer=None,
        monitor=None,
        cache=ResponseCache("m", v, CacheSettings(60.0)),
    )


class Registry:
    def __init__(self, default: Any, *others: Any) -> None:
        self.default = default
        self.by_version = {lv.version: lv for lv in (default, *others)}
        self.experiments: dict[str, ExperimentRoute] = {}
        self.defaults = {"m": default}  # what the serving path reads before calling get()

    def get(self, name: str, v: str | None = None) -> Any:
        return self.default if v is None else self.by_version[int(v)]

    def all_loaded(self) -> list[Any]:
        return list(self.by_version.values())


def body(x: list[float], **parameters: Any) -> bytes:
    doc: dict[str, Any] = {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": x}]}
    if parameters:
        doc["parameters"] = parameters
    return orjson.dumps(doc)


async def answer(app: App, raw: bytes, v: str | None = None) -> dict[str, Any]:
    result = app.infer("m", v, raw, None)
    if isinstance(result, Deferred):
        while result.response is None:
            await asyncio.sleep(0)
        result = result.response
    assert isinstance(result, Response) and result.status == 200, result
    doc: dict[str, Any] = orjson.loads(result.body)
    return doc


def test_ab_uses_the_cache_of_the_version_that_answers() -> None:
    runs: list[int] = []
    stable, candidate = version(1, runs), version(2, runs)
    registry = Registry(stable, candidate)
    registry.experiments["m"] = ExperimentRoute("ab", candidate, "salt", weight=50)
    app = App(registry, Metrics(), status_info=dict)  # type: ignore[arg-type]
    by_arm: dict[str, str] = {}
    key = 0
    while len(by_arm) < 2:  # one key for each arm
        key += 1
        arm = "2" if registry.experiments["m"].picks_arm(str(key)) else "1"
        by_arm.setdefault(arm, str(key))

    async def main() -> None:
        for arm, k in sorted(by_arm.items()):
            first = await answer(app, body([1.0, 2.0], key=k))
            again = await answer(app, body([1.0, 2.0], key=k))
            assert first["model_version"] == again["model_version"] == arm
            assert first["outputs"] == again["outputs"] and first["id"] != again["id"]
            assert first["outputs"][0]["data"] == [float(arm), 2.0 * float(arm)]

    asyncio.run(main())
    assert runs == [1, 2]  # each arm ran the model once; the repeats were hits in its own cache
    assert (stable.cache.hits, stable.cache.misses, len(stable.cache)) == (1, 1, 1)
    assert (candidate.cache.hits, candidate.cache.misses, len(candidate.cache)) == (1, 1, 1)


def test_hits_send_no_shadow_copies_and_go_to_the_observer_with_their_own_ids() -> None:
    runs: list[int] = []
    stable, candidate = version(1, runs), version(2, runs)
    registry = Registry(stable, candidate)
    route = ExperimentRoute("shadow", candidate, "salt", sample=100)
    registry.experiments["m"] = route
    seen: list[tuple[str | None, int, list[float], list[float]]] = []

    def observer(items: Any, outcomes: Any, arrays: Any) -> None:
        if outcomes is None:  # requests that shared a call: each one's outcome is its rows
            outcomes, start = [], 0
            for item in items:
                outcomes.append(rows_of(arrays[1], start, item.size))
                start += item.size
        for item, out in zip(items, outcomes, strict=True):
            seen.append(
                (
                    item.ticket.prediction_id,
                    item.size,
                    item.inputs["x"].ravel().tolist(),
                    out["y"].ravel().tolist(),
                )
            )

    stable.batcher.observer = observer
    app = App(registry, Metrics(), status_info=dict)  # type: ignore[arg-type]

    async def main() -> list[dict[str, Any]]:
        docs = [await answer(app, body([1.0, 2.0])) for _ in range(3)]
        docs.append(await answer(app, orjson.dumps({"id": "mine", **orjson.loads(body([1.0, 2.0]))})))
        await asyncio.sleep(0.01)  # the one shadow copy runs after its answer
        return docs

    docs = asyncio.run(main())
    assert runs == [1, 2]  # the stable version once, and one copy for the shadow: none for the hits
    assert route.counts["candidate"] == 1
    assert [s[0] for s in seen] == [d["id"] for d in docs] and seen[-1][0] == "mine"
    assert all(s[1:] == (1, [1.0, 2.0], [1.0, 2.0]) for s in seen)
    assert stable.metrics.requests == 4 and stable.cache.hits == 3
    stable.batcher.last_used = 0.0
    asyncio.run(answer(app, body([1.0, 2.0])))
    assert runs == [1, 2]  # a hit: no model run, and no shadow copy
    assert stable.batcher.last_used > 0  # a hit keeps its version "recently used" for the memory budget


def test_probation_fills_the_cache_but_does_not_read_it_and_parameters_bypass() -> None:
    runs: list[int] = []
    lv = version(1, runs)
    judged: list[bool] = []
    lv.observer = lambda ok, seconds: judged.append(ok)
    app = App(Registry(lv), Metrics(), status_info=dict)  # type: ignore[arg-type]

    async def main() -> None:
        for _ in range(3):
            await answer(app, body([1.0, 2.0]))
        lv.observer = None  # committed
        await answer(app, body([1.0, 2.0]))
        await answer(app, body([1.0, 2.0], binary_data_output=False))  # neutral: a hit
        await answer(app, body([1.0, 2.0], cache=False))  # anything else: the model answers

    asyncio.run(main())
    assert judged == [True, True, True]  # probation saw the model's answers only
    assert runs == [1, 1, 1, 1]
    assert (lv.cache.hits, lv.cache.misses, lv.cache.bypassed) == (2, 0, 4)


def test_hits_of_one_burst_are_observed_as_one_batch_joined_when_they_fit() -> None:
    from agent.serving.app import _CacheHit, _joined

    one = _CacheHit({"x": np.ones((1, 2), np.float32)}, 1, "a", 1)
    two = _CacheHit({"x": np.zeros((2, 2), np.float32)}, 2, "b", 2)
    outs = [{"y": np.ones((1, 2))}, {"y": np.zeros((2, 2))}]
    joined = _joined([one, two], outs)
    assert joined is not None
    assert joined[0]["x"].shape == (3, 2) and joined[1]["y"].tolist() == [[1, 1], [0, 0], [0, 0]]
    wide = _CacheHit({"x": np.ones((1, 3), np.float32)}, 1, "c", 3)  # another width: not joined
    assert _joined([one, wide], [outs[0], {"y": np.ones((1, 3))}]) is None
    odd = _CacheHit({"x": np.ones((2, 2), np.float32)}, 1, "d", 4)  # rows that do not add up
    assert _joined([one, odd], [outs[0], {"y": np.ones((2, 2))}]) is None
