"""One benchmark run: every contender, the same client and packages, side by side.

    python -m tests.benchmarks.run [--quick] [--only limit,peer,agent,...,drift] [--out bench-results]

Contenders: `limit` (onnxruntime in-process), `peer` (tests/benchmarks/peer.py, inference on
the event loop -- the faster variant, the one the targets compare against), `peer_threadpool`
(the same app with inference in Starlette's thread pool, as its docs advise), `agent` (the
installed `outpost-agent` with a default config), `agent_tuned` (the same with [runtime] keys
set for this machine, labelled) and `agent_plain` (the default agent run as plain Python, without
the modules setup.py compiles with mypyc: what an install without a C compiler serves).
For each server: one instance with only the tabular model
(start-up, 1 and 16 clients, memory, then the version switch), one with only the conv model
(JSON and binary tensors). Before each measured load one answer is checked against onnxruntime
in-process, so a fast wrong server cannot win. A contender that cannot start is reported as
'unavailable: <reason>' and the run goes on.

More sections: `paired` (tests/benchmarks/paired.py): the peer and the agent side by side, measured
in turns over several short rounds, the three agent/peer ratio targets judged on the rounds'
median (~90 s); `drift` (tests/benchmarks/drift_power.py, no server): the detection power of
the agent's binned KS against scipy's exact KS at the same false-alarm rate, ~210 s (~25 s quick).
And `monitor` (tests/benchmarks/monitor_cost.py): the monitor's cost, the agent with it on vs off;
`shadow` (tests/benchmarks/shadow_cost.py): the primary's latency with a shadow experiment vs without;
`mqtt` (tests/benchmarks/mqtt_cost.py): inference over MQTT (a real Mosquitto) vs the socket;
`cache` (tests/benchmarks/cache_cost.py): the response cache off vs on, on a workload with repeats.

Writes bench-results/results.json and results.md, prints the table and PASS/FAIL per target.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tests.benchmarks import cache_cost, drift_power, monitor_cost, mqtt_cost, paired, report, shadow_cost
from tests.benchmarks.client import (
    ClientError,
    Load,
    LoadResult,
    RequestMix,
    binary_infer_request,
    cpu_count,
    decode_infer_response,
    http_request,
    json_infer_request,
    request_once,
)
from tests.benchmarks.models import CONV, TABULAR, Packages, build_packages, conv_input, tabular_data
from tests.benchmarks.servers import (
    Server,
    Unavailable,
    agent_cli,
    byte_compile_agent,
    start_agent,
    start_peer,
    start_probe,
)
from tests.support.agentproc import plain_agent_env

MB = 1024 * 1024
ATOL = 1e-4
RSS_SAMPLE_S = 0.1
BATCH_ROWS = 256

# The tuned agent: on a 2-core device the conv model's convolutions profit from a second
# onnxruntime thread; the default config keeps one (small devices, predictable latency).
# `--tuned KEY=VALUE,...` replaces it.
DEFAULT_TUNED = "intra_op_threads=2"

CONTENDERS = {
    "limit": ("limit", "onnxruntime called in-process (default session options), no HTTP"),
    "peer": ("peer", "tests/benchmarks/peer.py: Starlette + uvicorn (httptools, uvloop), one "
                     "worker, stdlib JSON, inference in the async handler"),
    "peer_threadpool": ("peer (thread pool)", "the same app with inference in Starlette's "
                                              "thread pool, as its documentation advises"),
    "probe": ("probe", "tests/benchmarks/probe.py: the leanest correct server (httptools, orjson, "
                       "one onnxruntime call per loop iteration, no checks): a reference, not a peer"),
    "agent": ("agent", "outpost-agent run, default config (only data_dir, socket, identity)"),
    "agent_tuned": ("agent (tuned)", "outpost-agent run, default config plus [runtime] {tuned}"),
    "agent_plain": ("agent (plain Python)", "the agent, default config, run as plain Python: "
                                             "without the request path setup.py compiles (mypyc)"),
}
# Selectable with --only like the contenders, but not servers.
SECTIONS = ("paired", "drift", "monitor", "shadow", "mqtt", "cache")


@dataclass(frozen=True)
class Settings:
    warmup_s: float
    duration_s: float
    client_procs: int
    switch_steady_s: float
    switch_settle_s: float


@dataclass(frozen=True)
class Workload:
    """The requests (built once, as bytes) and the answers onnxruntime gives in-process."""

    tab_row: np.ndarray
    tab_batch: np.ndarray
    image: np.ndarray
    tab_json: bytes
    conv_json: bytes
    conv_binary: bytes
    tab_expected: dict[str, np.ndarray]
    tab_v2_expected: dict[str, np.ndarray]
    conv_expected: dict[str, np.ndarray]


def parse_runtime(text: str) -> dict[str, Any]:
    """`intra_op_threads=2,batching=false` -> {"intra_op_threads": 2, "batching": False}."""
    out: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--tuned: {item!r} is not KEY=VALUE")
        low = value.strip().lower()
        if low in ("true", "false"):
            out[key.strip()] = low == "true"
        else:
            try:
                out[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else float(value)
            except ValueError as exc:
                raise ValueError(f"--tuned: {key} must be a number or true/false") from exc
    return out


def make_workload(packages: Packages) -> Workload:
    import onnxruntime as ort

    x, _ = tabular_data(seed=1)
    row, batch = x[3000:3001], x[3000:3000 + BATCH_ROWS]  # rows the model was not trained on
    image = conv_input(1)
    tab = ort.InferenceSession(str(packages.tabular / "model.onnx"),
                               providers=["CPUExecutionProvider"])
    conv = ort.InferenceSession(str(packages.conv / "model.onnx"),
                                providers=["CPUExecutionProvider"])
    tab_v2 = ort.InferenceSession(str(packages.tabular_v2 / "model.onnx"),
                                  providers=["CPUExecutionProvider"])
    label, proba = tab.run(["label", "probabilities"], {"input": row})
    label2, proba2 = tab_v2.run(["label", "probabilities"], {"input": row})
    (logits,) = conv.run(["logits"], {"input": image})
    return Workload(
        tab_row=row, tab_batch=batch, image=image,
        tab_json=json_infer_request(TABULAR, [("input", "FP32", row)]),
        conv_json=json_infer_request(CONV, [("input", "FP32", image)]),
        conv_binary=binary_infer_request(CONV, [("input", "FP32", image)], ["logits"]),
        tab_expected={"label": label, "probabilities": proba},
        tab_v2_expected={"label": label2, "probabilities": proba2},
        conv_expected={"logits": logits},
    )


# --- checking and measuring one server ---------------------------------------------------------


def check_answer(socket: str, raw: bytes, model: str, expected: dict[str, np.ndarray]
                 ) -> tuple[str | None, dict[str, Any]]:
    """(None, response doc) if the server's answer matches onnxruntime's, else (why not, doc)."""
    resp = request_once(socket, raw)
    if resp.status != 200:
        return f"status {resp.status}: {resp.body[:200]!r}", {}
    try:
        doc, arrays = decode_infer_response(resp)
    except (ValueError, KeyError, TypeError, ClientError) as exc:
        return f"response not understood: {exc}", {}
    if doc.get("model_name") != model:
        return f"model_name {doc.get('model_name')!r}, expected {model!r}", doc
    for name, want in expected.items():
        got = arrays.get(name)
        if got is None:
            return f"output {name!r} missing", doc
        if got.shape != want.shape:
            return f"output {name!r} has shape {got.shape}, expected {want.shape}", doc
        if want.dtype.kind in "iub":
            if not np.array_equal(got, want):
                return f"output {name!r} is {got.tolist()}, expected {want.tolist()}", doc
        elif not np.allclose(got, want, rtol=0, atol=ATOL):
            diff = float(np.max(np.abs(got.astype(np.float64) - want)))
            return f"output {name!r} differs from onnxruntime by up to {diff:.3g}", doc
    return None, doc


def _sleep_until_ns(t_ns: int) -> None:
    delay = (t_ns - time.perf_counter_ns()) / 1e9
    if delay > 0:
        time.sleep(delay)


def measure(server: Server, raw: bytes, model: str, expected: dict[str, np.ndarray],
            connections: int, st: Settings, load_with: RequestMix | None = None) -> dict[str, Any]:
    """Check one answer (to `raw`), then run the closed-loop load (of `raw`, or of the requests of
    `load_with`), watching the server's CPU and RSS."""
    if server.proc.poll() is not None:
        return {"status": f"failed: the server exited ({server.log_tail()})"}
    try:
        problem, _ = check_answer(server.socket, raw, model, expected)
        if problem:
            return {"status": f"invalid: {problem}"}
        rss: list[int] = []
        with Load(server.socket, raw if load_with is None else load_with, connections,
                  st.warmup_s, st.duration_s, st.client_procs) as load:
            load.start()
            _sleep_until_ns(load.measure_ns)
            cpu0 = server.cpu_seconds()
            while time.perf_counter_ns() < load.end_ns:
                rss.append(server.rss_bytes())
                time.sleep(min(RSS_SAMPLE_S, max(0.0, (load.end_ns - time.perf_counter_ns()) / 1e9)))
            cpu = server.cpu_seconds() - cpu0
            result = load.join()
    except ClientError as exc:
        return {"status": f"failed: {exc}"}
    out = _summary(result)
    out["server_cores"] = cpu / result.duration_s
    out["server_us_per_req"] = cpu / result.count * 1e6 if result.count else None
    out["rss_median_mb"] = statistics.median(rss) / MB if rss else None
    if server.proc.poll() is not None:
        out["status"] = f"failed: the server exited during the load ({server.log_tail()})"
    return out


