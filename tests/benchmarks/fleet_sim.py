"""A simulated fleet against one hub: metadata polls, telemetry ingest, deployment propagation, DB size.

    python -m tests.benchmarks.fleet_sim [--quick] [--phases polls,ingest,propagation]
    make bench-fleet

The tool starts a Mosquitto (tests/support/broker.py, its own config: no per-message log) and one
`outpost-hub serve --mqtt` on a fresh data directory (SQLite; PostgreSQL when
OUTPOST_BENCH_DATABASE_URL names an empty database), pushes the example wine model as versions 1
and 2 and deploys version 1 to every group. Load processes (tests/benchmarks/fleet_device.py,
`--procs`, default: the cores minus one for the hub) each run thousands of simulated devices on
asyncio. Phases, each on its own:

- polls: `--poll-concurrency` devices per process poll back to back (closed loop, keep-alive
  connections): polls/s served and the latency of a poll (root probe + timestamp), p50/p99.
- ingest: `--ingest-devices` devices connect, publish their state birth, then `--ingest-windows`
  windows each (a summary and a drift message per window, QoS 1) as fast as the broker acknowledges.
  Ingested/s is counted in the hub's database (rows of fleet_windows over time), not as sent;
  afterwards every acknowledged (device, seq) must be in fleet_messages exactly once.
- db size: the growth of the database over the ingest phase per stored window, times the agent's
  default cadence (window_s = 300: 288 summaries and 288 drift messages per model per day).
- propagation: `--devices` devices poll every `--interval` s (each first at a random offset,
  then `interval` after each check, as agent.update.runner does) and publish a window every 300 s;
  version 2 is deployed to every group through the API; the time until 50/90/99/100 % of the
  devices fetched the new assignment (and the model) is the simulator's own record.

Writes bench-results/fleet.json and fleet.md and prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from tests.benchmarks import report
from tests.support.broker import Mosquitto
from tests.support.hubproc import HubProcess

MODEL = "wine"
WINDOW_S = 300.0  # the agent's default monitor.window_s
WINDOWS_PER_DAY = 86400 / WINDOW_S
TARGET_POLLS = 2000.0
TARGET_INGEST = 5000.0


# -- the fleet ---------------------------------------------------------------------------


def fleet(n: int, groups: int) -> list[tuple[str, str]]:
    """Device ids and groups as a fleet has them: sites of 40 devices, sites spread over groups."""
    out = []
    for i in range(n):
        site, unit = divmod(i, 40)
        out.append((f"site{site:04d}-cam{unit:02d}", f"region-{site % groups:02d}"))
    return out


def message_bodies(package: Path, seed: int = 7) -> dict[str, str]:
    """The summary and drift bodies of one 5-minute window, made by the agent's monitor code on the
    wine package's reference profile and sample rows; as JSON without the leading "{" and without
    "start"/"end" (each message puts its own before them)."""
    from agent.monitor.drift import DriftDetector
    from agent.monitor.report import drift_message
    from agent.monitor.summary import WindowSummary
    from agent.telemetry.messages import encode

    manifest = json.loads((package / "manifest.json").read_text())
    profile = manifest["reference_profile"]
    rng = np.random.default_rng(seed)
    sample = np.loadtxt(package.parent / "wine-sample.csv", delimiter=",", skiprows=1, dtype=np.float32)
    rows = sample[rng.integers(0, len(sample), 300), :-1]
    labels = sample[rng.integers(0, len(sample), 300), -1].astype(np.int64)
    summary = WindowSummary(
        MODEL, 1, profile, labels=manifest.get("labels", ()), task=manifest.get("task", "other"),
        window_seconds=WINDOW_S, clock=lambda: 0.0, input_names=manifest.get("features", ()),
    )  # fmt: skip
    summary.observe_batch(rows, {"label": labels}, list(rng.lognormal(np.log(1e-4), 0.5, 300)), 0)
    summary.add_feedback(40, 37)
    window = summary.close(WINDOW_S)
    drift = drift_message(window, profile, DriftDetector())
    bodies = {}
    for kind, doc in (("summary", window), ("drift", drift)):
        body = {k: v for k, v in doc.items() if k not in ("start", "end")}
        bodies[kind] = encode(body).decode()[1:]
    return bodies


# -- processes -------------------------------------------------------------------------------


def broker_config(broker: Mosquitto) -> str:
    # No "log_type all" (the tests' config): logging every PUBLISH would measure the log file.
    # The hub's queue at the broker must not drop QoS 1 messages while the hub catches up.
    return "\n".join(
        [
            f"listener {broker.port} 127.0.0.1",
            "allow_anonymous true",
            "persistence false",
            f"log_dest file {broker.log_path}",
            "log_type error",
            "log_type warning",
            "set_tcp_nodelay true",
            "max_queued_messages 1000000",
            "max_connections -1",
        ]
    )


def run_phase(phase: str, shares: list[list[tuple[str, str]]], common: dict[str, Any],
              timeout: float, on_ready: Any = None) -> list[dict[str, Any]]:  # fmt: skip
    """Each share of devices in a load process; returns their results (raises on an error)."""
    from tests.benchmarks.fleet_device import run_worker

    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = []
    for i, devices in enumerate(shares):
        spec = {**common, "phase": phase, "devices": devices, "seed": i, "ready": results}
        procs.append(ctx.Process(target=run_worker, args=(spec, results), daemon=True))
    for p in procs:
        p.start()
    out, ready = [], 0
    deadline = time.monotonic() + timeout
    try:
        while len(out) < len(procs):
            kind, value = results.get(timeout=max(1.0, deadline - time.monotonic()))
            if kind == "error":
                raise RuntimeError(f"a load process failed in {phase}: {value}")
            if kind == "ready":
                ready += 1
                if ready == len(procs) and on_ready is not None:
                    on_ready()
                continue
            out.append(value)
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    return out


# The hub's app under uvicorn with one of its stock HTTP protocols (`--hub-http h11|httptools`), to
# compare with `serve`'s (httptools with the request head bounded, hub.http_protocol); everything
# else as `outpost-hub serve --mqtt URL` sets it up.
_LAUNCH = """
import sys
from dataclasses import replace
from pathlib import Path
import uvicorn
from hub.api import create_app
from hub.settings import load_settings
data, port, mqtt, http = sys.argv[1:5]
settings = replace(load_settings(Path(data)), mqtt_url=mqtt)
uvicorn.run(create_app(settings), host="127.0.0.1", port=int(port), log_level="warning",
            access_log=False, http=http)
