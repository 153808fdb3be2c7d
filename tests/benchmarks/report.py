# ruff: noqa: RUF001  (the table is read by people: the multiplication sign, dash and micro sign are meant)
"""Turning one run's figures into the side-by-side table, the target verdicts and the files.

Pure apart from `machine()` and `write()`: the figures are a plain dict
`{contender: {scenario: {field: value, "status": ...}}}`, the same one written as results.json.
A figure that could not be taken shows its status ("n/a", "unavailable", "invalid", ...)
instead of a number, and a target that depends on it is "n/a", never PASS.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

MB = 1024 * 1024

# (row label, scenario, field, unit scale). Scale 1e-3 turns µs into ms.
ROWS: list[tuple[str, str, str, float]] = [
    ("tabular, 1 client: p50 µs", "tabular_c1", "p50_us", 1),
    ("tabular, 1 client: p99 µs", "tabular_c1", "p99_us", 1),
    ("tabular, 1 client: req/s", "tabular_c1", "throughput_rps", 1),
    ("tabular, 16 clients: req/s", "tabular_c16", "throughput_rps", 1),
    ("tabular, 16 clients: p50 µs", "tabular_c16", "p50_us", 1),
    ("tabular, 16 clients: p99 µs", "tabular_c16", "p99_us", 1),
    ("tabular, 16 clients: failed requests", "tabular_c16", "errors", 1),
    ("tabular, 16 clients: server CPU, cores", "tabular_c16", "server_cores", 1),
    ("tabular, 16 clients: server CPU µs/req", "tabular_c16", "server_us_per_req", 1),
    ("tabular, 16 clients: client CPU µs/req", "tabular_c16", "client_us_per_req", 1),
    ("tabular, 16 clients: client CPU, cores", "tabular_c16", "client_cores", 1),
    ("conv 3×224×224, 1 client, JSON: req/s", "conv_json_c1", "throughput_rps", 1),
    ("conv 3×224×224, 1 client, JSON: p50 ms", "conv_json_c1", "p50_us", 1e-3),
    ("conv 3×224×224, 1 client, binary: req/s", "conv_binary_c1", "throughput_rps", 1),
    ("conv 3×224×224, 1 client, binary: p50 ms", "conv_binary_c1", "p50_us", 1e-3),
    ("RSS, tabular loaded, idle: MB", "memory", "rss_idle_mb", 1),
    ("RSS, under 16 clients (steady): MB", "memory", "rss_steady_mb", 1),
    ("RSS, peak (VmHWM): MB", "memory", "rss_peak_mb", 1),
    ("RSS, monitor windows closing (window_s = 1), 16 clients: MB", "memory", "rss_windows_steady_mb", 1),
    ("RSS, monitor windows closing, peak (VmHWM): MB", "memory", "rss_windows_peak_mb", 1),
    ("start-up to ready: s", "startup", "seconds", 1),
    ("switch + rollback, 16 clients: failed requests", "switch", "errors", 1),
    ("switch + rollback: p99 steady µs", "switch", "p99_steady_us", 1),
    ("switch + rollback: p99 during switch µs", "switch", "p99_switch_us", 1),
    ("switch + rollback: p99 during rollback µs", "switch", "p99_rollback_us", 1),
]

LIMIT_NOTES = (
    "limit = onnxruntime called in-process, default session options, no HTTP: "
    "'tabular, 1 client' is one row per call; 'tabular, 16 clients: req/s' is rows/s with "
    "256 rows per call; 'conv, binary' is one image per call; RSS and start-up are a bare "
    "python + numpy + onnxruntime process with the tabular model loaded (the floor)."
)


def _fmt(value: Any, scale: float) -> str:
    if value is None:
        return "–"
    if isinstance(value, int | float) and not isinstance(value, bool):
        v = value * scale
        if isinstance(value, int) and scale == 1:
            return f"{v:,}"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.2f}"
    return str(value)


def cell(figures: dict[str, Any], scenario: str, field: str, scale: float = 1) -> str:
    fig = figures.get(scenario)
    if fig is None:
        return "–"
    status = fig.get("status", "ok")
    if status != "ok":
        return status.split(":")[0]
    return _fmt(fig.get(field), scale)


# --- targets -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    text: str
    threshold: str
    measure: Callable[[dict[str, Any], dict[str, Any]], tuple[float | None, str]]
    ok: Callable[[float], bool]
    scenario: str  # an agent variant that did not run this scenario gets no row


def _get(figs: dict[str, Any], scenario: str, field: str) -> float | None:
    fig = figs.get(scenario) or {}
    if fig.get("status", "ok") != "ok":
        return None
    value = fig.get(field)
    return float(value) if isinstance(value, int | float) else None


def _ratio(a: float | None, b: float | None) -> tuple[float | None, str]:
    if a is None or b is None or b == 0:
        return None, "n/a"
    return a / b, f"{a / b:.2f}×"


def _switch(agent: dict[str, Any], peer: dict[str, Any]) -> tuple[float | None, str]:
    fig = agent.get("switch") or {}
    if not fig or fig.get("status", "ok") != "ok":
        return None, "n/a"
    if (fig.get("version_after_switch"), fig.get("version_after_rollback")) != ("2", "1"):
        # A switch that did not happen must not pass as a smooth one.
        return float("inf"), (f"versions served {fig.get('version_after_switch')} then "
                               f"{fig.get('version_after_rollback')}, expected 2 then 1")
    for when in ("switch", "rollback"):
        if fig.get(f"answer_after_{when}") != "ok":
            return float("inf"), f"wrong answer after the {when}: {fig.get(f'answer_after_{when}')}"
    during = [v for v in (fig.get("p99_switch_us"), fig.get("p99_rollback_us")) if v is not None]
    return _ratio(max(during) if during else None, fig.get("p99_steady_us"))


def _failed(agent: dict[str, Any], peer: dict[str, Any]) -> tuple[float | None, str]:
    v = _get(agent, "switch", "errors")
    return v, "n/a" if v is None else f"{v:.0f}"


def _mb(field: str) -> Callable[[dict[str, Any], dict[str, Any]], tuple[float | None, str]]:
    def measure(agent: dict[str, Any], peer: dict[str, Any]) -> tuple[float | None, str]:
        v = _get(agent, "memory", field)
        return v, "n/a" if v is None else f"{v:.1f} MB"
    return measure


def _over_floor(agent: dict[str, Any], peer: dict[str, Any]) -> tuple[float | None, str]:
    # RSS counts the libraries' file-backed pages, and how many of those are resident depends
    # on the page cache (a freshly installed venv maps 12-16 MB more for every process, the
    # bare floor included). What the agent adds on top of a bare python + numpy + onnxruntime
    # process with the same model, measured in the same run, does not.
    v, floor = _get(agent, "memory", "rss_peak_mb"), _get(peer.get("_limit", {}), "memory", "rss_peak_mb")
    if v is None or floor is None:
        return None, "n/a"
    return v - floor, f"{v - floor:.1f} MB"


TARGETS = [
    Target("1 client, p50: agent ≤ 0.5× peer", "≤ 0.5×",
           lambda a, p: _ratio(_get(a, "tabular_c1", "p50_us"), _get(p, "tabular_c1", "p50_us")),
           lambda r: r <= 0.5, "tabular_c1"),
    Target("16 clients, throughput: agent ≥ 5× peer", "≥ 5×",
           lambda a, p: _ratio(_get(a, "tabular_c16", "throughput_rps"),
                               _get(p, "tabular_c16", "throughput_rps")),
           lambda r: r >= 5, "tabular_c16"),
    Target("16 clients, p99: agent ≤ peer", "≤ 1×",
           lambda a, p: _ratio(_get(a, "tabular_c16", "p99_us"), _get(p, "tabular_c16", "p99_us")),
           lambda r: r <= 1, "tabular_c16"),
    Target("large tensor: agent binary ≥ 10× peer JSON throughput", "≥ 10×",
           lambda a, p: _ratio(_get(a, "conv_binary_c1", "throughput_rps"),
                               _get(p, "conv_json_c1", "throughput_rps")),
           lambda r: r >= 10, "conv_binary_c1"),
    Target("RSS serving one model, peak (VmHWM) ≤ 75 MB", "≤ 75 MB", _mb("rss_peak_mb"),
           lambda v: v <= 75, "memory"),
    Target("RSS serving one model, steady ≤ 75 MB", "≤ 75 MB", _mb("rss_steady_mb"),
           lambda v: v <= 75, "memory"),
    Target("RSS above the bare process (75 MB target − 57 MB floor) ≤ 18 MB", "≤ 18 MB", _over_floor,
           lambda v: v <= 18, "memory"),
    Target("RSS with monitor windows closing, peak (VmHWM) ≤ 75 MB", "≤ 75 MB", _mb("rss_windows_peak_mb"),
           lambda v: v <= 75, "memory"),
    Target("switch + rollback under load: failed requests", "= 0", _failed,
           lambda v: v == 0, "switch"),
    Target("switch + rollback: p99 during ≤ 2× steady p99", "≤ 2×", _switch,
           lambda r: r <= 2, "switch"),
]


def evaluate(figures: dict[str, dict[str, Any]], agents: list[str], peer: str = "peer"
             ) -> list[dict[str, Any]]:
    """One verdict per target and agent variant: PASS, FAIL, or n/a when a figure is missing."""
    verdicts = []
    for target in TARGETS:
        for agent in agents:
            figs = figures.get(agent)
            if figs is not None and target.scenario not in figs:
                continue
            reference = {**figures.get(peer, {}), "_limit": figures.get("limit", {})}
            value, shown = target.measure(figs or {}, reference)
            verdict = "n/a" if value is None else ("PASS" if target.ok(value) else "FAIL")
            verdicts.append({"target": target.text, "threshold": target.threshold,
                             "contender": agent, "measured": shown, "value": value,
                             "verdict": verdict})
    return verdicts


# --- output ------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    import onnxruntime

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        load = []
    return {
        "cpu": cpu, "cores": os.cpu_count(), "cores_usable": len(os.sched_getaffinity(0)),
        "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
        "os": platform.platform(), "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg_at_start": " ".join(load),
    }


def table_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    keys = list(results["contenders"])
    header = ["", *(results["contenders"][k]["label"] for k in keys)]
    rows = []
    for label, scenario, field, scale in ROWS:
        cells = [cell(results["figures"].get(k, {}), scenario, field, scale) for k in keys]
        if all(c == "–" for c in cells):
            continue
        rows.append([label, *cells])
    return header, rows


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for n, r in enumerate([header, *rows]):
        first = r[0].ljust(widths[0])
        lines.append("  ".join([first, *(c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True))]))
        if n == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def verdict_table(verdicts: list[dict[str, Any]], labels: dict[str, str]) -> list[list[str]]:
    return [[v["target"], labels.get(v["contender"], v["contender"]), v["measured"],
             v["threshold"], v["verdict"]] for v in verdicts]


def statuses(results: dict[str, Any]) -> list[str]:
    """Every figure that is not a number, with its reason, and each contender's notes."""
    out = []
    for key, info in results["contenders"].items():
        if info.get("status", "ok") != "ok":
            out.append(f"{info['label']}: {info['status']}")
        out += [f"{info['label']}: {note}" for note in info.get("notes", [])]
        for scenario, fig in results["figures"].get(key, {}).items():
            if isinstance(fig, dict) and fig.get("status", "ok") != "ok":
                out.append(f"{info['label']}, {scenario}: {fig['status']}")
    return out


