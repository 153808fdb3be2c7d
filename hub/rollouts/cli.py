"""`outpost rollout start | status | pause | resume | advance | abort`: the operator's rollout
commands (the hub URL and token from --hub/--token or OUTPOST_HUB/OUTPOST_TOKEN).

    outpost rollout start MODEL VERSION --group G [--steps 5,25,100] [--min-time 10m]
                                        [--min-requests 500] [gate options]
    outpost rollout status [ID]         all rollouts, or one with its decision log
    outpost rollout pause|resume|advance|abort ID [--reason TEXT]
"""

from __future__ import annotations

import argparse
import re
from typing import Any, TextIO

from hub.hub_commands import _client, _hub_options, _table
from hub.rollouts.plan import DEFAULT_MIN_REQUESTS, DEFAULT_MIN_SECONDS, DEFAULT_STEPS, Gates

_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")


def duration(text: str) -> float:
    """Seconds from "90", "90s", "10m", "1h", "2d"."""
    match = _DURATION.fullmatch(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a duration such as 90s, 10m, 1h")
    return float(match.group(1)) * _UNITS[match.group(2)]


def steps(text: str) -> list[int]:
    try:
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected percents separated by commas, e.g. 5,25,100"
        ) from None


def _pct(x: Any) -> str:
    return "-" if x is None else f"{x:.2%}"


def _ms(x: Any) -> str:
    return "-" if x is None else f"{x:.3g} ms"


def _when(iso: str) -> str:
    return iso[:19] + "Z"


def _ladder(r: dict[str, Any]) -> str:
    return " -> ".join(f"[{p}]" if i == r["step"] else str(p) for i, p in enumerate(r["steps"]))


def _gates(g: dict[str, Any]) -> str:
    drift = "halt on drift" if g["halt_on_drift"] else "drift ignored"
    return (
        f"error rate <= max(stable x {g['max_error_ratio']:g}, stable + {g['max_error_increase']:.2%}) "
        f"(no baseline: {g['max_error_rate']:.2%}), p95 <= {g['max_latency_ratio']:g} x stable, "
        f"fall-backs <= {g['max_fallbacks']}, {drift}"
    )


def _sums(name: str, s: dict[str, Any]) -> str:
    return (
        f"{name} {s['requests']} requests, {_pct(s['error_rate'])} errors, p95 {_ms(s['p95_ms'])}"
        f" ({s['devices']} devices reporting)"
    )


def rollout_text(r: dict[str, Any], out: TextIO) -> None:
    """One rollout and its decision log."""
    where = f"step {r['step'] + 1} of {len(r['steps'])} ({_ladder(r)})"
    print(
        f"rollout {r['id']}: {r['model']} v{r['stable']} -> v{r['candidate']} in group {r['group']}, "
        f"{r['state']} at {where}",
        file=out,
    )
    if r.get("reason"):
        print(f"  reason: {r['reason']}", file=out)
    print(
        f"  per step: at least {r['min_seconds']:g} s and {r['min_requests']} candidate requests; "
        f"started {_when(r['started'])} by {r['created_by']}",
        file=out,
    )
    print(f"  gates: {_gates(r['gates'])}", file=out)
    ev = r.get("evidence_now")
    if ev:
        print(f"  this step ({ev['step_seconds']:.0f} s): {_sums('candidate', ev['candidate'])};", file=out)
        print(f"    {_sums('stable', ev['stable'])}", file=out)
        print(
            f"    {ev['candidate_devices']} devices serve the candidate; fall-backs {len(ev['fallbacks'])}, "
            f"drift alerts {len(ev['drift_alerts'])}",
            file=out,
        )
    rows = [["at", "action", "actor", "percent", "reason"]]
    for d in r.get("decisions", []):
        rows.append([_when(d["at"]), d["action"], d["actor"], f"{d['percent']}%", d["reason"]])
    _table(rows, out, right=frozenset({3}))


def rollouts_text(found: list[dict[str, Any]], out: TextIO) -> None:
    if not found:
        print("no rollouts (outpost rollout start MODEL VERSION --group G)", file=out)
        return
    rows = [["id", "group", "model", "from", "to", "state", "step", "percent", "updated", "reason"]]
    for r in found:
        rows.append(
            [
                str(r["id"]),
                r["group"],
                r["model"],
                f"v{r['stable']}",
                f"v{r['candidate']}",
                r["state"],
                f"{r['step'] + 1}/{len(r['steps'])}",
                f"{r['percent']}%",
                _when(r["updated"]),
                r["reason"],
            ]
        )
    _table(rows, out, right=frozenset({0, 7}))


