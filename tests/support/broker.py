"""A real Mosquitto on a free loopback port, for tests: generated config, temp dir, start/stop/kill.

    broker = Mosquitto(tmp_path).start()
    ... broker.url ...
    broker.stop()          # SIGTERM; with persistence=True, sessions and retained messages are saved

The port stays the same across stop()/start(), so clients reconnect to the same URL.
`config=` replaces the generated configuration with the caller's (see its docstring).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mosquitto_available() -> bool:
    return Path(MOSQUITTO).exists()


class Mosquitto:
    def __init__(
        self,
        directory: Path,
        persistence: bool = False,
        extra_config: str = "",
        config: Callable[[Mosquitto], str] | None = None,
    ) -> None:
        """`config`, when given, writes the whole configuration instead of the generated one: it is
        called with this broker (port, dir, log_path chosen) and must listen on 127.0.0.1:port and
        log to log_path; `persistence` and `extra_config` are then unused."""
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self.log_path = self.dir / "mosquitto.log"
        self.conf_path = self.dir / "mosquitto.conf"
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            f"persistence {'true' if persistence else 'false'}",
            f"persistence_location {self.dir}/",
            f"log_dest file {self.log_path}",
            "log_type all",
            "log_timestamp true",
        ]
        if os.geteuid() == 0:
            # As root, Mosquitto drops to the "mosquitto" user, which cannot write the temp dir.
            lines.append(f"user {pwd.getpwuid(0).pw_name}")
        if config is not None:
            lines = [config(self), *(line for line in lines if line.startswith("user "))]
            extra_config = ""
        self.conf_path.write_text("\n".join(lines) + "\n" + extra_config)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> Mosquitto:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"mosquitto exited ({self.proc.returncode}): {self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.02)
        self.kill()
        raise AssertionError(f"mosquitto did not listen on {self.port}: {self.log()}")

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
