"""What the monitor costs the request path: the agent with [monitor] on (the default) against the
same agent with it off, on the tabular model at 16 clients, and the monitor's own work per request
measured in-process (the batcher's hand-over of each batch and the flushes that count them).

    python -m tests.benchmarks.run --only monitor [--quick]

End to end: the two agents are measured in turns (on, off, on, off, ...) so that drift in the
machine's speed hits both alike; the cost is 1 - median(on) / median(off) of the throughputs.
In-process: the batcher's hand-over (`VersionMonitor.observe`) for a steady stream of batches of the
real package (its reference profile, its onnxruntime outputs), flushes included, in microseconds per
request, with 1 and with 8 requests per onnxruntime call; it explains the end-to-end figure, which is
the verdict.
Target (issue 6): the monitor costs at most 5% of throughput.
"""

from __future__ import annotations

import json
import statistics
import tarfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

TARGET = 0.05
ROUNDS = 5


def _manifest(package: Path) -> dict[str, Any]:
    if package.is_dir():
        doc: dict[str, Any] = json.loads((package / "manifest.json").read_text())
        return doc
    with tarfile.open(package) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("manifest.json"))
        handle = tar.extractfile(member)
        assert handle is not None
        loaded: dict[str, Any] = json.load(handle)
        return loaded


def in_process_us(
    package: Path,
    rows: np.ndarray,
    outputs: dict[str, np.ndarray],
    batch: int,
    n: int = 200_000,
    capture_bp: int = 0,
) -> float:
    """Microseconds of monitor work per answered request, flushes included, when the batcher runs
    `batch` requests per onnxruntime call: `rows` and `outputs` are one such batch's (one row per
    request), made before the clock starts, as the agent makes them anyway. `capture_bp` > 0: data
    capture on at that rate (basis points), its batches encoded as they would be sent."""
    from agent.config import CaptureConfig, MonitorConfig
    from agent.metrics import VersionMetrics
    from agent.monitor.capture import Capture
    from agent.monitor.service import Monitor
    from agent.package.manifest import TensorSpec
    from agent.runtime.batcher import Batcher
    from agent.update.canary import CapturePolicy

    doc = _manifest(package)
    manifest = SimpleNamespace(
        reference_profile=doc.get("reference_profile", {}),
        labels=tuple(doc.get("labels", ())),
        task=doc.get("task", "other"),
        features=tuple(doc.get("features", ())),
    )
    spec = doc["inputs"][0]
    session = SimpleNamespace(
        inputs=(TensorSpec(spec["name"], spec["datatype"], tuple(spec["shape"])),),
        outputs=tuple(TensorSpec(o["name"], o["datatype"], tuple(o["shape"])) for o in doc["outputs"]),
    )
    lv = SimpleNamespace(
        name=doc["name"],
        version=doc["version"],
        manifest=manifest,
        session=session,
        # A real Batcher (compiled code checks the type), used only for its observer hook.
        batcher=Batcher(lambda inputs: {}, None, enabled=False, max_batch_rows=1),
        metrics=VersionMetrics(doc["name"], str(doc["version"])),
        monitor=None,
        cache=None,
    )
    monitor = Monitor(MonitorConfig())
    monitor.publish = lambda kind, body: None
    if capture_bp:
        # No rate limit in the way: this measures the work per captured request.
        capture = Capture(CaptureConfig(max_rows_per_min=10**9))
        capture.publish = lambda kind, body: json.dumps(body)
        capture.set_policy(doc["name"], CapturePolicy(capture_bp, 10**9))
        monitor.capture = capture
    monitor.attach(lv)  # type: ignore[arg-type]  # the monitor reads only these attributes
    observe = lv.batcher.observer
    name = spec["name"]
    answers = [{k: v[i : i + 1] for k, v in outputs.items()} for i in range(batch)]
    calls = n // batch
    items = [
        [
            SimpleNamespace(
                ticket=SimpleNamespace(prediction_id=f"p-{c * batch + i:x}", prediction_seq=c * batch + i),
                size=1,
                inputs={name: rows[i : i + 1]},
            )
            for i in range(batch)
        ]
        for c in range(calls)
    ]
    arrays = ({name: rows}, outputs)
    # The response path's metrics (which the monitor reads) are kept with the monitor off too.
    start = time.perf_counter()
    for c in range(calls):
        observe(items[c], answers, arrays)
    lv.monitor.flush()
    return (time.perf_counter() - start) / (calls * batch) * 1e6