def _cmd_start(args: argparse.Namespace, out: TextIO) -> int:
    gates: dict[str, Any] = {}
    for key in (
        "max_error_ratio",
        "max_error_increase",
        "max_error_rate",
        "max_latency_ratio",
        "max_fallbacks",
    ):
        value = getattr(args, key)
        if value is not None:
            gates[key] = value
    if args.ignore_drift:
        gates["halt_on_drift"] = False
    doc = {
        "model": args.model,
        "candidate": args.version,
        "group": args.group,
        "steps": args.steps,
        "min_seconds": args.min_time,
        "min_requests": args.min_requests,
        "gates": gates,
    }
    rollout_text(_client(args).start_rollout(doc), out)
    return 0


def _cmd_status(args: argparse.Namespace, out: TextIO) -> int:
    client = _client(args)
    if args.id is None:
        rollouts_text(client.rollouts(args.model, args.group), out)
    else:
        rollout_text(client.rollout(args.id), out)
    return 0


def _cmd_action(args: argparse.Namespace, out: TextIO) -> int:
    rollout_text(_client(args).rollout_action(args.id, args.action, args.reason), out)
    return 0


def add_rollout_commands(commands: Any) -> None:
    p = commands.add_parser(
        "rollout",
        help="progressive rollouts: start, status, pause, resume, advance, abort",
        description="A candidate version ramped through canary percents in a group; the hub advances a "
        "step when the gates pass and halts (back to the stable version) when one fails.",
    )
    sub = p.add_subparsers(dest="rollout_command", metavar="COMMAND", required=True)
    defaults = Gates()

    s = sub.add_parser("start", help="start a rollout of MODEL VERSION in a group")
    s.add_argument("model")
    s.add_argument("version", type=int, metavar="VERSION", help="the candidate version")
    s.add_argument("--group", required=True)
    s.add_argument(
        "--steps",
        type=steps,
        default=list(DEFAULT_STEPS),
        help=f"canary percents, increasing, ending at 100 (default {','.join(map(str, DEFAULT_STEPS))})",
    )
    s.add_argument(
        "--min-time",
        type=duration,
        default=DEFAULT_MIN_SECONDS,
        help=f"least time per step, e.g. 90s, 10m, 1h (default {DEFAULT_MIN_SECONDS:g} s)",
    )
    s.add_argument(
        "--min-requests",
        type=int,
        default=DEFAULT_MIN_REQUESTS,
        help=f"least candidate requests per step (default {DEFAULT_MIN_REQUESTS})",
    )
    s.add_argument(
        "--max-error-ratio",
        type=float,
        help=f"candidate error rate / stable's (default {defaults.max_error_ratio})",
    )
    s.add_argument(
        "--max-error-increase",
        type=float,
        help=f"or candidate - stable error rate, the larger (default {defaults.max_error_increase})",
    )
    s.add_argument(
        "--max-error-rate",
        type=float,
        help=f"candidate error rate with no stable traffic to compare (default {defaults.max_error_rate})",
    )
    s.add_argument(
        "--max-latency-ratio",
        type=float,
        help=f"candidate p95 / stable p95 (default {defaults.max_latency_ratio})",
    )
    s.add_argument(
        "--max-fallbacks",
        type=int,
        help=f"candidate devices that may fall back (default {defaults.max_fallbacks})",
    )
    s.add_argument("--ignore-drift", action="store_true", help="do not halt on drift alerts on the candidate")
    _hub_options(s)
    s.set_defaults(handler=_cmd_start)

    s = sub.add_parser("status", help="all rollouts, or one with its decision log")
    s.add_argument("id", type=int, nargs="?", metavar="ID")
    s.add_argument("--model", help="only this model")
    s.add_argument("--group", help="only this group")
    _hub_options(s)
    s.set_defaults(handler=_cmd_status)

    for action, text in (
        ("pause", "stop advancing (the current percent stays)"),
        ("resume", "advance again; the step's minimum time and traffic count from now"),
        ("advance", "go to the next percent now, without the gates (after the last: complete)"),
        ("abort", "stop the rollout and put the stable version back (percent 0)"),
    ):
        s = sub.add_parser(action, help=text, description=text)
        s.add_argument("id", type=int, metavar="ID")
        s.add_argument("--reason", default="", help="recorded in the decision log")
        _hub_options(s)
        s.set_defaults(handler=_cmd_action, action=action)
