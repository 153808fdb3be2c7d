# ruff: noqa: RUF001  (the targets are named as the report names them: multiplication sign, dash)
"""The paired verdicts: ratios round by round, the median judged, the one-run ratio beside it, and
no PASS from figures that are missing."""

from __future__ import annotations

from typing import Any

from tests.benchmarks import paired


def _result(agent_rps: list[float], peer_rps: list[float], agent_p50: list[float],
            peer_p50: list[float]) -> dict[str, Any]:
    def figs(rps: list[float], p99: float) -> list[dict[str, Any]]:
        return [{"status": "ok", "throughput_rps": v, "p99_us": p99} for v in rps]

    figures = {
        "tabular_c16": {"agent": figs(agent_rps, 900.0), "peer": figs(peer_rps, 4000.0)},
        "tabular_c1": {"agent": [{"p50_us": v} for v in agent_p50],
                       "peer": [{"p50_us": v} for v in peer_p50]},
    }
    return {"status": "ok", "rounds": len(agent_rps), "warmup_s": 0.5, "duration_s": 3.0,
            "figures": figures,
            "ratios": {field: paired.ratios(figures, scenario, field)
                       for _, scenario, field, _, _ in paired.RATIOS}}


def test_the_median_of_the_rounds_ratios_is_judged() -> None:
    # One disturbed round (the third: 4.0x) does not decide; the median of 5.2, 5.1, 4.0 is 5.1.
    result = _result([52_000, 51_000, 40_000], [10_000, 10_000, 10_000], [40, 52, 45], [100, 100, 100])
    rows = {v["target"]: v for v in paired.verdicts(result, [])}
    throughput = rows["16 clients, throughput: agent ≥ 5× peer"]
    assert throughput["value"] == 5.1
    assert throughput["verdict"] == "PASS"
    assert throughput["contender"] == "agent (paired)"
    assert "4.00–5.20" in throughput["measured"]
    p50 = rows["1 client, p50: agent ≤ 0.5× peer"]
    assert p50["value"] == 0.45 and p50["verdict"] == "PASS"
    assert rows["16 clients, p99: agent ≤ peer"]["value"] == 0.225


def test_a_median_short_of_the_target_fails() -> None:
    result = _result([48_000, 49_000, 60_000], [10_000] * 3, [51, 60, 40], [100] * 3)
    rows = {v["target"]: v for v in paired.verdicts(result, [])}
    assert rows["16 clients, throughput: agent ≥ 5× peer"]["verdict"] == "FAIL"
    assert rows["1 client, p50: agent ≤ 0.5× peer"]["verdict"] == "FAIL"


def test_the_one_run_ratio_is_shown_beside() -> None:
    result = _result([50_000] * 3, [10_000] * 3, [40] * 3, [100] * 3)
    single = [{"target": "16 clients, throughput: agent ≥ 5× peer", "contender": "agent",
               "measured": "4.82×", "value": 4.82}]
    rows = {v["target"]: v for v in paired.verdicts(result, single)}
    assert rows["16 clients, throughput: agent ≥ 5× peer"]["measured"].endswith("; one run 4.82×)")


def test_a_failed_run_gives_no_verdict() -> None:
    rows = paired.verdicts({"status": "failed: the peer exited"}, [])
    assert len(rows) == len(paired.RATIOS)
    assert all(v["verdict"] == "n/a" and v["value"] is None for v in rows)
    assert "failed: the peer exited" in paired.render({"status": "failed: the peer exited"})


def test_render_lists_every_round() -> None:
    text = paired.render(_result([52_000, 51_000], [10_000, 9_000], [40, 41], [100, 90]))
    assert "agent 52,000, 51,000; peer 10,000, 9,000" in text
    assert "ratios 5.20, 5.67" in text