def render_text(results: dict[str, Any]) -> str:
    header, rows = table_rows(results)
    labels = {k: v["label"] for k, v in results["contenders"].items()}
    vt = verdict_table(results["targets"], labels)
    parts = [*(f"{c['label']}: {c['description']}" for c in results["contenders"].values()),
             "", text_table(header, rows), "", LIMIT_NOTES, ""]
    if vt:
        parts += [text_table(["target", "contender", "measured", "needed", "verdict"], vt), ""]
    parts += [f"note: {s}" for s in statuses(results)]
    if "paired" in results:
        from tests.benchmarks.paired import render as render_paired

        parts += ["", render_paired(results["paired"])]
    if "monitor_cost" in results:
        from tests.benchmarks.monitor_cost import render as render_monitor

        parts += ["", render_monitor(results["monitor_cost"])]
    if "shadow_cost" in results:
        from tests.benchmarks.shadow_cost import render as render_shadow

        parts += ["", render_shadow(results["shadow_cost"])]
    if "mqtt_cost" in results:
        from tests.benchmarks.mqtt_cost import render as render_mqtt

        parts += ["", render_mqtt(results["mqtt_cost"])]
    if "cache_cost" in results:
        from tests.benchmarks.cache_cost import render as render_cache

        parts += ["", render_cache(results["cache_cost"])]
    if "drift_power" in results:
        from tests.benchmarks.drift_power import render

        parts += ["", render(results["drift_power"])]
    return "\n".join(parts)