"""


def start_hub_with(hub: HubProcess, mqtt_url: str, http: str) -> None:
    import requests

    log = hub.log_path.open("ab")
    hub.proc = subprocess.Popen(
        [sys.executable, "-c", _LAUNCH, str(hub.data), str(hub.port), mqtt_url, http], stdout=log, stderr=log
    )
    log.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if hub.proc.poll() is not None:
            raise RuntimeError(f"the hub exited: {hub.log()}")
        try:
            if requests.get(hub.url + "/healthz", timeout=1).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"the hub did not start: {hub.log()}")


def pid_of(process: HubProcess | Mosquitto) -> int:
    assert process.proc is not None, "not started"
    return process.proc.pid


def split(devices: list[tuple[str, str]], procs: int) -> list[list[tuple[str, str]]]:
    return [devices[i::procs] for i in range(procs)]


class Cpu:
    """CPU seconds of the hub and the broker between two points."""

    def __init__(self, *pids: int) -> None:
        self.procs = [psutil.Process(p) for p in pids]
        self.start = [self._cpu(p) for p in self.procs]
        self.t = time.monotonic()

    @staticmethod
    def _cpu(p: psutil.Process) -> float:
        t = p.cpu_times()
        return float(t.user + t.system)

    def seconds(self) -> list[float]:
        return [self._cpu(p) - s for p, s in zip(self.procs, self.start, strict=True)]

    def cores(self) -> list[float]:
        dt = time.monotonic() - self.t
        return [round(s / dt, 2) for s in self.seconds()]


def mosquitto_version() -> str:
    from tests.support.broker import MOSQUITTO

    try:
        out = subprocess.run([MOSQUITTO, "-h"], capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "unknown"
    return (out.stdout or out.stderr).splitlines()[0] if (out.stdout or out.stderr) else "unknown"


def pressure() -> str:
    """/proc/pressure/cpu "some" averages: the share of time tasks waited for a CPU (other load)."""
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except OSError:
        return "unknown"
    return " ".join(line.split()[1:4])


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


class Profiler:
    """py-spy on the hub during a phase (`--profile`): raw stacks, and the top frames per thread."""

    def __init__(self, out: Path | None, pid: int, phase: str) -> None:
        self.path = out / f"fleet-profile-{phase}.txt" if out is not None else None
        self.pid = pid
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, seconds: float) -> None:
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if self.path is None or not Path(spy).exists():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [spy, "record", "--pid", str(self.pid), "--duration", str(max(1, int(seconds))), "--rate", "200",
             "--format", "raw", "--threads", "--idle", "--nonblocking", "-o", str(self.path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def summary(self, top: int = 12) -> dict[str, Any] | None:
        """Per thread: its samples, and the frames it spent them in (leaf frames, most first)."""
        if self.proc is None or self.path is None:
            return None
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        if not self.path.exists():
            return None
        threads: dict[str, Counter[str]] = {}
        for line in self.path.read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            frames = stack.split(";")
            name = frames[0].split(": ", 1)[-1]
            threads.setdefault(name, Counter())[frames[-1]] += int(n)
        return {
            name: {"samples": sum(c.values()), "top": c.most_common(top)}
            for name, c in sorted(threads.items(), key=lambda kv: -sum(kv[1].values()))
        }


# -- the database --------------------------------------------------------------------------------


class Db:
    """Reads the hub's database from outside: row counts and size (SQLite file or PostgreSQL)."""

    TABLES = ("fleet_messages", "fleet_windows", "devices", "fleet_alerts")

    def __init__(self, hub: HubProcess, url: str) -> None:
        self.url = url
        self.path = hub.data / "hub.db"
        self._engine: Any = None
        if url:
            from sqlalchemy import create_engine

            self._engine = create_engine(url)

    def scalar(self, sql: str) -> Any:
        if self._engine is None:
            with contextlib.closing(
                sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)
            ) as conn:
                return conn.execute(sql).fetchone()[0]
        from sqlalchemy import text

        with self._engine.connect() as conn:
            return conn.execute(text(sql)).scalar()

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        if self._engine is None:
            with contextlib.closing(
                sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)
            ) as conn:
                return list(conn.execute(sql).fetchall())
        from sqlalchemy import text

        with self._engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(sql))]

    def windows(self) -> int:
        return int(self.scalar("SELECT count(*) FROM fleet_windows") or 0)

    def size(self) -> dict[str, int]:
        """Bytes in use: the whole database and each fleet table with its indexes."""
        if self._engine is None:
            page = int(self.scalar("PRAGMA page_size"))
            used = int(self.scalar("PRAGMA page_count")) - int(self.scalar("PRAGMA freelist_count"))
            out = {"database": used * page}
            try:
                for name, size in self.rows(
                    "SELECT coalesce(i.tbl_name, s.name), sum(s.pgsize) FROM dbstat s "
                    "LEFT JOIN sqlite_master i ON i.name = s.name GROUP BY 1"
                ):
                    if name in self.TABLES:
                        out[name] = int(size)
            except sqlite3.OperationalError:
                pass  # no dbstat in this SQLite: the total only
            return out
        out = {"database": int(self.scalar("SELECT pg_database_size(current_database())"))}
        for table in self.TABLES:
            out[table] = int(self.scalar(f"SELECT pg_total_relation_size('{table}')") or 0)
        return out


