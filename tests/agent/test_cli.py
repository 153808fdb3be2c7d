"""`outpost-agent`'s command line: the daemon's own command parsed without argparse."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli import _daemon_config, build_parser
from agent.config import DEFAULT_CONFIG_PATH


@pytest.mark.parametrize(
    ("argv", "config"),
    [
        (["run"], str(DEFAULT_CONFIG_PATH)),
        (["run", "--config", "/etc/outpost/a.toml"], "/etc/outpost/a.toml"),
        (["run", "--config=/etc/outpost/a.toml"], "/etc/outpost/a.toml"),
        # Everything else is argparse's: its help, its errors, the other commands.
        (["run", "--help"], None),
        (["run", "--config"], None),
        (["run", "--config="], None),
        (["run", "--config", "-x"], None),
        (["run", "--config", "a", "extra"], None),
        (["--config", "a", "run"], None),
        (["status"], None),
        ([], None),
    ],
)
def test_the_daemons_command_line_is_read_without_argparse(argv: list[str], config: str | None) -> None:
    assert _daemon_config(argv) == config
    if config is not None:  # what argparse reads from the same words
        args = build_parser().parse_args(argv)
        assert (args.command, args.config) == ("run", config)


def test_the_daemon_never_imports_argparse(tmp_path: Path) -> None:
    """`run` with a config that fails to load: main() returns before serving, argparse unloaded."""
    bad = tmp_path / "agent.toml"
    bad.write_text("device_id = 7\n")
    code = (
        "import sys; from agent.cli import main; "
        f"rc = main(['run', '--config', {str(bad)!r}]); "
        "print(rc, 'argparse' in sys.modules, 'gettext' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "False", "False"], out.stderr
    assert "error" in out.stderr
