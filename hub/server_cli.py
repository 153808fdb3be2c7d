"""`outpost-hub`: the hub's command line. The registry and TUF repository commands
(`init`, `serve`, `keys`) are built in the hub issue; until then this only reports its version."""

from __future__ import annotations

import argparse

from hub import __version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="outpost-hub", description=__doc__)
    parser.add_argument("--version", action="version", version=f"outpost-hub {__version__}")
    parser.parse_args(argv)
    parser.print_help()
    return 0
