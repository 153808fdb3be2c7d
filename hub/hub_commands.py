"""`outpost push | deploy | rollback | models | groups | fleet [summary | drift | alerts] | rollout`: the
operator's commands that talk to the hub.

The hub URL and token come from --hub/--token or OUTPOST_HUB/OUTPOST_TOKEN.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, TextIO

from hub.client import HubClient, HubTarget


def _client(args: argparse.Namespace) -> HubClient:
    return HubClient(HubTarget.resolve(args.hub, args.token))


def _hub_options(p: argparse.ArgumentParser, default: Any = None) -> None:
    p.add_argument(
        "--hub",
        metavar="URL",
        default=default,
        help="hub URL (default $OUTPOST_HUB or http://127.0.0.1:8700)",
    )
    p.add_argument(
        "--token", metavar="TOKEN", default=default, help="operator token (default $OUTPOST_TOKEN)"
    )


def _percent(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"{value} is not between 0 and 100")
    return value


def _describe(dep: dict[str, Any]) -> str:
    text = f"group {dep['group']}: {dep['model']} stable v{dep['stable']}"
    experiment = dep.get("experiment")
    if experiment:
        mode = experiment["mode"]
        share = f"weight {experiment['weight']}%" if mode == "ab" else f"sample {experiment['sample']}%"
        text += f", {mode} experiment with v{dep['candidate']} ({share}) on {dep['percent']}% of devices"
    elif dep.get("candidate") is not None:
        text += f", canary v{dep['candidate']} at {dep['percent']}%"
    if dep.get("metadata_version") is not None:
        text += f" (signed assignment, metadata version {dep['metadata_version']})"
    return text


def _cmd_push(args: argparse.Namespace, out: TextIO) -> int:
    result = _client(args).push(args.package, progress=not args.quiet)
    print(
        f"pushed {result['name']} version {result['version']} "
        f"(model sha256 {result['model_sha256'][:12]}…, {result['size']} bytes); signed and published",
        file=out,
    )
    return 0


def _cmd_deploy(args: argparse.Namespace, out: TextIO) -> int:
    if (args.canary is None) != (args.percent is None):
        from hub.client import HubRequestError

        raise HubRequestError("--canary and --percent go together")
    dep = _client(args).deploy(args.group, args.model, args.version, args.canary, args.percent or 0)
    print(_describe(dep), file=out)
    return 0


def _cmd_rollback(args: argparse.Namespace, out: TextIO) -> int:
    dep = _client(args).rollback(args.group, args.model)
    print("rolled back: " + _describe(dep), file=out)
    return 0


def _cmd_models(args: argparse.Namespace, out: TextIO) -> int:
    models = _client(args).models()
    if not models:
        print("no models (outpost push PACKAGE)", file=out)
    for m in models:
        versions = ", ".join(str(v) for v in m.get("versions", []))
        print(f"{m['name']}: versions {versions}", file=out)
    return 0


def _cmd_groups(args: argparse.Namespace, out: TextIO) -> int:
    groups = _client(args).groups()
    if not groups:
        print("no groups (outpost deploy MODEL VERSION --group G)", file=out)
    for g in groups:
        print(_describe(g), file=out)
    return 0


def _versions(versions: Any) -> str:
    if isinstance(versions, dict) and versions:
        return ",".join(f"{k}={v}" for k, v in sorted(versions.items()))
    return "-"


def _update(update: Any) -> str:
    if isinstance(update, dict) and update:
        state = update.get("state")
        return f" update {state}" if state else " update " + ",".join(f"{k}={v}" for k, v in update.items())
    return ""


def fleet_line(d: dict[str, Any]) -> str:
    """One device: `dev-001  online   group default  wine=3  last seen 2024-...  runs wine: int8 on CPU`."""
    from hub.fleet.runtime import runs_on

    status = "online" if d.get("online") else "offline"
    seen = d.get("last_seen") or "never"
    state = d.get("state")
    runs = runs_on(state) if isinstance(state, dict) else {}
    where = ("  runs " + "; ".join(f"{m}: {text}" for m, text in runs.items())) if runs else ""
    return (
        f"{d['device_id']}  {status:<7}  group {d['group']}  {_versions(d.get('versions'))}"
        f"{_update(d.get('update'))}  last seen {seen}{where}"
    )


def _cmd_fleet(args: argparse.Namespace, out: TextIO) -> int:
    devices = _client(args).fleet(args.group)
    if not devices:
        print("no devices have reported (is the hub serving with --mqtt URL?)", file=out)
    for d in devices:
        print(fleet_line(d), file=out)
    if devices:
        online = sum(1 for d in devices if d.get("online"))
        print(f"{len(devices)} devices, {online} online", file=out)
    return 0


def model_version(text: str) -> tuple[str, int | None]:
    """MODEL or MODEL:VERSION."""
    name, sep, version = text.partition(":")
    if not name:
        raise argparse.ArgumentTypeError(f"{text!r}: expected MODEL or MODEL:VERSION")
    if not sep:
        return name, None
    if not version.isdigit() or int(version) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: the version after ':' must be a positive integer")
    return name, int(version)


def _ms(value: Any) -> str:
    return "-" if value is None else f"{value:.3g}"


def _pct(value: Any) -> str:
    return "-" if value is None else f"{value:.2%}"


def _table(rows: list[list[str]], out: TextIO, right: frozenset[int] = frozenset()) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        cells = [
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        print("  ".join(cells).rstrip(), file=out)


def _span(doc: dict[str, Any]) -> str:
    return f"{doc['since_iso'][:19]}Z .. {doc['until_iso'][:19]}Z"


def summary_text(doc: dict[str, Any], out: TextIO) -> None:
    """`outpost fleet summary`: the fleet's sum, then one line per device."""
    group = f" in group {doc['group']}" if doc.get("group") else ""
    print(
        f"{doc['model']} v{doc['version']}{group}, {_span(doc)}: "
        f"{doc['devices']} devices, {doc['windows']} windows",
        file=out,
    )
    window, d = doc.get("summary"), doc["derived"]
    if window is None:
        print("  no summaries in this range", file=out)
        return
    print(
        f"  requests {window['requests']}  errors {window['errors']} ({_pct(d['error_rate'])})"
        f"  rows {window['rows']}",
        file=out,
    )
    lat = d.get("latency_ms") or {}
    over = " (p99 above the last bucket)" if "p99" in lat.get("above_last_bucket", []) else ""
    print(
        f"  latency ms  mean {_ms(lat.get('mean'))}  p50 {_ms(lat.get('p50'))}"
        f"  p95 {_ms(lat.get('p95'))}  p99 {_ms(lat.get('p99'))}{over}",
        file=out,
    )
    if d.get("cache"):
        c = d["cache"]
        print(
            f"  response cache  {c['hits']} requests answered from it, {c['misses']} by the model"
            f" ({_pct(c['hit_rate'])} hits)",
            file=out,
        )
    if d.get("labelled"):
        if d.get("accuracy") is not None:
            print(f"  accuracy {_pct(d['accuracy'])} of {d['labelled']} labelled predictions", file=out)
        else:
            print(
                f"  MAE {d['mae']:.4g}  RMSE {d['rmse']:.4g} over {d['labelled']} labelled predictions",
                file=out,
            )
    rows = [["device", "windows", "requests", "errors", "error rate"]]
    for p in doc.get("per_device", []):
        rate = p["errors"] / p["requests"] if p["requests"] else None
        rows.append([p["device_id"], str(p["windows"]), str(p["requests"]), str(p["errors"]), _pct(rate)])
    _table(rows, out, right=frozenset({1, 2, 3, 4}))
    if doc.get("skipped_count"):
        print(f"  {doc['skipped_count']} windows left out (they do not fit the version's profile):", file=out)
        for s in doc.get("skipped", [])[:5]:
            print(f"    {s['device_id']} seq {s['seq']}: {s['reason']}", file=out)