def run(packages: Any, wl: Any, st: Any, workdir: Path, quick: bool = False) -> dict[str, Any]:
    """Both measurements; `packages`, `wl` and `st` are run.py's."""
    import onnxruntime as ort

    from tests.benchmarks import run as bench
    from tests.benchmarks.models import TABULAR
    from tests.benchmarks.servers import start_agent

    doc = _manifest(packages.tabular)
    session = ort.InferenceSession(
        str(_model_path(packages.tabular, workdir)), providers=["CPUExecutionProvider"]
    )
    name = doc["inputs"][0]["name"]
    out_names = [o.name for o in session.get_outputs()]
    us: dict[str, float] = {}
    n = 50_000 if quick else 200_000
    for batch in (1, 16):
        rows = np.repeat(wl.tab_row, batch, axis=0)
        outputs = dict(zip(out_names, session.run(None, {name: rows}), strict=True))
        us[str(batch)] = in_process_us(packages.tabular, rows, outputs, batch, n)
    # Data capture on top (issue 7), 16 requests per batch: at 1% and at 10% of requests.
    capture_us = {
        f"{bp / 100:g}%": in_process_us(packages.tabular, rows, outputs, 16, n, capture_bp=bp)
        for bp in (100, 1000)
    }

    rounds = 1 if quick else ROUNDS
    throughput: dict[str, list[float]] = {"on": [], "off": []}
    server_us: dict[str, list[float]] = {"on": [], "off": []}
    for r in range(rounds):
        for mode in ("on", "off"):
            sections = {} if mode == "on" else {"monitor": {"enabled": False}}
            label = f"agent (monitor {mode})"
            with start_agent(workdir, f"mon-{mode}-{r}", label, [packages.tabular], {}, sections) as srv:
                fig = bench.measure(srv, wl.tab_json, TABULAR, wl.tab_expected, 16, st)
                srv.stop()
            if fig.get("status") != "ok":
                return {"status": f"failed: monitor {mode}: {fig.get('status')}"}
            throughput[mode].append(fig["throughput_rps"])
            if fig.get("server_us_per_req"):
                server_us[mode].append(fig["server_us_per_req"])
    on, off = statistics.median(throughput["on"]), statistics.median(throughput["off"])
    return {
        "status": "ok",
        "rounds": rounds,
        "rps_on": throughput["on"],
        "rps_off": throughput["off"],
        "cost_throughput": 1.0 - on / off,
        "monitor_us_per_req": us,  # by requests per onnxruntime batch
        "monitor_capture_us_per_req": capture_us,  # 16 per batch, by the share captured
        "agent_us_per_req_on": statistics.median(server_us["on"]) if server_us["on"] else None,
        "agent_us_per_req_off": statistics.median(server_us["off"]) if server_us["off"] else None,
    }


def _model_path(package: Path, workdir: Path) -> Path:
    if package.is_dir():
        return package / "model.onnx"
    with tarfile.open(package) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".onnx"))
        tar.extract(member, workdir / "monitor-model", filter="data")
        return workdir / "monitor-model" / member.name


def verdict(result: dict[str, Any]) -> dict[str, Any]:
    text = f"monitor: cost ≤ {TARGET:.0%} of throughput (16 clients, tabular)"
    row = {"target": text, "threshold": f"≤ {TARGET:.0%}", "contender": "agent"}
    if result.get("status") != "ok":
        return {**row, "measured": "n/a", "value": None, "verdict": "n/a"}
    value = result["cost_throughput"]
    measured = f"{value:.1%} fewer req/s with the monitor on (medians of {result['rounds']} alternating runs)"
    return {**row, "measured": measured, "value": value, "verdict": "PASS" if value <= TARGET else "FAIL"}


def render(result: dict[str, Any], markdown: bool = False) -> str:
    title = "Monitoring cost (agent, tabular model, 16 clients)"
    if result.get("status") != "ok":
        return f"{'### ' if markdown else ''}{title}: {result.get('status')}"
    us = result["monitor_us_per_req"]
    on, off = result["agent_us_per_req_on"], result["agent_us_per_req_off"]
    lines = [
        f"{'### ' if markdown else ''}{title}",
        "",
        f"- throughput, monitor on:  {', '.join(f'{v:,.0f}' for v in result['rps_on'])} req/s",
        f"- throughput, monitor off: {', '.join(f'{v:,.0f}' for v in result['rps_off'])} req/s",
        f"- cost (medians): {result['cost_throughput']:.1%} of throughput",
        f"- agent CPU per request: {on:.1f} µs on, {off:.1f} µs off" if on and off else "- agent CPU: n/a",
        "- monitor work in-process, per request: "
        + ", ".join(f"{v:.2f} µs with {k} request(s) per onnxruntime batch" for k, v in us.items()),
    ]
    capture = result.get("monitor_capture_us_per_req") or {}
    if capture:
        lines.append(
            "- with data capture on (16 per batch), per request: "
            + ", ".join(f"{v:.2f} µs capturing {k}" for k, v in capture.items())
        )
    return "\n".join(lines)
