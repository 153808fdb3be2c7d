"""`outpost push | deploy | rollback | models | groups | fleet`: the operator's commands that talk to the hub.

The hub URL and token come from --hub/--token or OUTPOST_HUB/OUTPOST_TOKEN.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, TextIO

from hub.client import HubClient, HubTarget


def _client(args: argparse.Namespace) -> HubClient:
    return HubClient(HubTarget.resolve(args.hub, args.token))


def _hub_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hub", metavar="URL", help="hub URL (default $OUTPOST_HUB or http://127.0.0.1:8700)")
    p.add_argument("--token", metavar="TOKEN", help="operator token (default $OUTPOST_TOKEN)")


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
    if dep.get("candidate") is not None:
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
    """One device: `dev-001  online   group default  wine=3  last seen 2024-...`."""
    status = "online" if d.get("online") else "offline"
    seen = d.get("last_seen") or "never"
    return (
        f"{d['device_id']}  {status:<7}  group {d['group']}  {_versions(d.get('versions'))}"
        f"{_update(d.get('update'))}  last seen {seen}"
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

    p = commands.add_parser("fleet", help="list devices: online or offline, group, versions, last seen")
    p.add_argument("--group", help="only this group")
    _hub_options(p)
    p.set_defaults(handler=_cmd_fleet)
