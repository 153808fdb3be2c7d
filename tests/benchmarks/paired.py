# ruff: noqa: RUF001  (read by people: the multiplication sign and micro sign are meant)
"""The three targets that compare the agent with the peer (1-client p50, 16-client throughput and
p99), measured head to head: both servers up side by side with the tabular model, measured in
turns, several short rounds, the verdict on the median of the rounds' ratios.

    python -m tests.benchmarks.run --only peer,agent,paired

Why: the contenders of the main table are measured one after the other, a minute or more apart,
and this machine's speed drifts by more than that: two 5 s runs of the same agent a few seconds
apart differed by 12% (27.9 and 31.3 µs a request, 2026-11-28), the peer's by 13%. A ratio of two
such samples moves by as much. In a round the two measurements are seconds apart, the order
alternates from round to round, and the median ignores a round that a neighbour on the host
disturbed. The single-run ratios stay in the target rows, beside the paired ones.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

ROUNDS = 5
QUICK_ROUNDS = 3
ROUND_WARMUP_S = 0.5
ROUND_DURATION_S = 3.0
SCENARIOS = (("tabular_c16", 16), ("tabular_c1", 1))

# (target text as in report.TARGETS, scenario, field, threshold text, check on the ratio agent / peer)
RATIOS: tuple[tuple[str, str, str, str, Any], ...] = (
    ("1 client, p50: agent ≤ 0.5× peer", "tabular_c1", "p50_us", "≤ 0.5×", lambda r: r <= 0.5),
    ("16 clients, throughput: agent ≥ 5× peer", "tabular_c16", "throughput_rps", "≥ 5×", lambda r: r >= 5),
    ("16 clients, p99: agent ≤ peer", "tabular_c16", "p99_us", "≤ 1×", lambda r: r <= 1),
)


def run(packages: Any, wl: Any, st: Any, workdir: Path, quick: bool = False) -> dict[str, Any]:
    """`rounds` rounds; in each, both servers at 16 clients then at 1 client, in alternating order.
    `packages`, `wl` and `st` are run.py's."""
    from dataclasses import replace

    from tests.benchmarks import run as bench
    from tests.benchmarks.models import TABULAR
    from tests.benchmarks.servers import start_agent, start_peer

    rounds = QUICK_ROUNDS if quick else ROUNDS
    short = replace(st, warmup_s=min(st.warmup_s, ROUND_WARMUP_S),
                    duration_s=min(st.duration_s, ROUND_DURATION_S))
    figures: dict[str, dict[str, list[dict[str, Any]]]] = {
        scenario: {"peer": [], "agent": []} for scenario, _ in SCENARIOS
    }
    with (
        start_peer(workdir, "paired-peer", [packages.tabular]) as peer,
        start_agent(workdir, "paired-agent", "agent", [packages.tabular], {}) as agent,
    ):
        servers = {"peer": peer, "agent": agent}
        for r in range(rounds):
            order = ("peer", "agent") if r % 2 == 0 else ("agent", "peer")
            for scenario, connections in SCENARIOS:
                for key in order:
                    fig = bench.measure(servers[key], wl.tab_json, TABULAR, wl.tab_expected,
                                        connections, short)
                    if fig.get("status") != "ok":
                        return {"status": f"failed: {key}, {scenario}, round {r + 1}: {fig.get('status')}"}
                    fig.pop("rss_median_mb", None)
                    figures[scenario][key].append(fig)
        peer.stop()
        agent.stop()
    return {
        "status": "ok",
        "rounds": rounds,
        "warmup_s": short.warmup_s,
        "duration_s": short.duration_s,
        "figures": figures,
        "ratios": {field: ratios(figures, scenario, field) for _, scenario, field, _, _ in RATIOS},
    }


def ratios(figures: dict[str, dict[str, list[dict[str, Any]]]], scenario: str, field: str) -> list[float]:
    """Agent / peer of `field`, round by round."""
    pairs = zip(figures[scenario]["agent"], figures[scenario]["peer"], strict=True)
    return [a[field] / p[field] for a, p in pairs if a.get(field) and p.get(field)]


def verdicts(result: dict[str, Any], single: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The paired verdict of each ratio target, `single` (report.evaluate's rows for the agent)
    giving the one-run ratio shown beside it."""
    out = []
    for text, _, field, threshold, ok in RATIOS:
        row: dict[str, Any] = {"target": text, "threshold": threshold, "contender": "agent (paired)"}
        one = next((v for v in single if v["target"] == text and v["contender"] == "agent"), None)
        beside = f"; one run {one['measured']}" if one and one.get("value") is not None else ""
        values = result.get("ratios", {}).get(field) if result.get("status") == "ok" else None
        if not values:
            out.append({**row, "measured": "n/a" + beside, "value": None, "verdict": "n/a"})
            continue
        median = statistics.median(values)
        measured = (f"{median:.2f}× (median of {len(values)} paired rounds, "
                    f"{min(values):.2f}–{max(values):.2f}{beside})")
        verdict = "PASS" if ok(median) else "FAIL"
        out.append({**row, "measured": measured, "value": median, "verdict": verdict})
    return out


def render(result: dict[str, Any], markdown: bool = False) -> str:
    title = "Agent and peer head to head (tabular model, measured in turns)"
    if result.get("status") != "ok":
        return f"{'### ' if markdown else ''}{title}: {result.get('status')}"
    figs = result["figures"]

    def series(scenario: str, key: str, field: str, fmt: str) -> str:
        return ", ".join(format(f[field], fmt) for f in figs[scenario][key])

    lines = [
        f"{'### ' if markdown else ''}{title}",
        "",
        f"{result['rounds']} rounds of {result['duration_s']:g} s per server and scenario after "
        f"{result['warmup_s']:g} s of warm-up; the order alternates from round to round.",
        "",
        f"- 16 clients, req/s: agent {series('tabular_c16', 'agent', 'throughput_rps', ',.0f')}; "
        f"peer {series('tabular_c16', 'peer', 'throughput_rps', ',.0f')}",
        f"- 16 clients, p99 µs: agent {series('tabular_c16', 'agent', 'p99_us', '.0f')}; "
        f"peer {series('tabular_c16', 'peer', 'p99_us', '.0f')}",
        f"- 1 client, p50 µs: agent {series('tabular_c1', 'agent', 'p50_us', '.1f')}; "
        f"peer {series('tabular_c1', 'peer', 'p50_us', '.1f')}",
    ]
    for text, _, field, _, _ in RATIOS:
        values = result["ratios"][field]
        lines.append(f"- {text}: ratios {', '.join(f'{v:.2f}' for v in values)}")
    return "\n".join(lines)