def render_markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    header, rows = table_rows(results)
    labels = {k: v["label"] for k, v in results["contenders"].items()}
    lines = [
        "# Outpost benchmark results", "",
        *(f"- **{c['label']}**: {c['description']}" for c in results["contenders"].values()),
        "",
        f"- machine: {m['cpu']}, {m['cores']} cores ({m['cores_usable']} usable), {m['os']}",
        f"- python {m['python']}, onnxruntime {m['onnxruntime']}",
        f"- date: {m['date']}; load average at start {m['loadavg_at_start']}, "
        f"at end {m.get('loadavg_at_end', '?')}",
        f"- command: `{results['command']}`",
        f"- settings: {results['settings']}",
        "", markdown_table(header, rows), "", LIMIT_NOTES, "",
    ]
    vt = verdict_table(results["targets"], labels)
    if vt:
        lines += ["## Targets", "",
                  markdown_table(["target", "contender", "measured", "needed", "verdict"], vt), ""]
    notes = statuses(results)
    if notes:
        lines += ["## Notes", "", *(f"- {s}" for s in notes), ""]
    if "paired" in results:
        from tests.benchmarks.paired import render as render_paired

        lines += [render_paired(results["paired"], markdown=True), ""]
    if "monitor_cost" in results:
        from tests.benchmarks.monitor_cost import render as render_monitor

        lines += [render_monitor(results["monitor_cost"], markdown=True), ""]
    if "shadow_cost" in results:
        from tests.benchmarks.shadow_cost import render as render_shadow

        lines += [render_shadow(results["shadow_cost"], markdown=True), ""]
    if "mqtt_cost" in results:
        from tests.benchmarks.mqtt_cost import render as render_mqtt

        lines += [render_mqtt(results["mqtt_cost"], markdown=True), ""]
    if "cache_cost" in results:
        from tests.benchmarks.cache_cost import render as render_cache

        lines += [render_cache(results["cache_cost"], markdown=True), ""]
    if "drift_power" in results:
        from tests.benchmarks.drift_power import render

        lines += [render(results["drift_power"], markdown=True), ""]
    return "\n".join(lines)


def write(results: dict[str, Any], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "results.json", out / "results.md"
    json_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    md_path.write_text(render_markdown(results))
    return json_path, md_path


def command_line(argv: list[str]) -> str:
    return " ".join([sys.executable, "-m", "tests.benchmarks.run", *argv])
