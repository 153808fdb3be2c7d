"""Starting and stopping the contenders' server processes, and watching their memory and CPU.

Every server is started the way its user would start it (the peer as a Python module, the
agent with its installed `outpost-agent` command and a TOML config), in its own session so
that it and anything it spawns can be stopped as one group. `stop()` always runs (callers use
`with`), escalating from SIGTERM to SIGKILL after a timeout, so a run never leaves a server
behind. Everything listens on a Unix socket in the run's temporary directory.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from tests.benchmarks.client import ClientError, http_request, request_once

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
INSTALL_TIMEOUT_S = 120.0
POLL_INTERVAL_S = 0.005  # start-up to ready is measured to within this


class Unavailable(Exception):
    """A contender could not be started; the message says why (shown in the results)."""


@dataclass
class Server:
    label: str
    socket: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    startup_s: float = 0.0
    config_path: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        # The group is the one this server was started in (start_new_session), so this
        # reaches the server and its children and nothing else.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.notes.append(f"did not stop within {STOP_TIMEOUT_S:.0f} s of SIGTERM; killed")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=STOP_TIMEOUT_S)

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    # --- resources ---------------------------------------------------------------------

    def processes(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def rss_bytes(self) -> int:
        total = 0
        for p in self.processes():
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return total

    def peak_rss_bytes(self) -> int:
        """VmHWM: the kernel's high-water mark of resident memory, summed over the tree."""
        total = 0
        for p in self.processes():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1]) * 1024
        return total

    def cpu_seconds(self) -> float:
        total = 0.0
        for p in self.processes():
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
        return total


def _spawn(label: str, argv: list[str], socket: str, log_path: Path,
           extra_env: dict[str, str] | None = None) -> Server:
    env = {**os.environ, **(extra_env or {})}
    env.pop("NOTIFY_SOCKET", None)  # we are not systemd; the agent must not try to notify it
    with contextlib.suppress(FileNotFoundError):
        Path(socket).unlink()
    log_file = log_path.open("wb")
    started = time.perf_counter()
    try:
        proc = subprocess.Popen(
            argv, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, start_new_session=True,
        )
    except OSError as exc:
        raise Unavailable(f"cannot start {argv[0]}: {exc}") from exc
    finally:
        log_file.close()
    server = Server(label, socket, proc, log_path)
    try:
        server.startup_s = _wait_ready(server, started)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_ready(server: Server, started: float) -> float:
    probe = http_request("GET", "/v2/health/ready")
    deadline = started + READY_TIMEOUT_S
    while time.perf_counter() < deadline:
        if server.proc.poll() is not None:
            raise Unavailable(
                f"exited with status {server.proc.returncode} before it was ready: "
                f"{server.log_tail()}"
            )
        if Path(server.socket).exists():
            with contextlib.suppress(ClientError):
                if request_once(server.socket, probe, timeout=5).status == 200:
                    return time.perf_counter() - started
        time.sleep(POLL_INTERVAL_S)
    raise Unavailable(f"not ready within {READY_TIMEOUT_S:.0f} s: {server.log_tail()}")


def start_peer(workdir: Path, name: str, packages: list[Path], mode: str = "async") -> Server:
    socket = str(workdir / f"{name}.sock")
    argv = [sys.executable, "-m", "tests.benchmarks.peer", "--socket", socket, "--mode", mode]
    for p in packages:
        argv += ["--package", str(p)]
    return _spawn(f"peer ({mode})", argv, socket, workdir / f"{name}.log")


def start_probe(workdir: Path, name: str, packages: list[Path]) -> Server:
    socket = str(workdir / f"{name}.sock")
    argv = [sys.executable, "-m", "tests.benchmarks.probe", "--socket", socket]
    for p in packages:
        argv += ["--package", str(p)]
    return _spawn("probe", argv, socket, workdir / f"{name}.log")


# --- the agent ---------------------------------------------------------------------------------


def byte_compile_agent() -> bool:
    """Byte-compile the agent's modules, as `pip install` of the wheel does on a device.

    The development install is editable, and with PYTHONDONTWRITEBYTECODE set (as on the
    benchmark VM) Python never writes the .pyc files: every agent start compiled all of its
    modules again, which cost about 1.7 MB of resident memory (the compiler's peak stays in the
    heap) and start-up time that an installed agent never pays. The peer's libraries are
    site-packages, compiled by pip at install time, so without this the comparison is unfair.
    Returns whether every module compiled."""
    import compileall

    import agent

    return bool(compileall.compile_dir(str(Path(agent.__file__).parent), quiet=1))


def agent_bin() -> Path:
    """`outpost-agent` from the environment running the benchmark (`make bench`: .venv/bin)."""
    return Path(sys.executable).parent / "outpost-agent"


def write_agent_config(directory: Path, socket: str, runtime: dict[str, Any],
                       sections: dict[str, dict[str, Any]] | None = None) -> Path:
    """The config a user writes: identity, data directory, socket; no hub, no MQTT broker.
    `sections` adds tables (e.g. {"monitor": {"enabled": False}})."""
    lines = [
        'device_id = "bench-001"',
        'group = "bench"',
        f'data_dir = "{directory / "data"}"',
        "",
        "[server]",
        f'socket = "{socket}"',
        "",
        "[hub]",
        'url = ""',
        "",
        "[mqtt]",
        'url = ""',
    ]
    if runtime:
        lines += ["", "[runtime]"]
        for key, value in runtime.items():
            lines.append(f"{key} = {str(value).lower() if isinstance(value, bool) else value}")
    for table, keys in (sections or {}).items():
        lines += ["", f"[{table}]"]
        for key, value in keys.items():
            lines.append(f"{key} = {str(value).lower() if isinstance(value, bool) else value}")
    path = directory / "agent.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def agent_cli(config: Path, *args: str, timeout: float = INSTALL_TIMEOUT_S) -> str:
    """Run `outpost-agent ARGS --config CONFIG`; its output, or Unavailable saying why not."""
    exe = agent_bin()
    if not exe.exists():
        raise Unavailable(f"{exe} does not exist (is the project installed in this venv?)")
    try:
        done = subprocess.run(
            [str(exe), *args, "--config", str(config)], capture_output=True, text=True,
            timeout=timeout, stdin=subprocess.DEVNULL, check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise Unavailable(f"outpost-agent {args[0]} took over {timeout:.0f} s") from exc
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise Unavailable(f"outpost-agent {args[0]} exited {done.returncode}: {' | '.join(tail)}")
    return done.stdout


def start_agent(workdir: Path, name: str, label: str, packages: list[Path],
                runtime: dict[str, Any], sections: dict[str, dict[str, Any]] | None = None,
                extra_env: dict[str, str] | None = None) -> Server:
    """Install the packages with the agent's CLI, then `outpost-agent run --config`."""
    directory = workdir / name
    directory.mkdir()
    socket = str(workdir / f"{name}.sock")
    config = write_agent_config(directory, socket, runtime, sections)
    for package in packages:
        agent_cli(config, "install", str(package))
    server = _spawn(label, [str(agent_bin()), "run", "--config", str(config)], socket,
                    workdir / f"{name}.log", extra_env)
    server.config_path = config
    return server