# -- phases ------------------------------------------------------------------------------------


def phase_polls(
    args: argparse.Namespace, hub: HubProcess, mqtt: Mosquitto, common: dict[str, Any]
) -> dict[str, Any]:
    devices = fleet(args.poll_devices, args.groups)
    # the processes start and seed first
    start = time.monotonic() + (1.5 if args.quick else 3.0) + args.warmup
    end = start + args.duration
    spec = {**common, "concurrency": args.poll_concurrency, "start_at": start, "end_at": end}
    cpu: dict[str, Any] = {}
    spy = Profiler(args.out if args.profile else None, pid_of(hub), "polls")

    def measure() -> None:
        cpu["meter"] = Cpu(pid_of(hub))
        spy.start(args.duration)

    import threading

    timer = threading.Timer(max(0.0, start - time.monotonic()), measure)
    timer.start()
    results = run_phase("polls", split(devices, args.procs), spec, timeout=args.duration + 120)
    hub_cores = cpu["meter"].cores()[0] if "meter" in cpu else None
    hub_cpu_s = cpu["meter"].seconds()[0] if "meter" in cpu else None
    lat = [v for r in results for v in r["latencies_us"]]
    statuses: dict[str, int] = {}
    for r in results:
        for k, v in r["statuses"].items():
            statuses[str(k)] = statuses.get(str(k), 0) + v
    cycles = sum(r["cycles"] for r in results)
    return {
        "polls_per_s": cycles / args.duration,
        "requests_per_s": sum(r["requests"] for r in results) / args.duration,
        "p50_ms": (percentile(lat, 50) or 0) / 1000,
        "p99_ms": (percentile(lat, 99) or 0) / 1000,
        "statuses": statuses,
        "errors": sum(sum(r["errors"].values()) for r in results),
        "hub_cores": hub_cores,
        # CPU per poll: what a dedicated core would serve, less sensitive to a busy machine
        "hub_cpu_us_per_poll": hub_cpu_s / max(1, cycles) * 1e6 if hub_cpu_s is not None else None,
        "load_cpu_s": [round(r["cpu_s"], 1) for r in results],
        "connections": args.poll_concurrency * args.procs,
        "etag": common["etag"],
        "profile": spy.summary(),
    }


