"""What a shadow experiment costs the primary: the agent answering with version 1 alone, then with a
shadow experiment that copies every request (sample 100%) to version 2 after the answer went out.

    python -m tests.benchmarks.run --only shadow [--quick]

A real hub signs the assignment (stable v1, then v1 with a shadow of v2); the installed agent pulls
it as a device does. Measured with the benchmark's client on the tabular model: the primary's p50
and p99 at 1 client and its throughput and p99 at 16 clients, without and with the shadow, each
answer checked against onnxruntime (the primary's answers must not change). Issue 7 asks for the
bound to be measured here, so the row states it rather than judging it: the ratios of the primary's
p99 with and without. On a 2-core machine the candidate's copies compete with the primary for the
same cores; copies beyond the candidate's queue bound are dropped and counted, never waited for.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

FAST_PROBATION = {"min_requests": 20, "min_seconds": 1.0, "max_error_rate": 0.05, "max_latency_ratio": 50.0}


def _fast(package: Path, out: Path) -> Path:
    """The package again with a short probation (the first version is tried before it is committed)."""
    from agent.package.store import write_package_tar

    copy = out / package.name
    shutil.copytree(package, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["probation"] = FAST_PROBATION
    (copy / "manifest.json").write_text(json.dumps(manifest))
    archive = out / f"{package.name}.tar"
    write_package_tar(copy, archive)
    return archive


def run(packages: Any, wl: Any, st: Any, quick: bool = False) -> dict[str, Any]:
    from tests.benchmarks import run as bench
    from tests.benchmarks.models import TABULAR
    from tests.benchmarks.servers import Server
    from tests.support.agentproc import AgentProcess
    from tests.support.hubproc import HubProcess

    work = Path(tempfile.mkdtemp(prefix="ob-shadow-"))
    hub = HubProcess(work / "hub").start()
    agent: AgentProcess | None = None
    try:
        v1, v2 = _fast(packages.tabular, work), _fast(packages.tabular_v2, work)
        for package in (v1, v2):
            hub.outpost("push", str(package), "--quiet")

        def deploy(experiment: dict[str, Any] | None) -> None:
            body: dict[str, Any] = {"model": TABULAR, "stable": 1}
            if experiment is not None:
                body.update(candidate=2, percent=100, experiment=experiment)
            resp = hub.api("PUT", "/api/v1/groups/bench/deployment", json=body)
            resp.raise_for_status()

        deploy(None)
        root = work / "root.json"
        root.write_bytes(hub.root)
        agent = AgentProcess(
            work / "agent",
            extra={
                "device_id": "bench-shadow",
                "group": "bench",
                "hub": {"url": hub.url, "trusted_root": str(root), "poll_interval_s": 0.5},
            },
        )
        agent.start(wait_ready=False)
        server = Server("agent", agent.socket, agent.proc, agent.log_path)  # type: ignore[arg-type]

        def status() -> dict[str, Any]:
            doc: dict[str, Any] = agent.json("GET", "/v1/status")[1]  # type: ignore[union-attr]
            return doc

        def until(what: str, check: Any, timeout: float = 120.0) -> None:
            deadline = time.monotonic() + timeout
            while not check():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"timed out waiting for {what}")
                time.sleep(0.1)

        until(
            "the agent to serve",
            lambda: agent is not None and agent.request("GET", "/v2/health/ready")[0] == 200,
        )
        # Probation needs answers: a short load brings them.
        bench.measure(server, wl.tab_json, TABULAR, wl.tab_expected, 4, st)
        until("v1 committed", lambda: status()["update"]["state"] == "committed")

        def figures() -> dict[str, Any]:
            return {
                "c1": bench.measure(server, wl.tab_json, TABULAR, wl.tab_expected, 1, st),
                "c16": bench.measure(server, wl.tab_json, TABULAR, wl.tab_expected, 16, st),
            }

        alone = figures()
        deploy({"mode": "shadow", "sample": 100})

        def shadowing() -> bool:
            model = next((m for m in status()["models"] if m["name"] == TABULAR), {})
            return bool(model.get("experiment"))

        until("the shadow experiment", shadowing)
        with_shadow = figures()
        model = next(m for m in status()["models"] if m["name"] == TABULAR)
        counts = model["experiment"]
    except Exception as exc:
        return {"status": f"failed: {type(exc).__name__}: {exc}"}
    finally:
        if agent is not None:
            agent.kill()
        hub.kill()
        shutil.rmtree(work, ignore_errors=True)
    for figs in (alone, with_shadow):
        for fig in figs.values():
            if fig.get("status") != "ok":
                return {"status": f"failed: {fig.get('status')}"}
    return {
        "status": "ok",
        "alone": alone,
        "shadow": with_shadow,
        "copied": counts.get("copied"),
        "dropped": counts.get("dropped"),
        "p99_ratio_c1": with_shadow["c1"]["p99_us"] / alone["c1"]["p99_us"],
        "p99_ratio_c16": with_shadow["c16"]["p99_us"] / alone["c16"]["p99_us"],
    }


def verdict(result: dict[str, Any]) -> dict[str, Any]:
    row = {"target": "shadow: the primary's p99 with a 100% shadow, vs without", "threshold": "measured",
           "contender": "agent"}  # fmt: skip
    if result.get("status") != "ok":
        return {**row, "measured": "n/a", "value": None, "verdict": "n/a"}
    measured = f"{result['p99_ratio_c1']:.2f}x (1 client), {result['p99_ratio_c16']:.2f}x (16 clients)"
    return {**row, "measured": measured, "value": result["p99_ratio_c1"], "verdict": "info"}


def render(result: dict[str, Any], markdown: bool = False) -> str:
    title = "Shadow experiment: what the copies cost the primary (tabular model)"
    if result.get("status") != "ok":
        return f"{'### ' if markdown else ''}{title}: {result.get('status')}"
    a, s = result["alone"], result["shadow"]
    lines = [
        f"{'### ' if markdown else ''}{title}",
        "",
        f"- 1 client: p50 {a['c1']['p50_us']:.0f} -> {s['c1']['p50_us']:.0f} µs, "
        f"p99 {a['c1']['p99_us']:.0f} -> {s['c1']['p99_us']:.0f} µs ({result['p99_ratio_c1']:.2f}x)",
        f"- 16 clients: {a['c16']['throughput_rps']:,.0f} -> {s['c16']['throughput_rps']:,.0f} req/s, "
        f"p99 {a['c16']['p99_us']:.0f} -> {s['c16']['p99_us']:.0f} µs ({result['p99_ratio_c16']:.2f}x)",
        f"- copies sent to the candidate: {result['copied']:,}, "
        f"dropped (candidate busy): {result['dropped']:,}",
        "- every primary answer checked against onnxruntime before each measurement: unchanged",
    ]
    return "\n".join(lines)