def _summary(result: LoadResult) -> dict[str, Any]:
    out = {"status": "ok", **result.summary()}
    out["client_us_per_req"] = result.client_cpu_s / result.count * 1e6 if result.count else None
    return out


# --- contenders --------------------------------------------------------------------------------


def run_limit(packages: Packages, wl: Workload, st: Settings) -> dict[str, Any]:
    """onnxruntime called in-process with default session options: the ceiling."""
    import onnxruntime as ort

    def timed(call: Callable[[], object]) -> dict[str, Any]:
        end = time.perf_counter() + st.warmup_s
        while time.perf_counter() < end:
            call()
        lats = []
        cpu0 = time.process_time()
        start = time.perf_counter_ns()
        stop = start + int(st.duration_s * 1e9)
        while (t0 := time.perf_counter_ns()) < stop:
            call()
            lats.append(time.perf_counter_ns() - t0)
        wall = (time.perf_counter_ns() - start) / 1e9
        arr = np.asarray(lats) / 1000.0
        return {
            "status": "ok", "count": len(lats), "throughput_rps": len(lats) / wall,
            "p50_us": float(np.percentile(arr, 50)), "p99_us": float(np.percentile(arr, 99)),
            "max_us": float(arr.max()), "server_cores": (time.process_time() - cpu0) / wall,
        }

    opts = ["CPUExecutionProvider"]
    tab = ort.InferenceSession(str(packages.tabular / "model.onnx"), providers=opts)
    conv = ort.InferenceSession(str(packages.conv / "model.onnx"), providers=opts)
    single = timed(lambda: tab.run(None, {"input": wl.tab_row}))
    batch = timed(lambda: tab.run(None, {"input": wl.tab_batch}))
    rows = {"status": "ok", "throughput_rps": batch["throughput_rps"] * BATCH_ROWS,
            "server_cores": batch["server_cores"],
            "note": f"rows/s in calls of {BATCH_ROWS} rows"}
    image = timed(lambda: conv.run(None, {"input": wl.image}))
    return {"tabular_c1": single, "tabular_c16": rows, "conv_binary_c1": image,
            **bare_process(packages)}


