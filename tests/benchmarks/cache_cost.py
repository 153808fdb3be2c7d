"""What the response cache does on a workload with repeats: the agent with the cache off vs on.

    python -m tests.benchmarks.run --only cache [--quick]

The workload (issue 9): 80% of the requests are drawn from 50 distinct inputs, the other 20% are
each new (a counter written into one value of a template request: `client.RequestMix`), in one
fixed shuffled order. Four figures per setting: the tabular model (JSON, one row) at 1 and 16
clients and the conv model (binary tensors, one image) at 1 client, as in the main table, and a
model that costs more per row than hashing its input (8 MatMuls of 1024x1024,
tests/support/packages.slow_package; binary tensors, 16 clients). Two agents, each with the three
models: one with the default config (cache off) and one with `[runtime] cache_ttl_s = 600` (1024
entries, 16 MiB per version, the defaults); the two alternate (off, on, off, on: `ROUNDS`, one
with --quick) so that a machine whose load drifts does not favour
one, and each figure is the median of its rounds. Before each load, answers (a repeated input,
twice, so that the second comes from the cache when it is on, and a unique one) are checked
against onnxruntime in-process. The hit rate is the agent's own count (/v1/status) over the load.
"""

from __future__ import annotations

import shutil
import statistics
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

DISTINCT = 50
REPEAT_SHARE = 0.8
ORDER = 10_007  # entries in the shuffled order (prime: connections starting at other offsets differ)
ROUNDS = 2
TTL_S = 600
SENTINEL = np.float32(1.234567)  # orjson writes it as b"1.234567": the unique requests' slot
FIGURES = (("tabular_c1", "tabular, JSON, 1 client"), ("tabular_c16", "tabular, JSON, 16 clients"),
           ("conv_binary_c1", "conv, binary, 1 client"),
           ("mlp_binary_c16", "mlp 8x1024, binary, 16 clients"))  # fmt: skip
# A model that costs more per row than hashing its input: 8 MatMuls of 1024x1024 (tests/support).
MLP_WIDTH, MLP_DEPTH = 1024, 8


def _order(seed: int = 9) -> tuple[int, ...]:
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, DISTINCT, ORDER)
    picks[rng.random(ORDER) >= REPEAT_SHARE] = -1
    return tuple(int(p) for p in picks)


def tabular_mix(x: np.ndarray) -> tuple[Any, list[np.ndarray], np.ndarray]:
    """(the mix, the pool's rows, the template's row with the slot's value 1.0) for the tabular model."""
    from tests.benchmarks.client import RequestMix, json_infer_request
    from tests.benchmarks.models import TABULAR

    rows = [x[3100 + i : 3101 + i] for i in range(DISTINCT)]  # rows the model was not trained on
    pool = tuple(json_infer_request(TABULAR, [("input", "FP32", r)]) for r in rows)
    base = x[3200:3201].copy()
    base[0, 0] = SENTINEL
    template = json_infer_request(TABULAR, [("input", "FP32", base)])
    assert template.count(b"1.234567") == 1, "the template's slot is not unique"
    mix = RequestMix(pool, _order(), template, template.index(b"1.234567"), "digits")
    base[0, 0] = 1.0
    return mix, rows, base


def conv_mix(image: np.ndarray) -> tuple[Any, list[np.ndarray], np.ndarray]:
    """The same for the conv model in binary tensors; the slot is the image's first value."""
    from tests.benchmarks.client import RequestMix, binary_infer_request
    from tests.benchmarks.models import CONV

    template = binary_infer_request(CONV, [("input", "FP32", image)], ["logits"])
    slot = len(template) - image.nbytes
    images = []
    for i in range(DISTINCT):
        img = image.copy()
        img.flat[0] = -1.0 - i
        images.append(img)
    pool = tuple(
        template[:slot] + struct.pack("<f", -1.0 - i) + template[slot + 4 :] for i in range(DISTINCT)
    )
    base = image.copy()
    base.flat[0] = 1.0
    return RequestMix(pool, _order(), template, slot, "f32"), images, base