def phase_ingest(args: argparse.Namespace, hub: HubProcess, mqtt: Mosquitto, common: dict[str, Any],
                 db: Db) -> dict[str, Any]:  # fmt: skip
    devices = fleet(args.ingest_devices, args.groups)
    expected = len(devices) * args.ingest_windows * 2
    base_windows = db.windows()
    size_before = db.size()
    spec = {**common, "windows": args.ingest_windows, "window_s": WINDOW_S, "start_at": 0.0}
    samples: list[tuple[float, int]] = []
    import threading

    stop = threading.Event()
    meters: dict[str, Cpu] = {}
    spy = Profiler(args.out if args.profile else None, pid_of(hub), "ingest")

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.monotonic(), db.windows() - base_windows))
            if samples[-1][1] >= expected:
                return
            time.sleep(0.25)

    def go() -> None:
        meters["cpu"] = Cpu(pid_of(hub), pid_of(mqtt))
        threading.Thread(target=sample, daemon=True).start()
        spy.start(args.profile_seconds)

    results = run_phase("ingest", split(devices, args.procs), spec, timeout=args.ingest_timeout, on_ready=go)
    sent_done = max(r["t_last"] for r in results)
    first = min(r["t_first"] for r in results)
    deadline = time.monotonic() + args.ingest_timeout
    while time.monotonic() < deadline and (not samples or samples[-1][1] < expected):
        time.sleep(0.25)
    stop.set()
    cores = meters["cpu"].cores() if "cpu" in meters else [None, None]
    cpu_s = meters["cpu"].seconds() if "cpu" in meters else [None, None]
    stored_total = samples[-1][1] if samples else 0
    done_at = next((t for t, n in samples if n >= expected), samples[-1][0] if samples else first)
    lo = next((t for t, n in samples if n >= 0.1 * expected), None)
    hi = next((t for t, n in samples if n >= 0.9 * expected), None)
    steady = (0.8 * expected / (hi - lo)) if lo is not None and hi is not None and hi > lo else None
    # Every acknowledged (device, seq) stored once.
    sent = {(d, s) for r in results for d, seqs in r["sent"].items() for s in seqs}
    stored = db.rows("SELECT device_id, seq FROM fleet_messages WHERE kind IN ('summary', 'drift')")
    stored_set = set(stored)
    prefix_ok = all(d.startswith("site") for d, _ in stored_set)
    size_after = db.size()
    acks: dict[str, int] = {}
    for r in results:
        for k, v in r["acks"].items():
            acks[k] = acks.get(k, 0) + v
    grown = {k: size_after.get(k, 0) - size_before.get(k, 0) for k in size_after}
    per_window = {k: v / max(1, stored_total) for k, v in grown.items()}
    return {
        "devices": len(devices),
        "messages_expected": expected,
        "messages_acked": len(sent),
        "windows_rows": stored_total,
        "ingested_per_s_steady": steady,
        "ingested_per_s_overall": stored_total / max(1e-9, done_at - first),
        "published_per_s": len(sent) / max(1e-9, sent_done - first),
        "drain_after_last_publish_s": max(0.0, done_at - sent_done),
        "lost": len(sent - stored_set),
        "duplicates": len(stored) - len(stored_set),
        "unexpected": len(stored_set - sent) if prefix_ok else None,
        "acks": acks,
        "errors": {k: v for r in results for k, v in r["errors"].items()},
        "hub_cores": cores[0],
        "broker_cores": cores[1],
        "hub_cpu_us_per_message": cpu_s[0] / max(1, stored_total) * 1e6 if cpu_s[0] is not None else None,
        "broker_cpu_us_per_message": cpu_s[1] / max(1, stored_total) * 1e6 if cpu_s[1] is not None else None,
        "load_cpu_s": [round(r["cpu_s"], 1) for r in results],
        "size_before": size_before,
        "size_after": size_after,
        "bytes_per_message": per_window,
        "bytes_per_device_day": {k: v * 2 * WINDOWS_PER_DAY for k, v in per_window.items()},
        "profile": spy.summary(),
    }