# What any server must at least hold: an interpreter with numpy and onnxruntime imported and
# the model loaded and run. Run in a fresh process (this one has scikit-learn and more loaded).
_BARE = """
import json, sys, numpy as np, onnxruntime as ort
s = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
x = np.zeros((1, 32), np.float32)
for _ in range(1000):
    s.run(None, {"input": x})
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({k: int(status[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}))
"""


def bare_process(packages: Packages) -> dict[str, Any]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _BARE, str(packages.tabular / "model.onnx")],
                          capture_output=True, text=True, timeout=120, check=False)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        return {"memory": {"status": f"failed: {done.stderr.strip()[-200:]}"}}
    mem = json.loads(done.stdout)
    return {
        "memory": {"status": "ok", "rss_steady_mb": mem["VmRSS"] / MB,
                   "rss_peak_mb": mem["VmHWM"] / MB},
        "startup": {"status": "ok", "seconds": elapsed},
    }


def run_server(key: str, start: Callable[[str, list[Path]], Server], packages: Packages,
               wl: Workload, st: Settings, binary: bool, switch: bool,
               notes: list[str],
               start_windowed: Callable[[str, list[Path]], Server] | None = None) -> dict[str, Any]:
    """Every figure of one server contender; raises Unavailable if it cannot start at all.
    `start_windowed`: the same server with its monitoring windows closing every second, for
    the memory it holds once they do (a window closes every 5 minutes by default: a run of
    seconds never sees one)."""
    figs: dict[str, Any] = {}
    with start(f"{key}-tab", [packages.tabular]) as srv:
        figs["startup"] = {"status": "ok", "seconds": srv.startup_s}
        idle = srv.rss_bytes()
        figs["tabular_c1"] = measure(srv, wl.tab_json, TABULAR, wl.tab_expected, 1, st)
        figs["tabular_c16"] = measure(srv, wl.tab_json, TABULAR, wl.tab_expected, 16, st)
        figs["memory"] = {
            "status": "ok", "rss_idle_mb": idle / MB,
            "rss_steady_mb": figs["tabular_c16"].pop("rss_median_mb", None),
            "rss_peak_mb": srv.peak_rss_bytes() / MB,
        }
        figs["tabular_c1"].pop("rss_median_mb", None)
        if switch:
            figs["switch"] = switch_and_rollback(srv, packages, wl, st)
        srv.stop()
        notes += srv.notes
    if start_windowed is not None:
        with start_windowed(f"{key}-win", [packages.tabular]) as srv:
            fig = measure(srv, wl.tab_json, TABULAR, wl.tab_expected, 16, st)
            if fig.get("status") == "ok":
                figs["memory"]["rss_windows_steady_mb"] = fig.get("rss_median_mb")
                figs["memory"]["rss_windows_peak_mb"] = srv.peak_rss_bytes() / MB
            else:
                notes.append(f"memory with windows closing: {fig.get('status')}")
            srv.stop()
    with start(f"{key}-conv", [packages.conv]) as srv:
        figs["conv_json_c1"] = measure(srv, wl.conv_json, CONV, wl.conv_expected, 1, st)
        if binary:
            figs["conv_binary_c1"] = measure(srv, wl.conv_binary, CONV, wl.conv_expected, 1, st)
        else:
            figs["conv_binary_c1"] = {"status": "n/a: JSON only, as a user's app would be"}
        for fig in figs.values():
            fig.pop("rss_median_mb", None)
        srv.stop()
        notes += srv.notes
    return figs


