"""`outpost-agent`: run the daemon, ask it for its status, install packages by hand.

outpost-agent run --config FILE
outpost-agent status [--config FILE] [--json]
outpost-agent install PACKAGE [--config FILE]      (a package directory or .tar)
outpost-agent default MODEL VERSION|latest [--config FILE]
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent.config import DEFAULT_CONFIG_PATH, AgentConfig, load_config
from agent.errors import AgentError

if TYPE_CHECKING:  # argparse is imported for every command but the daemon's (_daemon_config says why)
    import argparse

log = logging.getLogger("outpost-agent")


def _config(args: argparse.Namespace) -> AgentConfig:
    return load_config(Path(args.config))


def _cmd_run(args: argparse.Namespace) -> int:
    return _run(args.config)


def _run(config: str) -> int:
    from agent import daemon, logs

    cfg = load_config(Path(config))
    logs.setup(cfg.log_level)
    return daemon.run(cfg)


def _daemon_config(argv: list[str]) -> str | None:
    """The config file when `argv` is the daemon's own command line, as systemd gives it (`run`,
    `run --config PATH`, `run --config=PATH`); None for anything else, which argparse parses.

    The daemon runs for months: argparse and gettext would stay in its memory for one parse
    (0.4 MB resident of the 75 MB it is held to, docs/benchmarks.md)."""
    if not argv or argv[0] != "run":
        return None
    rest = argv[1:]
    if not rest:
        return str(DEFAULT_CONFIG_PATH)
    if len(rest) == 2 and rest[0] == "--config" and rest[1] and not rest[1].startswith("-"):
        return rest[1]
    if len(rest) == 1 and rest[0].startswith("--config=") and len(rest[0]) > len("--config="):
        return rest[0][len("--config=") :]
    return None


def _print_status(doc: dict[str, Any]) -> None:
    print(f"outpost-agent {doc.get('version')}  device {doc.get('device_id')}  group {doc.get('group')}")
    print(f"  ready: {doc.get('ready')}  uptime: {doc.get('uptime_s')} s  pid: {doc.get('pid')}")
    server = doc.get("server", {})
    print(
        f"  socket: {server.get('socket')}  tcp: {server.get('tcp') or 'off'}  "
        f"connections: {server.get('connections')}"
    )
    hardware = doc.get("hardware")
    if isinstance(hardware, dict):
        print(f"  hardware: {' '.join(hardware.get('tags', []))} ({hardware.get('source')})")
    memory = doc.get("memory")
    if isinstance(memory, dict):
        limit = f"{memory.get('budget_mb')} MiB" if memory.get("budget_mb") else "no budget"
        m = memory
        print(
            f"  memory: {m.get('used_mb')} MiB counted of {limit} (the agent {m.get('baseline_mb')} MiB, "
            f"RSS now {m.get('rss_mb')} MiB; refused {m.get('refused')}, evicted {m.get('evicted')})"
        )
    models = doc.get("models", [])
    if not models:
        print("  no models installed (outpost-agent install PACKAGE)")
    for model in models:
        pinned = " (pinned)" if model.get("pinned") is not None else ""
        print(f"  model {model['name']}: default version {model.get('default_version')}{pinned}")
        for v in model.get("versions", []):
            if v.get("state") == "ready":
                mark = "*" if v.get("default") else " "
                print(f"   {mark} v{v['version']} ready, batching {v.get('batching')}")
                variant = f"variant {v['variant']}, " if v.get("variant") else ""
                providers = ", ".join(v.get("providers") or []) or "?"
                note = v.get("providers_note")
                why = f" ({note})" if note and note != "as configured" else ""
                print(f"       {variant}on {providers}{why}")
                cache = v.get("cache")
                if isinstance(cache, dict):
                    rate = cache.get("hit_rate")
                    print(
                        f"       response cache: {cache.get('entries')} entries, {cache.get('bytes')} bytes, "
                        f"{cache.get('hits')} hits, {cache.get('misses')} misses"
                        f"{'' if rate is None else f' ({rate:.1%} hits)'}, ttl {cache.get('ttl_s')} s"
                    )
            else:
                print(f"     v{v['version']} {v.get('state')}: {v.get('reason')}")


def _cmd_status(args: argparse.Namespace) -> int:
    from agent.client import call

    cfg = _config(args)
    status, doc = call(cfg.server.socket, "GET", "/v1/status")
    if status != 200 or not isinstance(doc, dict):
        raise AgentError(f"the agent answered {status}: {doc}")
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        _print_status(doc)
    return 0


def _cmd_install(args: argparse.Namespace) -> int:
    from agent.client import call
    from agent.package.store import Store

    cfg = _config(args)
    installed = Store(cfg.data_path).install(Path(args.package))
    m = installed.manifest
    print(f"installed {m.name} version {m.version} in {installed.directory}")
    if Path(cfg.server.socket).exists():
        try:
            status, doc = call(cfg.server.socket, "POST", "/v1/reload", timeout=300)
        except AgentError as exc:
            print(f"the running agent was not told ({exc}); it loads the version at its next start")
            return 0
        if status == 200 and isinstance(doc, dict):
            for item in doc.get("loaded", []):
                print(f"the running agent now serves {item['name']} version {item['version']}")
            for item in doc.get("failed", []):
                print(
                    f"the running agent could not load {item['name']} version {item['version']}: "
                    f"{item['error']}"
                )
                return 1
    return 0


def _cmd_update(args: argparse.Namespace) -> int:
    import time

    from agent.client import call

    cfg = _config(args)
    status, doc = call(cfg.server.socket, "POST", "/v1/update")
    if status != 200:
        raise AgentError(doc.get("error", str(doc)) if isinstance(doc, dict) else str(doc))
    time.sleep(args.wait)
    _, doc = call(cfg.server.socket, "GET", "/v1/status")
    update = doc.get("update", {}) if isinstance(doc, dict) else {}
    print(
        f"update check requested; state {update.get('state')}, current {update.get('current')}, "
        f"pending {update.get('pending')}"
    )
    last = update.get("last_check") or {}
    if last.get("error"):
        print(f"  last check failed: {last['error']}")
    return 0


def _cmd_default(args: argparse.Namespace) -> int:
    from agent.client import call

    cfg = _config(args)
    version = None if args.version == "latest" else int(args.version)
    status, doc = call(cfg.server.socket, "POST", f"/v1/models/{args.model}/default", {"version": version})
    if status != 200 or not isinstance(doc, dict):
        raise AgentError(doc.get("error", str(doc)) if isinstance(doc, dict) else str(doc))
    print(
        f"{args.model}: default version {doc['default_version']}"
        + (" (pinned)" if doc.get("pinned") is not None else " (latest)")
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    import argparse

    class _Formatter(argparse.HelpFormatter):
        """argparse's help formatter without its `import shutil`, which brings bz2 and lzma: the
        same width, from COLUMNS or the terminal."""

        def __init__(self, prog: str) -> None:
            columns = 0
            with contextlib.suppress(KeyError, ValueError):
                columns = int(os.environ["COLUMNS"])
            if columns <= 0:
                try:
                    columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
                except (AttributeError, ValueError, OSError):
                    columns = 80
            super().__init__(prog, width=columns - 2)

    parser = argparse.ArgumentParser(
        prog="outpost-agent", description="Outpost edge inference agent", formatter_class=_Formatter
    )
    parser.add_argument("--version", action="version", version=f"outpost-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, formatter_class=_Formatter)
        p.add_argument("--config", default=str(DEFAULT_CONFIG_PATH), help="TOML config file")
        return p

    p = command("run", "run the daemon in the foreground")
    p.set_defaults(func=_cmd_run)
    p = command("status", "ask the running agent for its state")
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    p.set_defaults(func=_cmd_status)
    p = command("install", "install a model package (directory or .tar)")
    p.add_argument("package")
    p.set_defaults(func=_cmd_install)
    p = command("update", "check the hub for a new assignment now")
    p.add_argument("--wait", type=float, default=1.0, help="seconds to wait before showing the state")
    p.set_defaults(func=_cmd_update)
    p = command("default", "pin a model's default version, or 'latest'")
    p.add_argument("model")
    p.add_argument("version", help="a version number, or 'latest' to unpin")
    p.set_defaults(func=_cmd_default)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    config = _daemon_config(argv)
    try:
        if config is not None:
            return _run(config)
        args = build_parser().parse_args(argv)
        if args.command == "default" and args.version != "latest" and not args.version.isdigit():
            print("outpost-agent: error: VERSION must be a number or 'latest'", file=sys.stderr)
            return 2
        code: int = args.func(args)
    except AgentError as exc:
        print(f"outpost-agent: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