def mlp_mix(width: int) -> tuple[Any, list[np.ndarray], np.ndarray]:
    """The same for the MLP (model "slow") in binary tensors, its output binary too."""
    from tests.benchmarks.client import RequestMix, binary_infer_request

    rng = np.random.default_rng(5)
    rows = [rng.standard_normal((1, width)).astype(np.float32) for _ in range(DISTINCT)]
    pool = tuple(binary_infer_request("slow", [("x", "FP32", r)], ["y"]) for r in rows)
    base = rng.standard_normal((1, width)).astype(np.float32)
    template = binary_infer_request("slow", [("x", "FP32", base)], ["y"])
    base[0, 0] = 1.0
    return RequestMix(pool, _order(), template, len(template) - base.nbytes, "f32"), rows, base


def in_process_us(package: Path, burst: int, cache: bool, n: int = 20_000) -> float:
    """The agent's own CPU per request, without sockets: the tabular model's registry, monitor and
    app in this process, `n` requests of the same mix (JSON bodies), `burst` per loop iteration
    (16 clients give bursts, one client none); process CPU time / requests. A loaded machine
    disturbs this far less than the figures over the socket."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from agent.config import MonitorConfig, RuntimeConfig
    from agent.metrics import Metrics
    from agent.monitor.service import Monitor
    from agent.package.store import Store
    from agent.runtime.registry import ModelRegistry
    from agent.serving.app import App
    from agent.serving.http import Deferred
    from tests.benchmarks.models import TABULAR, tabular_data

    x, _ = tabular_data(seed=1)
    mix, _, _ = tabular_mix(x)
    bodies = []
    for i in range(n):
        pick = mix.order[i % len(mix.order)]
        raw = mix.pool[pick] if pick >= 0 else mix.unique(i + 1)
        bodies.append(raw[raw.index(b"\r\n\r\n") + 4 :])
    with tempfile.TemporaryDirectory(prefix="ob-cache-") as tmp, ThreadPoolExecutor(1) as executor:
        store = Store(Path(tmp))
        store.prepare()
        installed = store.install(package)
        metrics, monitor = Metrics(), Monitor(MonitorConfig())
        runtime = RuntimeConfig(cache_ttl_s=float(TTL_S) if cache else 0.0)
        registry = ModelRegistry(runtime, executor, metrics, on_add=monitor.attach)
        registry.add(registry.load(installed))
        app = App(registry, metrics, status_info=dict)

        async def main() -> float:
            cpu = time.process_time()
            for i in range(0, n, burst):
                answers = [app.infer(TABULAR, None, body, None) for body in bodies[i : i + burst]]
                while any(isinstance(a, Deferred) and a.response is None for a in answers):
                    await asyncio.sleep(0)
            await asyncio.sleep(0)  # the last hits are observed
            return (time.process_time() - cpu) / n * 1e6

        return asyncio.run(main())


def _cache_counts(socket: str) -> dict[str, tuple[int, int]]:
    from tests.benchmarks.client import http_request, request_once

    doc = request_once(socket, http_request("GET", "/v1/status")).json()
    out = {}
    for model in doc["models"]:
        for v in model["versions"]:
            cache = v.get("cache") or {}
            out[model["name"]] = (int(cache.get("hits", 0)), int(cache.get("misses", 0)))
    return out


def run(packages: Any, wl: Any, st: Any, quick: bool = False) -> dict[str, Any]:
    import onnxruntime as ort

    from tests.benchmarks import run as bench
    from tests.benchmarks.client import ClientError
    from tests.benchmarks.models import CONV, TABULAR, tabular_data
    from tests.benchmarks.servers import start_agent
    from tests.support.packages import slow_package

    x, _ = tabular_data(seed=1)
    tab_mix, tab_rows, tab_unique = tabular_mix(x)
    conv_m, conv_images, conv_unique = conv_mix(wl.image)
    mlp_m, mlp_rows, mlp_unique = mlp_mix(MLP_WIDTH)
    tab = ort.InferenceSession(str(packages.tabular / "model.onnx"), providers=["CPUExecutionProvider"])
    conv = ort.InferenceSession(str(packages.conv / "model.onnx"), providers=["CPUExecutionProvider"])

    def tab_expected(row: np.ndarray) -> dict[str, np.ndarray]:
        label, proba = tab.run(["label", "probabilities"], {"input": row})
        return {"label": label, "probabilities": proba}

    def conv_expected(img: np.ndarray) -> dict[str, np.ndarray]:
        return {"logits": conv.run(["logits"], {"input": img})[0]}

    work = Path(tempfile.mkdtemp(prefix="ob-cache-"))
    mlp_package = slow_package(work / "slow-1", MLP_WIDTH, MLP_DEPTH)
    mlp = ort.InferenceSession(str(mlp_package / "model.onnx"), providers=["CPUExecutionProvider"])

    def mlp_expected(x: np.ndarray) -> dict[str, np.ndarray]:
        return {"y": mlp.run(["y"], {"x": x})[0]}

    plans = {
        "tabular_c1": (TABULAR, tab_mix, 1, [(tab_mix.pool[0], tab_expected(tab_rows[0])),
                                             (tab_mix.unique(0), tab_expected(tab_unique))]),
        "tabular_c16": (TABULAR, tab_mix, 16, [(tab_mix.pool[7], tab_expected(tab_rows[7]))]),
        "conv_binary_c1": (CONV, conv_m, 1, [(conv_m.pool[0], conv_expected(conv_images[0])),
                                             (conv_m.unique(0), conv_expected(conv_unique))]),
        "mlp_binary_c16": ("slow", mlp_m, 16, [(mlp_m.pool[0], mlp_expected(mlp_rows[0])),
                                               (mlp_m.unique(0), mlp_expected(mlp_unique))]),
    }  # fmt: skip
    rounds = 1 if quick else ROUNDS
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {k: {"off": [], "on": []} for k in plans}
    try:
        for r in range(rounds):
            for mode in ("off", "on"):
                runtime = {"cache_ttl_s": TTL_S} if mode == "on" else {}
                name = f"cache-{mode}-{r}"
                with start_agent(work, name, f"agent, cache {mode}",
                                 [packages.tabular, packages.conv, mlp_package], runtime) as srv:  # fmt: skip
                    for key, (model, mix, clients, checks) in plans.items():
                        for raw, expected in checks:
                            for _ in range(2):  # the second from the cache when it is on
                                problem, _doc = bench.check_answer(srv.socket, raw, model, expected)
                                if problem:
                                    return {"status": f"invalid ({key}, cache {mode}): {problem}"}
                        before = _cache_counts(srv.socket).get(model, (0, 0))
                        raw, expected = checks[0]
                        fig = bench.measure(srv, raw, model, expected, clients, st, load_with=mix)
                        if fig.get("status") != "ok":
                            return {"status": f"failed ({key}, cache {mode}): {fig.get('status')}"}
                        after = _cache_counts(srv.socket).get(model, (0, 0))
                        hits, misses = after[0] - before[0], after[1] - before[1]
                        fig["cache_hits"], fig["cache_misses"] = hits, misses
                        fig["hit_rate"] = hits / (hits + misses) if hits + misses else None
                        runs[key][mode].append(fig)
                    srv.stop()
    except ClientError as exc:
        return {"status": f"failed: {exc}"}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    in_process: dict[str, dict[str, float]] = {}
    for burst in (16, 1):
        in_process[str(burst)] = {
            mode: min(in_process_us(packages.tabular, burst, mode == "on") for _ in range(rounds + 1))
            for mode in ("off", "on")
        }

    def med(figs: list[dict[str, Any]], field: str) -> float | None:
        values = [f[field] for f in figs if f.get(field) is not None]
        return statistics.median(values) if values else None

    figures: dict[str, Any] = {}
    for key, modes in runs.items():
        figures[key] = {
            mode: {
                f: med(figs, f)
                for f in ("throughput_rps", "p50_us", "p99_us", "hit_rate", "server_us_per_req")
            }
            | {"errors": sum(f["errors"] for f in figs)}
            for mode, figs in modes.items()
        }
        off, on = figures[key]["off"]["throughput_rps"], figures[key]["on"]["throughput_rps"]
        figures[key]["speedup"] = on / off if off else None
    return {
        "status": "ok",
        "rounds": rounds,
        "workload": f"{REPEAT_SHARE:.0%} of requests drawn from {DISTINCT} distinct inputs, the rest unique",
        "config": f"[runtime] cache_ttl_s = {TTL_S} (entries and bytes at their defaults)",
        "figures": figures,
        "in_process_us": in_process,
    }


def verdict(result: dict[str, Any]) -> dict[str, Any]:
    row = {"target": "cache: throughput with the cache on vs off, 80% repeats", "threshold": "measured",
           "contender": "agent"}  # fmt: skip
    if result.get("status") != "ok":
        return {**row, "measured": "n/a", "value": None, "verdict": "n/a"}
    f = result["figures"]
    measured = ", ".join(f"{f[k]['speedup']:.2f}x ({label})" for k, label in FIGURES if f[k]["speedup"])
    return {**row, "measured": measured, "value": f["tabular_c16"]["speedup"], "verdict": "info"}


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render(result: dict[str, Any], markdown: bool = False) -> str:
    title = "Response cache: off vs on, a workload with repeats"
    if result.get("status") != "ok":
        return f"{'### ' if markdown else ''}{title}: {result.get('status')}"
    lines = [
        f"{'### ' if markdown else ''}{title}",
        "",
        f"{result['workload']}; {result['config']}; median of {result['rounds']} round(s), "
        "off and on alternating.",
        "",
        "| figure | req/s off | req/s on | on/off | p50 µs off | p50 µs on | p99 µs off | p99 µs on "
        "| server CPU µs/req off | on | hit rate | failed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, label in FIGURES:
        f = result["figures"][key]
        off, on = f["off"], f["on"]
        lines.append(
            f"| {label} | {_fmt(off['throughput_rps'], ',.0f')} | {_fmt(on['throughput_rps'], ',.0f')} | "
            f"{_fmt(f['speedup'], '.2f')} | {_fmt(off['p50_us'], ',.0f')} | {_fmt(on['p50_us'], ',.0f')} | "
            f"{_fmt(off['p99_us'], ',.0f')} | {_fmt(on['p99_us'], ',.0f')} | "
            f"{_fmt(off['server_us_per_req'], '.1f')} | {_fmt(on['server_us_per_req'], '.1f')} | "
            f"{_fmt(on['hit_rate'] and on['hit_rate'] * 100, '.1f')}% | {off['errors'] + on['errors']} |"
        )
    ip = result.get("in_process_us") or {}
    if ip:
        lines += [
            "",
            "In process (the agent's own work on the tabular model without sockets, CPU µs per request, "
            "best of runs):",
            "",
            "| requests per loop iteration | cache off | cache on |",
            "|---|---:|---:|",
            *(f"| {burst} | {v['off']:.1f} | {v['on']:.1f} |" for burst, v in ip.items()),
        ]
    lines += [
        "",
        "- server CPU µs/req: the agent's CPU time over the window / requests answered (the figure a",
        "  loaded machine disturbs least)",
        "- every figure's answers (a repeat twice, a unique one) checked against onnxruntime first",
    ]
    return "\n".join(lines)