def switch_and_rollback(srv: Server, packages: Packages, wl: Workload, st: Settings
                        ) -> dict[str, Any]:
    """Version switch and rollback of the tabular model under a steady 16-client load.

    DEPENDS ON THE AGENT'S ADMIN SURFACE: `outpost-agent install PACKAGE --config` (which
    writes the store and itself asks the running agent to reload), `POST /v1/reload`, and
    `POST /v1/models/{name}/default {"version": N}` to pin the previous version. If either
    endpoint answers 404 the scenario reports 'skipped: ...'.

    Windows, on the load's clock: steady = before the install starts; switch = from the
    install's start until `switch_settle_s` after the reload answered (the new version's first
    requests included); rollback = from the pin request until `switch_settle_s` after it.
    Every failed request in the whole measured window counts.
    """
    assert srv.config_path is not None
    with Load(srv.socket, wl.tab_json, 16, st.warmup_s, 600.0, st.client_procs) as load:
        try:
            steps = _switch_steps(srv, srv.config_path, packages, wl, st, load)
        except (ClientError, Unavailable) as exc:
            steps = {"status": f"failed: {exc}"}
        if "status" in steps:  # failed or skipped: leaving `with` stops the load, no figures
            return steps
        result = load.join()
    t_switch, t_switched, t_rollback, end = (steps[k] for k in (
        "t_switch", "t_switched", "t_rollback", "end"))
    p99 = result.percentile_us
    out = _summary(result)
    out.update({
        "p99_steady_us": p99(99, load.measure_ns, t_switch),
        "p99_switch_us": p99(99, t_switch, t_switched + int(st.switch_settle_s * 1e9)),
        "p99_rollback_us": p99(99, t_rollback, end),
        **{k: v for k, v in steps.items() if not k.startswith("t_") and k != "end"},
    })
    return out


