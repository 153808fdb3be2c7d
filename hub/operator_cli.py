"""`outpost`: the operator's command line.

    outpost package MODEL.joblib --sample DATA.csv --name NAME --version N --out DIR
    outpost push PACKAGE | deploy MODEL VERSION --group G | rollback MODEL --group G | models | groups | fleet

Each subcommand is a function taking the parsed arguments and returning an exit code;
the heavy imports (scikit-learn, onnxruntime) happen inside them, so `outpost --help`
stays instant. Exit codes: 0 done, 2 bad input or usage (one `outpost: error:` line on
stderr, no traceback), 1 an unexpected internal failure, 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TextIO

from hub import __version__
from hub.errors import HubError

if TYPE_CHECKING:
    from hub.packager import PackageReport

PROG = "outpost"
EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class _UsageError(Exception):
    def __init__(self, usage: str, message: str) -> None:
        super().__init__(message)
        self.usage = usage


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so `main(argv)` always returns a code."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(self.format_usage(), message)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not between 0 and 1")
    return value


def _add_package(commands: argparse._SubParsersAction[_Parser]) -> None:
    from hub.packager.evaluate import DEFAULT_TOLERANCE

    p = commands.add_parser(
        "package",
        help="turn a fitted scikit-learn model into an (int8) ONNX model package",
        description=(
            "Convert a fitted scikit-learn classifier or regressor (or a Pipeline ending in one) "
            "to ONNX, quantize it to int8 where that keeps its accuracy, and write the package "
            "DIR/NAME-N/ (model.onnx + manifest.json) and DIR/NAME-N.tar. The model file is "
            "unpickled: package only models you trust."
        ),
    )
    p.add_argument(
        "model", type=Path, metavar="MODEL", help="the model saved with joblib (.joblib/.pkl)"
    )
    p.add_argument(
        "--sample",
        type=Path,
        required=True,
        metavar="DATA",
        help="representative input rows: CSV (optional header) or a 2-D .npy; used to calibrate, "
        "score, profile and self-test",
    )
    truth = p.add_mutually_exclusive_group()
    truth.add_argument(
        "--target", metavar="COLUMN", help="the CSV column holding true labels/values"
    )
    truth.add_argument(
        "--labels", type=Path, metavar="Y.npy", help="true labels/values as a 1-D .npy"
    )
    p.add_argument("--name", required=True, help="model name (a-z, 0-9, '_', '.', '-')")
    p.add_argument(
        "--version", type=_positive_int, required=True, metavar="N", help="version number"
    )
    p.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="where to write the package"
    )
    p.add_argument(
        "--tolerance",
        type=_fraction,
        default=DEFAULT_TOLERANCE,
        help="largest accuracy loss (R² for regressors) int8 may cost "
        f"(default {DEFAULT_TOLERANCE})",
    )
    p.add_argument("--no-quantize", action="store_true", help="keep FP32; do not try int8")
    p.add_argument(
        "--variants",
        metavar="LIST",
        default="",
        help="hardware variants of the version, in order of preference, e.g. int8,fp32: fp32 is "
        "the generic one every device can run, int8 goes to devices with VNNI or ARM dot-product "
        "(see 'Hardware variants' in the README)",
    )
    p.set_defaults(handler=_cmd_package)


def _score(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _cmd_package(args: argparse.Namespace, out: TextIO) -> int:
    from hub.packager import INT8, PackageOptions, build_package
    from hub.packager.variants import parse_variants

    variants = parse_variants(args.variants) if args.variants else ()
    report = build_package(
        args.model,
        args.sample,
        PackageOptions(
            name=args.name,
            version=args.version,
            out_dir=args.out,
            target=args.target,
            labels=args.labels,
            tolerance=args.tolerance,
            quantize=not args.no_quantize,
            variants=variants,
        ),
    )
    if variants:
        print(_variants_report(report), file=out)
        return EXIT_OK
    m = report.manifest
    metric = "accuracy" if m.task == "classification" else "R²"
    basis = "true labels" if report.with_labels else "agreement with the scikit-learn model"
    lines = [
        f"packaged {m.name} version {m.version}: {m.task}, {len(m.features)} features"
        + (f", {len(m.labels)} classes" if m.labels else ""),
        f"  {metric} measured against {basis}, on {m.reference_profile['n']} sample rows",
    ]
    for kind, ev in (("fp32", report.fp32), ("int8", report.int8)):
        if ev is None:
            lines.append(f"  {kind}  {metric} n/a     latency n/a")
            continue
        mae = f"  MAE {ev.mae:.4g}" if ev.mae is not None else ""
        latency = f"median latency {ev.latency_us:.1f} us/row"
        lines.append(f"  {kind}  {metric} {_score(ev.accuracy)}{mae}  {latency}")
    kept = report.decision.kept
    lines.append(f"  kept  {kept}: {report.decision.reason}")
    if kept == INT8 and report.int8 is not None and report.int8.latency_us > report.fp32.latency_us:
        lines.append("        (int8 is slower than fp32 on this machine; devices may differ)")
    lines += [f"  package  {report.directory}/", f"  archive  {report.archive}"]
    print("\n".join(lines), file=out)
    return EXIT_OK


def _variants_report(report: PackageReport) -> str:
    """The variants side by side: what each requires, its score, latency and size."""
    m = report.manifest
    metric = "accuracy" if m.task == "classification" else "R2"
    basis = "true labels" if report.with_labels else "agreement with the scikit-learn model"
    lines = [
        f"packaged {m.name} version {m.version} as {len(report.variants)} variant(s): {m.task}, "
        f"{len(m.features)} features" + (f", {len(m.labels)} classes" if m.labels else ""),
        f"  {metric} against {basis} on {m.reference_profile['n']} sample rows; latency measured "
        "here with onnxruntime (CPU), median per row",
    ]
    width = max(len(", ".join(v.requires) or "(generic)") for v in report.variants)
    head = f"  {'variant':<8} {'requires':<{width}} {metric:>9} {'latency us/row':>15} {'size':>10}  file"
    lines.append(head)
    for v in report.variants:
        requires = ", ".join(v.requires) or "(generic)"
        lines.append(
            f"  {v.name:<8} {requires:<{width}} {_score(v.evaluation.accuracy):>9} "
            f"{v.evaluation.latency_us:>15.1f} {v.size:>10}  {v.model_file}"
        )
    lines += [f"  {name:<8} not included: {why}" for name, why in report.skipped]
    lines += [f"  package  {report.directory}/", f"  archive  {report.archive}"]
    return "\n".join(lines)


def build_parser() -> _Parser:
    parser = _Parser(prog=PROG, description="Outpost operator tools: package models for the fleet.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=_Parser
    )
    _add_package(commands)
    from hub.hub_commands import add_commands

    add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        sys.stderr.write(f"{exc.usage}{PROG}: error: {exc}\n")
        return EXIT_USAGE
    except SystemExit as exc:  # --help and --version print and "exit"
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    # Libraries underneath (onnxruntime's quantizer) log notes to the root logger; give them
    # the program's name instead of Python's default "WARNING:root:" prefix.
    logging.basicConfig(level=logging.WARNING, format=f"{PROG}: note: %(message)s")
    handler: Callable[[argparse.Namespace, TextIO], int] = args.handler
    try:
        return handler(args, sys.stdout)
    except HubError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    # The operator gets one line, not a traceback; an unexpected error is still a bug to report.
    except Exception as exc:
        print(
            f"{PROG}: internal error: {type(exc).__name__}: {exc} (please report it)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