def drift_text(doc: dict[str, Any], out: TextIO) -> None:
    """`outpost fleet drift`: per feature on the summed counts, then devices alerting."""
    fleet = doc["fleet"]
    print(
        f"{doc['model']} v{doc['version']}, {_span(doc)}: {fleet['rows']} rows from "
        f"{doc['devices_summed']} devices vs {fleet['reference_rows']} reference rows "
        f"({fleet['method']}, alpha {fleet['alpha']})",
        file=out,
    )
    if not fleet["enough_rows"]:
        print(f"  fewer than {fleet['min_rows']} rows: no fleet verdict", file=out)
    tests = [*fleet["features"], *([fleet["prediction"]] if fleet.get("prediction") else [])]
    if tests:
        rows = [["feature", "test", "statistic", "p-value", "psi", "drifted"]]
        for t in tests:
            rows.append(
                [
                    t["name"],
                    t.get("test") or "-",
                    _ms(t.get("statistic")),
                    "-" if t.get("p_value") is None else f"{t['p_value']:.3g}",
                    _ms(t.get("psi")),
                    "DRIFT" if t.get("drifted") else "",
                ]
            )
        _table(rows, out, right=frozenset({2, 3, 4}))
    alerting = doc.get("alerting_devices", [])
    print(f"  devices alerting: {', '.join(alerting) if alerting else 'none'}", file=out)