def _switch_steps(srv: Server, config: Path, packages: Packages, wl: Workload, st: Settings,
                  load: Load) -> dict[str, Any]:
    """Drive the switch and the rollback during the load; times on the load's clock."""
    load.start()
    _sleep_until_ns(load.measure_ns + int(st.switch_steady_s * 1e9))
    t_switch = time.perf_counter_ns()
    agent_cli(config, "install", str(packages.tabular_v2))
    reload = request_once(srv.socket, http_request("POST", "/v1/reload", b""))
    t_switched = time.perf_counter_ns()
    if reload.status == 404:
        return {"status": "skipped: POST /v1/reload answered 404 (agent admin API missing)"}
    after_switch = _served(srv.socket, wl.tab_json, wl.tab_v2_expected)
    _sleep_until_ns(t_switched + int(st.switch_settle_s * 1e9))
    t_rollback = time.perf_counter_ns()
    pin = request_once(srv.socket, http_request(
        "POST", f"/v1/models/{TABULAR}/default", b'{"version": 1}', "application/json"))
    t_rolled = time.perf_counter_ns()
    if pin.status == 404:
        return {"status": f"skipped: POST /v1/models/{TABULAR}/default answered 404 "
                          "(agent admin API missing)"}
    after_rollback = _served(srv.socket, wl.tab_json, wl.tab_expected)
    end = t_rolled + int(st.switch_settle_s * 1e9)
    load.set_end(max(end, time.perf_counter_ns() + 10_000_000))
    return {
        "t_switch": t_switch, "t_switched": t_switched, "t_rollback": t_rollback, "end": end,
        "switch_s": (t_switched - t_switch) / 1e9, "rollback_s": (t_rolled - t_rollback) / 1e9,
        "reload_status": reload.status, "pin_status": pin.status,
        "version_after_switch": after_switch[0], "answer_after_switch": after_switch[1],
        "version_after_rollback": after_rollback[0], "answer_after_rollback": after_rollback[1],
    }


def _served(socket: str, raw: bytes, expected: dict[str, np.ndarray]) -> tuple[str | None, str]:
    """(the model_version answering, "ok" or why its answer is not that version's)."""
    try:
        problem, doc = check_answer(socket, raw, TABULAR, expected)
    except ClientError as exc:
        return None, str(exc)
    version = doc.get("model_version")
    return (None if version is None else str(version)), problem or "ok"


