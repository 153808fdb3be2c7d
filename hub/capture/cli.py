"""`outpost capture start | stop | status | export`: data capture for retraining from the command
line (the hub URL and token from --hub/--token or OUTPOST_HUB/OUTPOST_TOKEN).

    outpost capture start --group G --sample 5% [--max-rows-per-min N]
    outpost capture stop --group G
    outpost capture status [--model M] [--json]
    outpost capture export --model M --version V [--group G] [--labelled-only]
                           [--format csv|parquet] [--since T] [--until T] [--limit N] [-o FILE]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, TextIO

from hub.errors import InvalidRequestError
from hub.hub_commands import _client, _describe, _hub_options, _table
from hub.registry.deployments import CAPTURE_MAX_ROWS_PER_MIN

_PERCENT = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*%?\s*")


def sample_bp(text: str) -> int:
    """'5%' -> 500 basis points (requests in 10,000); 0.01% to 100%, in steps of 0.01%."""
    match = _PERCENT.fullmatch(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a percentage such as 5% or 0.5%")
    try:
        bp = Decimal(match.group(1)) * 100
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"{text!r} is not a percentage such as 5% or 0.5%") from None
    if bp < 1 or bp > 10_000:
        raise argparse.ArgumentTypeError(f"{text!r}: the sample must be from 0.01% to 100%")
    if bp != bp.to_integral_value():
        raise argparse.ArgumentTypeError(f"{text!r}: the sample goes in steps of 0.01%")
    return int(bp)


def _rate(text: str) -> int:
    low, high = CAPTURE_MAX_ROWS_PER_MIN
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"{value} is not between {low} and {high}")
    return value


def policy_text(capture: dict[str, Any] | None) -> str:
    if capture is None:
        return "off"
    pct = Decimal(capture["sample_bp"]) / 100
    return f"{pct.normalize():f}% of requests, at most {capture['max_rows_per_min']} a minute per device"


def _cmd_start(args: argparse.Namespace, out: TextIO) -> int:
    dep = _client(args).set_capture(args.group, args.sample, args.max_rows_per_min)
    print(f"capture on in group {dep['group']}: {policy_text(dep['capture'])}", file=out)
    print("  " + _describe(dep), file=out)
    return 0


def _cmd_stop(args: argparse.Namespace, out: TextIO) -> int:
    dep = _client(args).stop_capture(args.group)
    print(f"capture off in group {dep['group']}", file=out)
    print("  " + _describe(dep), file=out)
    return 0


def _at(iso: str | None) -> str:
    return "-" if iso is None else iso[:19] + "Z"


def status_text(doc: dict[str, Any], out: TextIO) -> None:
    rows = [["group", "model", "capture", "dropped on devices (rate/size/full)"]]
    for g in doc["groups"]:
        d = g["dropped"]
        rows.append(
            [g["group"], g["model"], policy_text(g["capture"]), f"{d['rate']}/{d['size']}/{d['full']}"]
        )
    if len(rows) > 1:
        _table(rows, out)
    else:
        print("no group deploys a model", file=out)
    if not doc["versions"]:
        print("nothing captured (outpost capture start --group G --sample 5%)", file=out)
        return
    rows = [["model", "version", "group", "requests", "labelled", "devices", "first", "last", "over limit"]]
    for v in doc["versions"]:
        rows.append(
            [
                v["model"],
                f"v{v['version']}",
                v["group"],
                str(v["rows"]),
                str(v["labelled"]),
                str(v["devices"]),
                _at(v["first_ts"]),
                _at(v["last_ts"]),
                str(v["dropped"]["limit"]),
            ]
        )
    _table(rows, out, right=frozenset({3, 4, 5, 8}))


def _cmd_status(args: argparse.Namespace, out: TextIO) -> int:
    doc = _client(args).capture(args.model)
    if args.json:
        print(json.dumps(doc, indent=2), file=out)
    else:
        status_text(doc, out)
    return 0


def _cmd_export(args: argparse.Namespace, out: TextIO) -> int:
    params: dict[str, Any] = {"format": args.format}
    for key in ("group", "since", "until", "limit"):
        if getattr(args, key) is not None:
            params[key] = getattr(args, key)
    if args.labelled_only:
        params["labelled_only"] = "true"
    path = f"/api/v1/capture/{args.model}/{args.version}/export"
    client = _client(args)
    if args.output is not None:
        partial = args.output.with_name(args.output.name + ".part")
        with partial.open("wb") as f:
            size = client.download(path, params, f.write)
        partial.replace(args.output)
        print(f"wrote {args.output} ({size} bytes)", file=sys.stderr)
        return 0
    binary = getattr(out, "buffer", None)
    if binary is not None:
        client.download(path, params, binary.write)
        binary.flush()
    elif args.format == "csv":
        client.download(path, params, lambda chunk: out.write(chunk.decode("utf-8")))
    else:
        raise InvalidRequestError("Parquet is binary: give -o FILE")
    return 0


def add_capture_commands(commands: Any) -> None:
    p = commands.add_parser(
        "capture", help="data capture for retraining: sampled requests, predictions, labels"
    )
    sub = p.add_subparsers(dest="capture_command", metavar="ACTION", required=True)

    s = sub.add_parser(
        "start",
        help="ask the group's devices to capture a sample of requests",
        description="Publish the group's deployment again with data capture: devices keep SAMPLE of their "
        "requests with the predictions (and labels fed back later) and upload them to the hub. Kept "
        "for every version of the model while the group deploys it.",
    )
    s.add_argument("--group", required=True)
    s.add_argument(
        "--sample", type=sample_bp, required=True, help="share of requests, 0.01%% to 100%% (e.g. 5%%)"
    )
    s.add_argument(
        "--max-rows-per-min", type=_rate, default=None, metavar="N", help="per device (1..6000; default 60)"
    )
    _hub_options(s)
    s.set_defaults(handler=_cmd_start)

    s = sub.add_parser("stop", help="turn the group's data capture off")
    s.add_argument("--group", required=True)
    _hub_options(s)
    s.set_defaults(handler=_cmd_stop)

    s = sub.add_parser("status", help="each group's capture policy and what was captured per version")
    s.add_argument("--model")
    s.add_argument("--json", action="store_true", help="the API's JSON")
    _hub_options(s)
    s.set_defaults(handler=_cmd_status)

    s = sub.add_parser(
        "export",
        help="a version's captured requests as CSV or Parquet",
        description="One line per input row: ts, device_id, group, version, id, row, the features, "
        "the outputs (predicted, probability_LABEL), the label fed back. CSV to stdout without -o.",
    )
    s.add_argument("--model", required=True)
    s.add_argument("--version", type=int, required=True)
    s.add_argument("--group")
    s.add_argument("--labelled-only", action="store_true", help="only requests with a label fed back")
    s.add_argument("--format", choices=("csv", "parquet"), default="csv")
    s.add_argument("--since", metavar="T", help="epoch seconds, ISO 8601 or a duration ago (1h, 7d)")
    s.add_argument("--until", metavar="T")
    s.add_argument("--limit", type=int, metavar="N", help="at most N requests")
    s.add_argument("-o", "--output", type=Path, metavar="FILE")
    _hub_options(s)
    s.set_defaults(handler=_cmd_export)