def phase_propagation(args: argparse.Namespace, hub: HubProcess, mqtt: Mosquitto,
                      common: dict[str, Any], db: Db) -> dict[str, Any]:  # fmt: skip
    devices = fleet(args.devices, args.groups)
    groups = sorted({g for _, g in devices})
    # Workers stop when every device has the new version, at the latest at `end`.
    end = time.monotonic() + args.settle_timeout + args.lead + args.interval * 3 + 60
    spec = {**common, "interval": args.interval, "window_s": args.window_s, "end_at": end,
            "telemetry": not args.no_telemetry, "target_version": 2}  # fmt: skip
    deployed: dict[str, float] = {}
    spy = Profiler(args.out if args.profile else None, pid_of(hub), "propagation")
    import threading

    def deploy() -> None:
        # The devices' births (one state message each) are stored first: a fleet that has just
        # connected is a different measurement (the writer and the event loop share the GIL).
        settle = time.monotonic()
        while not args.no_telemetry and time.monotonic() - settle < args.settle_timeout:
            if int(db.scalar("SELECT count(*) FROM devices") or 0) >= len(devices):
                break
            time.sleep(0.5)
        deployed["settle_s"] = time.monotonic() - settle
        time.sleep(args.lead)
        deployed["cpu"] = Cpu(pid_of(hub), pid_of(mqtt))  # type: ignore[assignment]
        deployed["t0"] = time.monotonic()
        spy.start(args.interval)
        for g in groups:
            r = hub.api("PUT", f"/api/v1/groups/{g}/deployment", json={"model": MODEL, "stable": 2})
            r.raise_for_status()
        deployed["t1"] = time.monotonic()

    def on_ready() -> None:
        threading.Thread(target=deploy, daemon=True).start()

    results = run_phase("propagation", split(devices, args.procs), spec, timeout=end - time.monotonic() + 60,
                        on_ready=on_ready)  # fmt: skip
    meter = deployed.pop("cpu", None)
    cores = meter.cores() if isinstance(meter, Cpu) else [None, None]
    t0 = deployed["t0"]
    seen = sorted(v - t0 for r in results for v in r["seen"].values())
    installed = sorted(v - t0 for r in results for v in r["installed"].values())
    n = len(devices)

    def at(values: list[float], q: float) -> float | None:
        k = int(np.ceil(q * n)) - 1
        return values[k] if 0 <= k < len(values) else None

    timed = [(at, v) for r in results for at, v in zip(r["poll_at"], r["latencies_us"], strict=True)]
    before = [v for at, v in timed if at < t0]
    after = [v for at, v in timed if at >= t0]
    statuses: dict[str, int] = {}
    for r in results:
        for k, v in r["statuses"].items():
            statuses[str(k)] = statuses.get(str(k), 0) + v
    return {
        "devices": n,
        "births_stored_s": deployed.get("settle_s"),
        "groups": len(groups),
        "interval_s": args.interval,
        "deploy_calls_s": deployed["t1"] - t0,
        "assignment_s": {f"p{int(q * 100)}": at(seen, q) for q in (0.5, 0.9, 0.99, 1.0)},
        "installed_s": {f"p{int(q * 100)}": at(installed, q) for q in (0.5, 0.9, 0.99, 1.0)},
        "updated": len(installed),
        "poll_p50_ms_before": (percentile(before, 50) or 0) / 1000,
        "poll_p99_ms_before": (percentile(before, 99) or 0) / 1000,
        "poll_p50_ms": (percentile(after, 50) or 0) / 1000,
        "poll_p99_ms": (percentile(after, 99) or 0) / 1000,
        "polls": sum(r["cycles"] for r in results),
        "statuses": statuses,
        "errors": {k: v for r in results for k, v in r["errors"].items()},
        "windows_sent": sum(r["windows_sent"] for r in results),
        "hub_cores": cores[0],
        "broker_cores": cores[1],
        "load_cpu_s": [round(r["cpu_s"], 1) for r in results],
        "telemetry": spec["telemetry"],
        "profile": spy.summary(),
    }


