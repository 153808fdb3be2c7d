"""The files under packaging/ that install the agent as a systemd service.

systemd-analyze checks the unit offline, so this runs in containers and CI
where systemd is not PID 1:
- `verify FILE` loads the unit as systemd would and reports unknown keys,
  unparsable values and an ExecStart= that is not executable. It only reads
  the unit: User= need not exist, so no sysusers step is needed for it.
- `security --offline=true FILE` scores the sandbox without a running manager.
The remaining tests keep the unit, the default config and the sysusers and
tmpfiles snippets in step with each other.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import load_config

PACKAGING = Path(__file__).resolve().parent.parent / "packaging"
UNIT = PACKAGING / "outpost-agent.service"
AGENT_TOML = PACKAGING / "agent.toml"
SYSUSERS = PACKAGING / "sysusers.d" / "outpost.conf"
TMPFILES = PACKAGING / "tmpfiles.d" / "outpost.conf"

MAX_EXPOSURE = 2.0
INSTALLED_EXEC = "/usr/bin/outpost-agent"

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze is not installed (`make sysdeps` installs the systemd package)",
)

# No colours, no pager, no locale-dependent glyphs that could split a line.
_ENV = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "SYSTEMD_LOG_COLOR": "0"}


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, env=_ENV, capture_output=True, text=True, timeout=60, check=False)


def _service_values(key: str) -> list[str]:
    """Every value of `key` in the unit's [Service] section, in order."""
    values, section = [], ""
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            name, _, value = line.partition("=")
            if name.strip() == key:
                values.append(value.strip())
    return values


def _service_value(key: str) -> str:
    values = _service_values(key)
    assert len(values) == 1, f"{key}= set {len(values)} times in {UNIT.name}"
    return values[0]


def _real_executable() -> str:
    """An executable that exists here, to stand in for /usr/bin/outpost-agent."""
    venv_script = Path(sys.executable).parent / "outpost-agent"
    if venv_script.is_file() and os.access(venv_script, os.X_OK):
        return str(venv_script)
    return shutil.which("outpost-agent") or sys.executable


@needs_analyze
def test_unit_verifies(tmp_path: Path) -> None:
    # verify fails on an ExecStart= binary that does not exist, and the
    # installed path does not exist on a development machine: swap in a real
    # executable and change nothing else.
    original = UNIT.read_text()
    assert original.count(f"ExecStart={INSTALLED_EXEC} ") == 1
    copy = tmp_path / UNIT.name
    copy.write_text(original.replace(f"ExecStart={INSTALLED_EXEC} ", f"ExecStart={_real_executable()} "))
    assert len(original.splitlines()) == len(copy.read_text().splitlines())

    # --recursive-errors=no: problems in the host's own units (network.target,
    # multi-user.target) are not ours to fix; --man=no: no man pages needed.
    result = _run(
        SYSTEMD_ANALYZE or "systemd-analyze",
        "verify",
        "--recursive-errors=no",
        "--man=no",
        str(copy),
        cwd=tmp_path,
    )
    output = result.stdout + result.stderr
    # Warnings (an unknown key, an unparsable value) leave the exit status at
    # 0 and only print a line naming the unit, so both must be checked.
    ours = [line for line in output.splitlines() if UNIT.stem in line]
    assert result.returncode == 0, output
    assert ours == [], "\n".join(ours)


@needs_analyze
def test_verify_would_catch_a_typo(tmp_path: Path) -> None:
    """Guards the check above: a misspelt key must show up in its output."""
    broken = UNIT.read_text().replace(f"ExecStart={INSTALLED_EXEC} ", f"ExecStart={_real_executable()} ")
    copy = tmp_path / UNIT.name
    copy.write_text(broken.replace("\nUMask=", "\nUMaks="))
    result = _run(SYSTEMD_ANALYZE or "systemd-analyze", "verify", "--man=no", str(copy), cwd=tmp_path)
    assert "Unknown key 'UMaks'" in result.stdout + result.stderr


@needs_analyze
def test_security_exposure(tmp_path: Path) -> None:
    # With --offline=true, security takes a unit FILE path (a bare unit name
    # would be looked up in the system's unit directories) and needs no
    # running manager; it scores the shipped file as is.
    result = _run(
        SYSTEMD_ANALYZE or "systemd-analyze",
        "security",
        "--offline=true",
        "--no-pager",
        str(UNIT),
        cwd=tmp_path,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    match = re.search(r"Overall exposure level for \S+: ([0-9]+(?:\.[0-9]+)?)", output)
    assert match, f"no overall exposure in:\n{output}"
    exposure = float(match.group(1))
    assert exposure <= MAX_EXPOSURE, f"exposure {exposure} > {MAX_EXPOSURE}:\n{output}"


def test_default_config_loads() -> None:
    cfg = load_config(AGENT_TOML)
    assert cfg.server.socket == "/run/outpost/agent.sock"
    assert cfg.data_dir == "/var/lib/outpost"
    assert cfg.server.socket_mode == 0o660
    # PrivateUsers=yes in the unit: no other group can be given the socket.
    assert cfg.server.socket_group == ""


def test_unit_matches_default_config() -> None:
    cfg = load_config(AGENT_TOML)
    assert _service_value("ExecStart") == f"{INSTALLED_EXEC} run --config /etc/outpost/agent.toml"
    assert Path(cfg.server.socket).parent == Path("/run") / _service_value("RuntimeDirectory")
    assert cfg.data_path == Path("/var/lib") / _service_value("StateDirectory")
    # systemd must not SIGKILL the agent while it is still draining requests.
    assert float(_service_value("TimeoutStopSec")) > cfg.server.drain_timeout_s
    assert _service_value("User") == _service_value("Group") == "outpost"
    assert _service_value("Type") == "notify"
    assert _service_value("NotifyAccess") == "main"


def test_unit_disables_onnxruntime_telemetry() -> None:
    assert "ORT_DISABLE_TELEMETRY=1" in _service_values("Environment")


needs_sysusers = pytest.mark.skipif(
    shutil.which("systemd-sysusers") is None or shutil.which("systemd-tmpfiles") is None,
    reason="systemd-sysusers/systemd-tmpfiles are not installed (the systemd package)",
)


def _ids(etc: Path, file: str, name: str) -> list[str]:
    for line in (etc / file).read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return fields
    raise AssertionError(f"{name} not in {file}")


@needs_sysusers
def test_sysusers_creates_user_and_group(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    result = _run("systemd-sysusers", f"--root={tmp_path}", str(SYSUSERS), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    user = _ids(tmp_path / "etc", "passwd", "outpost")
    group = _ids(tmp_path / "etc", "group", "outpost")
    assert user[3] == group[2], "primary group of user outpost is group outpost"
    assert int(user[2]) < 1000, "a system user"
    assert user[6] == "/usr/sbin/nologin"


@needs_sysusers
@pytest.mark.skipif(os.geteuid() != 0, reason="systemd-tmpfiles must be root to chown")
def test_tmpfiles_creates_config_dir(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    steps = [
        ("systemd-sysusers", f"--root={tmp_path}", str(SYSUSERS)),
        ("systemd-tmpfiles", f"--root={tmp_path}", "--create", str(TMPFILES)),
    ]
    for step in steps:
        result = _run(*step, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    gid = int(_ids(tmp_path / "etc", "group", "outpost")[2])
    st = (tmp_path / "etc" / "outpost").stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, gid, 0o750)
