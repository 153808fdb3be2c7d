"""`outpost experiment start | stop | status`: on-device experiments from the command line (the
hub URL and token from --hub/--token or OUTPOST_HUB/OUTPOST_TOKEN).

    outpost experiment start MODEL STABLE CANDIDATE --group G (--ab WEIGHT | --shadow SAMPLE)
                             [--percent P]   devices in the canary run it (default 100: all)
    outpost experiment stop --group G        the stable version alone again
    outpost experiment status [MODEL] [--group G] [--all] [--json]
"""

from __future__ import annotations

import argparse
import json
from typing import Any, TextIO

from hub.hub_commands import _client, _describe, _hub_options, _percent, _table


def _bounded(low: int, high: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not between {low} and {high}")
        return value

    return parse


def _pct(x: Any) -> str:
    return "-" if x is None else f"{x:.2%}"


def _ci(ci: Any) -> str:
    return "-" if not ci else f"[{ci[0]:.1%}, {ci[1]:.1%}]"


def _pp(x: float) -> str:
    return f"{x * 100:+.2f}"


def _share(e: dict[str, Any]) -> str:
    if e["mode"] == "ab":
        return f"A/B: the candidate answers {e['weight']}% of requests"
    return f"shadow: {e['sample']}% of requests copied to the candidate after the stable answered"


def experiment_text(x: dict[str, Any], out: TextIO) -> None:
    """One experiment: what runs where, the verdict, each arm and each test."""
    state = "live" if x["live"] else f"stopped {x['stopped'][:19]}Z"
    print(
        f"experiment in group {x['group']}: {x['model']} v{x['stable']} (stable) vs v{x['candidate']} "
        f"(candidate), {_share(x['experiment'])}, on {x['percent']}% of devices",
        file=out,
    )
    print(f"  started {x['started'][:19]}Z by {x['started_by'] or '-'}, {state}", file=out)
    print(f"  verdict: {x['verdict']} (alpha {x['alpha']:g})", file=out)
    rows = [
        [
            "arm",
            "version",
            "devices",
            "requests",
            "errors",
            "error rate",
            "labelled",
            "accuracy",
            "accuracy 95% CI",
        ]
    ]
    for name in ("stable", "candidate"):
        a = x["arms"][name]
        acc = next(t for t in x["tests"] if t["metric"] == "accuracy")[name]
        rows.append(
            [name, f"v{a['version']}", str(a["devices"]), str(a["requests"]), str(a["errors"]),
             _pct(a["error_rate"]), str(a["labelled"]), _pct(a["accuracy"]), _ci(acc["ci"])]
        )  # fmt: skip
    _table(rows, out, right=frozenset({2, 3, 4, 5, 6, 7}))
    rows = [["test", "candidate", "stable", "diff (pp)", "95% CI (pp)", "z", "p", "verdict"]]
    for t in x["tests"]:
        ci = t["difference_ci"]
        rows.append(
            [
                t["metric"],
                _pct(t["candidate"]["rate"]),
                _pct(t["stable"]["rate"]),
                "-" if t["difference"] is None else _pp(t["difference"]),
                "-" if ci is None else f"[{_pp(ci[0])}, {_pp(ci[1])}]",
                "-" if t["z"] is None else f"{t['z']:.2f}",
                "-" if t["p_value"] is None else f"{t['p_value']:.3g}",
                t["verdict"] + (f" ({t['why']})" if t["verdict"] == "not enough data" else ""),
            ]
        )
    _table(rows, out, right=frozenset({1, 2, 3, 5, 6}))
    agreement = x.get("agreement")
    if agreement is not None:
        note = "" if agreement["enough"] else f" (fewer than {agreement['min_compared']} comparisons)"
        print(
            f"  shadow agreement with the stable version: {_pct(agreement['rate'])} of "
            f"{agreement['compared']} compared, 95% CI {_ci(agreement['ci'])}{note}",
            file=out,
        )


def _cmd_start(args: argparse.Namespace, out: TextIO) -> int:
    experiment = (
        {"mode": "ab", "weight": args.ab}
        if args.ab is not None
        else {"mode": "shadow", "sample": args.shadow}
    )
    dep = _client(args).deploy(
        args.group,
        args.model,
        args.stable,
        args.candidate,
        args.percent,
        experiment=experiment,
        salt=args.salt,
    )
    print("started: " + _describe(dep), file=out)
    return 0


def _cmd_stop(args: argparse.Namespace, out: TextIO) -> int:
    result = _client(args).stop_experiment(args.group)
    experiment_text(result["experiment"], out)
    print("stopped: " + _describe(result["deployment"]), file=out)
    return 0


def _cmd_status(args: argparse.Namespace, out: TextIO) -> int:
    found = _client(args).experiments(args.model, args.group, None if args.all else True)
    if args.json:
        print(json.dumps(found, indent=2), file=out)
        return 0
    if not found:
        which = "" if args.all else "live "
        print(
            f"no {which}experiments (outpost experiment start MODEL STABLE CANDIDATE --group G --ab W)",
            file=out,
        )
    for i, x in enumerate(found):
        if i:
            print(file=out)
        experiment_text(x, out)
    return 0


def add_experiment_commands(commands: Any) -> None:
    p = commands.add_parser("experiment", help="A/B and shadow experiments on devices, and their verdicts")
    sub = p.add_subparsers(dest="experiment_command", metavar="ACTION", required=True)

    s = sub.add_parser(
        "start",
        help="deploy STABLE with CANDIDATE beside it in an A/B split or as a shadow",
        description="The group's devices in the canary (--percent; default all) load CANDIDATE beside "
        "STABLE: with --ab W the candidate answers W%% of requests (sticky by the request's "
        "parameters.key), with --shadow S it gets a copy of S%% of requests after STABLE answered. "
        "Replaces the group's deployment.",
    )
    s.add_argument("model", metavar="MODEL")
    s.add_argument("stable", type=int, metavar="STABLE")
    s.add_argument("candidate", type=int, metavar="CANDIDATE")
    s.add_argument("--group", required=True)
    mode = s.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        "--ab", type=_bounded(1, 99), metavar="WEIGHT", help="percent of requests to the candidate"
    )
    mode.add_argument(
        "--shadow",
        type=_bounded(1, 100),
        metavar="SAMPLE",
        help="percent of requests copied to the candidate",
    )
    s.add_argument(
        "--percent", type=_percent, default=100, help="percent of the group's devices (default 100)"
    )
    s.add_argument(
        "--salt", help="canary bucket and sticky-key salt (default: kept while the candidate stays)"
    )
    _hub_options(s)
    s.set_defaults(handler=_cmd_start)

    s = sub.add_parser("stop", help="end the group's experiment: the stable version alone")
    s.add_argument("--group", required=True)
    _hub_options(s)
    s.set_defaults(handler=_cmd_stop)

    s = sub.add_parser("status", help="live experiments with each arm's figures, the tests and the verdict")
    s.add_argument("model", nargs="?", metavar="MODEL")
    s.add_argument("--group")
    s.add_argument("--all", action="store_true", help="stopped experiments too")
    s.add_argument("--json", action="store_true", help="the API's JSON")
    _hub_options(s)
    s.set_defaults(handler=_cmd_status)