# -- report ------------------------------------------------------------------------------------


def _f(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def table(results: dict[str, Any]) -> list[list[str]]:
    rows: list[list[str]] = []
    p = results.get("polls")
    if p:
        verdict = "PASS" if p["polls_per_s"] >= TARGET_POLLS else "FAIL"
        rows += [
            ["metadata polls/s (root probe 404 + timestamp " + ("304" if p["etag"] else "200") + ")",
             _f(p["polls_per_s"]), f"≥ {TARGET_POLLS:,.0f}: {verdict}"],
            ["  HTTP requests/s", _f(p["requests_per_s"]), ""],
            ["  poll latency p50 / p99 ms", f"{_f(p['p50_ms'], 1)} / {_f(p['p99_ms'], 1)}",
             f"{p['connections']} connections"],
            ["  hub CPU (cores); µs per poll", f"{_f(p['hub_cores'], 2)}; {_f(p['hub_cpu_us_per_poll'])}",
             f"errors {p['errors']}"],
        ]  # fmt: skip
    i = results.get("ingest")
    if i:
        rate = i["ingested_per_s_steady"] or i["ingested_per_s_overall"]
        verdict = "PASS" if rate >= TARGET_INGEST else "FAIL"
        lost = (
            "none lost"
            if i["lost"] == 0 and i["duplicates"] == 0
            else f"lost {i['lost']}, dup {i['duplicates']}"
        )
        rows += [
            ["telemetry ingested/s (rows in the DB, 10-90 %)", _f(i["ingested_per_s_steady"]),
             f"≥ {TARGET_INGEST:,.0f}: {verdict}"],
            ["  overall ingested/s; published/s",
             f"{_f(i['ingested_per_s_overall'])}; {_f(i['published_per_s'])}",
             f"{i['messages_acked']:,} messages from {i['devices']:,} devices, {lost}"],
            ["  hub / broker CPU (cores)", f"{_f(i['hub_cores'], 2)} / {_f(i['broker_cores'], 2)}",
             f"hub {_f(i['hub_cpu_us_per_message'])} µs, "
             f"broker {_f(i['broker_cpu_us_per_message'])} µs per message"],
        ]  # fmt: skip
        b = i["bytes_per_device_day"]
        per = i["bytes_per_message"]
        rows += [
            ["DB bytes per message (summary or drift)", _f(per.get("database"), 0),
             ", ".join(f"{k} {v:,.0f}" for k, v in per.items() if k != "database")],
            ["DB size per device-day (1 model, 576 messages)",
             f"{b.get('database', 0) / 1e6:,.2f} MB", results["db"]],
        ]  # fmt: skip
    g = results.get("propagation")
    if g:
        a, s = g["assignment_s"], g["installed_s"]
        rows += [
            [f"deployment to 99 % of {g['devices']:,} devices ({g['interval_s']:.0f} s poll), s",
             _f(a["p99"], 1), f"p50 {_f(a['p50'], 1)}, p90 {_f(a['p90'], 1)}, all {_f(a['p100'], 1)}"],
            ["  model fetched by 99 %, s", _f(s["p99"], 1), f"{g['updated']:,} updated"],
            ["  poll latency p50 / p99 ms, before the deploy",
             f"{_f(g['poll_p50_ms_before'], 1)} / {_f(g['poll_p99_ms_before'], 1)}",
             f"births stored in {_f(g['births_stored_s'], 1)} s"],
            ["  poll latency p50 / p99 ms, after it (checks + downloads)",
             f"{_f(g['poll_p50_ms'], 1)} / {_f(g['poll_p99_ms'], 1)}",
             f"hub CPU {_f(g['hub_cores'], 2)} cores; deploy calls {_f(g['deploy_calls_s'], 1)} s"],
        ]  # fmt: skip
    return rows


def render(results: dict[str, Any], markdown: bool) -> str:
    header = ["figure", "value", "note"]
    rows = table(results)
    body = report.markdown_table(header, rows) if markdown else report.text_table(header, rows)
    m = results["machine"]
    lines = [
        f"machine: {m['cpu']}, {m['cores']} cores; load average {m['loadavg_at_start']} at start, "
        f"{results['loadavg_at_end']} at end; {results['procs']} load process(es)",
        f"CPU pressure (tasks waiting for a CPU) at start {results['cpu_pressure_at_start']}, "
        f"at end {results['cpu_pressure_at_end']}",
        f"command: {results['command']}",
        "",
        body,
    ]
    return "\n".join(lines) + "\n"


# -- main ----------------------------------------------------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m tests.benchmarks.fleet_sim", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--phases", default="polls,ingest,propagation")
    ap.add_argument("--procs", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                    help="load processes (default: cores minus one, for the hub)")  # fmt: skip
    ap.add_argument("--groups", type=int, default=10)
    ap.add_argument("--poll-devices", type=int, default=1000)
    ap.add_argument("--poll-concurrency", type=int, default=64, help="connections per load process")
    ap.add_argument("--duration", type=float, default=15.0, help="measured seconds of the polls phase")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument(
        "--hub-http",
        choices=["serve", "h11", "httptools"],
        default="serve",
        help="serve: outpost-hub serve as it is (httptools, request head bounded); h11, httptools: the "
        "same app on uvicorn's stock protocol of that name",
    )
    ap.add_argument("--no-etag", action="store_true", help="poll as the agent does today: no If-None-Match")
    ap.add_argument("--ingest-devices", type=int, default=1000)
    ap.add_argument("--ingest-windows", type=int, default=10, help="windows per device (2 messages each)")
    ap.add_argument("--ingest-timeout", type=float, default=300.0)
    ap.add_argument(
        "--hub-queue",
        type=int,
        default=1_000_000,
        help="the hub's mqtt_queue_size (0: its default, 10,000; see docs/benchmarks.md for why not)",
    )
    ap.add_argument("--devices", type=int, default=10000, help="devices in the propagation phase")
    ap.add_argument("--interval", type=float, default=60.0, help="poll interval of the propagation phase")
    ap.add_argument(
        "--lead", type=float, default=5.0, help="seconds between the devices' start and the deploy"
    )
    ap.add_argument("--no-telemetry", action="store_true", help="propagation without MQTT")
    ap.add_argument("--settle-timeout", type=float, default=300.0, help="longest wait for the births")
    ap.add_argument(
        "--window-s", type=float, default=WINDOW_S, help="telemetry window of the propagation phase"
    )
    ap.add_argument("--quick", action="store_true", help="a few seconds per phase, ~50 devices (smoke)")
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    ap.add_argument("--profile", action="store_true", help="py-spy on the hub in each phase (into --out)")
    ap.add_argument("--profile-seconds", type=float, default=15.0, help="how long the ingest profile runs")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, database)")
    args = ap.parse_args(argv)
    if args.quick:
        args.poll_devices, args.poll_concurrency, args.duration, args.warmup = 50, 8, 2.0, 0.5
        args.ingest_devices, args.ingest_windows = 50, 4
        args.devices, args.interval, args.lead, args.window_s = 50, 2.0, 0.5, 2.0
        args.settle_timeout = 30.0
    return args