def alerts_text(alerts: list[dict[str, Any]], out: TextIO) -> None:
    if not alerts:
        print("no alerts", file=out)
        return
    rows = [["last seen", "severity", "kind", "device", "model", "count", "message"]]
    for a in alerts:
        model = f"{a['model']} v{a['version']}" if a.get("model") else "-"
        rows.append(
            [
                a["last_seen"][:19] + "Z",
                a["severity"],
                a["kind"],
                a.get("device_id") or "(fleet)",
                model,
                str(a["count"]),
                a["message"],
            ]
        )
    _table(rows, out, right=frozenset({5}))


def _cmd_fleet_summary(args: argparse.Namespace, out: TextIO) -> int:
    model, version = args.model
    summary_text(_client(args).fleet_summary(model, version, args.since, args.group), out)
    return 0


def _cmd_fleet_drift(args: argparse.Namespace, out: TextIO) -> int:
    model, version = args.model
    drift_text(_client(args).fleet_drift(model, version, args.since, args.group), out)
    return 0


def _cmd_fleet_alerts(args: argparse.Namespace, out: TextIO) -> int:
    alerts_text(_client(args).fleet_alerts(args.since, args.kind, args.model), out)
    return 0


def _add_fleet(commands: Any) -> None:
    p = commands.add_parser(
        "fleet",
        help="the fleet: devices (default), summary, drift, alerts",
        description="Without a view: one line per device (online or offline, group, versions, last seen).",
    )
    p.add_argument("--group", help="only this group")
    _hub_options(p)
    p.set_defaults(handler=_cmd_fleet)
    views = p.add_subparsers(dest="view", metavar="[VIEW]")
    # SUPPRESS: an option given before the view (outpost fleet --hub URL summary ...) is kept.
    keep = argparse.SUPPRESS
    for name, handler, text in (
        ("summary", _cmd_fleet_summary, "a model version summed across devices: requests, errors, latency"),
        ("drift", _cmd_fleet_drift, "drift of the summed counts against the version's reference profile"),
    ):
        v = views.add_parser(name, help=text, description=text)
        v.add_argument("model", type=model_version, metavar="MODEL[:VERSION]", help="default: the latest")
        v.add_argument("--since", default="1h", help="epoch seconds, ISO 8601 or a duration ago (default 1h)")
        v.add_argument("--group", default=keep, help="only this group")
        _hub_options(v, default=keep)
        v.set_defaults(handler=handler)
    v = views.add_parser("alerts", help="drift, error-rate, rollback and refusal alerts, newest first")
    v.add_argument("--since", default="1d", help="last seen since (default 1d)")
    v.add_argument("--kind", choices=("drift", "error_rate", "rollback", "refused"))
    v.add_argument("--model", help="only this model")
    _hub_options(v, default=keep)
    v.set_defaults(handler=_cmd_fleet_alerts)


def add_commands(commands: Any) -> None:
    p = commands.add_parser("push", help="upload a model package to the hub, which validates and signs it")
    p.add_argument("package", type=Path, metavar="PACKAGE", help="package directory or .tar")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _hub_options(p)
    p.set_defaults(handler=_cmd_push)

    p = commands.add_parser("deploy", help="assign a model version to a device group (optionally a canary)")
    p.add_argument("model")
    p.add_argument("version", type=int)
    p.add_argument("--group", required=True)
    p.add_argument("--canary", type=int, metavar="VERSION", help="candidate version for a canary")
    p.add_argument("--percent", type=_percent, metavar="P", help="share of the group in the canary")
    _hub_options(p)
    p.set_defaults(handler=_cmd_deploy)

    p = commands.add_parser("rollback", help="publish the group's previous stable version again")
    p.add_argument("model")
    p.add_argument("--group", required=True)
    _hub_options(p)
    p.set_defaults(handler=_cmd_rollback)

    p = commands.add_parser("models", help="list models and versions on the hub")
    _hub_options(p)
    p.set_defaults(handler=_cmd_models)

    p = commands.add_parser("groups", help="list device groups and what they are assigned")
    _hub_options(p)
    p.set_defaults(handler=_cmd_groups)

    _add_fleet(commands)
    from hub.rollouts.cli import add_rollout_commands

    add_rollout_commands(commands)
    from hub.experiments.cli import add_experiment_commands

    add_experiment_commands(commands)
    from hub.alerting.cli import add_alert_commands

    add_alert_commands(commands)
    from hub.capture.cli import add_capture_commands

    add_capture_commands(commands)