# --- the run -----------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks.run",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="1 s per measurement after 0.5 s of warm-up (a smoke run)")
    parser.add_argument("--duration", type=float, help="seconds measured per scenario (5)")
    parser.add_argument("--warmup", type=float, help="seconds of warm-up per scenario (1)")
    parser.add_argument("--client-procs", type=int, default=1,
                        help="load client processes (1: the client then uses a fraction of a core)")
    parser.add_argument("--only", default=",".join([*CONTENDERS, *SECTIONS]),
                        help=f"comma-separated contenders out of {', '.join(CONTENDERS)}, "
                             f"and sections out of {', '.join(SECTIONS)}")
    parser.add_argument("--tuned", default=DEFAULT_TUNED,
                        help=f"[runtime] keys of the tuned agent ({DEFAULT_TUNED})")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args(argv)
    try:
        args.tuned_runtime = parse_runtime(args.tuned)
    except ValueError as exc:
        parser.error(str(exc))
    unknown = set(args.only.split(",")) - set(CONTENDERS) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown contender(s) or section(s) {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    duration = args.duration or (1.0 if args.quick else 5.0)
    warmup = args.warmup if args.warmup is not None else (0.5 if args.quick else 1.0)
    st = Settings(warmup, duration, args.client_procs,
                  switch_steady_s=duration,
                  switch_settle_s=1.0 if args.quick else 1.5)
    wanted = [k for k in CONTENDERS if k in args.only.split(",")]
    started = time.perf_counter()
    results: dict[str, Any] = {
        "machine": report.machine(), "command": report.command_line(argv),
        "settings": {"warmup_s": st.warmup_s, "duration_s": st.duration_s,
                     "client_processes": st.client_procs, "cores": cpu_count(),
                     "tuned_runtime": args.tuned_runtime},
        "contenders": {}, "figures": {},
    }
    # Measured as installed: a wheel's modules are byte-compiled at install (servers.py says why).
    results["settings"]["agent_byte_compiled"] = byte_compile_agent()
    tuned = ", ".join(f"{k} = {v}" for k, v in args.tuned_runtime.items())
    print(f"outpost bench: {results['machine']['cpu']}, {cpu_count()} cores, "
          f"{st.duration_s:g} s per scenario after {st.warmup_s:g} s warm-up", flush=True)
    if wanted:
        packages = build_packages(args.out / "packages")
        wl = make_workload(packages)
    workdir = Path(tempfile.mkdtemp(prefix="ob-"))  # short: Unix socket paths are <108 bytes
    try:
        for key in wanted:
            label, description = CONTENDERS[key]
            print(f"- {label} ...", flush=True)
            info: dict[str, Any] = {"label": label, "description": description.format(tuned=tuned),
                                    "status": "ok", "notes": []}
            results["contenders"][key] = info
            try:
                results["figures"][key] = _run_contender(
                    key, packages, wl, st, workdir, info, args.tuned_runtime)
            except Unavailable as exc:
                info["status"] = f"unavailable: {exc}"
                print(f"  {info['status']}", flush=True)
            except Exception as exc:  # a harness or server failure must not lose the others
                traceback.print_exc()
                info["status"] = f"failed: {type(exc).__name__}: {exc}"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    agents = [k for k in ("agent", "agent_tuned", "agent_plain") if k in wanted]
    results["targets"] = report.evaluate(results["figures"], agents) if "peer" in wanted else []
    workload: tuple[Packages, Workload] | None = (packages, wl) if wanted else None

    def needed() -> tuple[Packages, Workload]:
        """The packages and requests, built once for whichever section needs them first."""
        nonlocal workload
        if workload is None:
            built = build_packages(args.out / "packages")
            workload = (built, make_workload(built))
        return workload

    # (key for --only, what it measures, its key in results, the measurement, its target rows)
    sections: list[tuple[str, str, str, Callable[[], dict[str, Any]],
                         Callable[[dict[str, Any]], list[dict[str, Any]]]]] = [
        ("paired", "agent and peer head to head, in turns", "paired",
         lambda: _in_scratch(lambda d: paired.run(*needed(), st, d, args.quick)),
         lambda r: paired.verdicts(r, results["targets"])),
        ("monitor", "monitoring cost (agent, monitor on vs off)", "monitor_cost",
         lambda: _in_scratch(lambda d: monitor_cost.run(*needed(), st, d, args.quick)),
         lambda r: [monitor_cost.verdict(r)]),
        ("shadow", "shadow experiment cost (agent with a hub)", "shadow_cost",
         lambda: shadow_cost.run(*needed(), st, args.quick), lambda r: [shadow_cost.verdict(r)]),
        ("mqtt", "inference over MQTT vs the socket", "mqtt_cost",
         lambda: mqtt_cost.run(*needed(), st, args.quick), lambda r: [mqtt_cost.verdict(r)]),
        ("cache", "response cache, off vs on (80% repeats)", "cache_cost",
         lambda: cache_cost.run(*needed(), st, args.quick), lambda r: [cache_cost.verdict(r)]),
        ("drift", "drift detection power", "drift_power",
         lambda: drift_power.run(drift_power.QUICK if args.quick else None),
         lambda r: [drift_power.verdict(r)]),
    ]
    for key, title, name, measure, verdicts in sections:
        if key not in args.only.split(","):
            continue
        print(f"- {title} ...", flush=True)
        try:
            results[name] = measure()
        except Exception as exc:  # a failure here must not lose the other figures
            traceback.print_exc()
            results[name] = {"status": f"failed: {type(exc).__name__}: {exc}"}
        results["targets"] += verdicts(results[name])
    with contextlib.suppress(OSError):
        results["machine"]["loadavg_at_end"] = " ".join(
            Path("/proc/loadavg").read_text().split()[:3])
    results["elapsed_s"] = time.perf_counter() - started
    print()
    print(report.render_text(results))
    json_path, md_path = report.write(results, args.out)
    print(f"\nwrote {json_path} and {md_path} ({results['elapsed_s']:.0f} s)")
    return 0


def _in_scratch(run: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """`run` with a temporary directory (short: Unix socket paths are < 108 bytes), removed after."""
    with tempfile.TemporaryDirectory(prefix="ob-", ignore_cleanup_errors=True) as scratch:
        return run(Path(scratch))


def _run_contender(key: str, packages: Packages, wl: Workload, st: Settings, workdir: Path,
                   info: dict[str, Any], tuned: dict[str, Any]) -> dict[str, Any]:
    notes: list[str] = info["notes"]
    if key == "limit":
        return run_limit(packages, wl, st)
    if key.startswith("peer"):
        mode = "threadpool" if key == "peer_threadpool" else "async"
        return run_server(key, lambda name, pkgs: start_peer(workdir, name, pkgs, mode),
                          packages, wl, st, binary=False, switch=False, notes=notes)
    if key == "probe":
        return run_server(key, lambda name, pkgs: start_probe(workdir, name, pkgs),
                          packages, wl, st, binary=False, switch=False, notes=notes)
    runtime = tuned if key == "agent_tuned" else {}
    env = plain_agent_env(workdir) if key == "agent_plain" else None
    return run_server(
        key, lambda name, pkgs: start_agent(workdir, name, info["label"], pkgs, runtime, extra_env=env),
        packages, wl, st, binary=True, switch=key == "agent", notes=notes,
        start_windowed=lambda name, pkgs: start_agent(
            workdir, name, info["label"], pkgs, runtime, {"monitor": {"window_s": 1}}, extra_env=env))


if __name__ == "__main__":
    sys.exit(main())