def build_packages(work: Path) -> dict[int, Path]:
    from tests.support.packages import wine_versions

    return wine_versions(work / "packages", (1, 2))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = set(phases) - {"polls", "ingest", "propagation"}
    if unknown:
        raise SystemExit(f"unknown phases: {', '.join(sorted(unknown))}")
    db_url = os.environ.get("OUTPOST_BENCH_DATABASE_URL", "")
    results: dict[str, Any] = {
        "machine": report.machine(),
        "cpu_pressure_at_start": pressure(),
        "command": " ".join([sys.executable, "-m", "tests.benchmarks.fleet_sim", *argv]),
        "procs": args.procs,
        "db": "PostgreSQL" if db_url else "SQLite",
        "hub_http": args.hub_http,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "mosquitto": mosquitto_version(),
    }
    work = Path(tempfile.mkdtemp(prefix="outpost-fleet-"))
    broker: Mosquitto | None = None
    hub: HubProcess | None = None
    try:
        packages = build_packages(work)
        bodies = message_bodies(packages[1].with_suffix(""))
        results["message_bytes"] = {k: len(v) + 100 for k, v in bodies.items()}
        broker = Mosquitto(work / "mqtt", config=broker_config).start()
        settings = {"mqtt_queue_size": args.hub_queue} if args.hub_queue else None
        hub = HubProcess(work / "hub", database_url=db_url, settings=settings)
        if args.hub_http == "serve":
            hub.start(mqtt_url=broker.url)  # outpost-hub serve, as users run it
        else:
            start_hub_with(hub, broker.url, args.hub_http)
        from hub.client import package_tar

        for v in (1, 2):  # as `outpost push` and `outpost deploy` do, without a process each
            hub.api(
                "POST", f"/api/v1/models/{MODEL}/versions", data=package_tar(packages[v])
            ).raise_for_status()
        for _, g in fleet(args.groups * 40, args.groups)[::40]:
            hub.api(
                "PUT", f"/api/v1/groups/{g}/deployment", json={"model": MODEL, "stable": 1}
            ).raise_for_status()
        common = {
            "hub_host": "127.0.0.1", "hub_port": hub.port, "mqtt_host": "127.0.0.1", "mqtt_port": broker.port,
            "etag": not args.no_etag, "bodies": bodies, "versions": {MODEL: 1},
        }  # fmt: skip
        db = Db(hub, db_url)
        runs = {
            "polls": lambda: phase_polls(args, hub, broker, common),
            "ingest": lambda: phase_ingest(args, hub, broker, common, db),
            "propagation": lambda: phase_propagation(args, hub, broker, common, db),
        }
        for phase in phases:
            try:
                results[phase] = runs[phase]()
            except Exception as exc:  # reported, and the other phases still run
                results.setdefault("failed", {})[phase] = f"{type(exc).__name__}: {exc}"
                print(f"phase {phase} failed: {exc!r}", file=sys.stderr)
        results["hub_errors"] = [
            line for line in hub.log().splitlines() if "ERROR" in line or "Traceback" in line
        ][:20]
    finally:
        if hub is not None and hub.proc is not None:
            hub.stop()
        if broker is not None:
            broker.stop()
        results["loadavg_at_end"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
        results["cpu_pressure_at_end"] = pressure()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "fleet.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / "fleet.md").write_text(render(results, markdown=True))
    print(render(results, markdown=False))
    for phase, error in results.get("failed", {}).items():
        print(f"FAILED {phase}: {error}")
    return results


if __name__ == "__main__":
    main()
