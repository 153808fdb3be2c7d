"""Runs the real outpost-hub process on a free loopback port for end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests

HUB_BIN = str(Path(sys.executable).parent / "outpost-hub")
OUTPOST_BIN = str(Path(sys.executable).parent / "outpost")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class HubProcess:
    def __init__(
        self,
        data: Path,
        short_expiry: float = 0.0,
        settings: dict[str, Any] | None = None,
        database_url: str = "",
        init: bool = True,
    ) -> None:
        """`init=False`: another process of a hub already made in `data` (several hub workers
        sharing one data directory and database)."""
        self.data = data
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = data.parent / (f"{data.name}.log" if init else f"{data.name}-{self.port}.log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.init_output = ""
        if init:
            args = [HUB_BIN, "init", "--data", str(data)]
            if short_expiry:
                args += ["--short-expiry", str(short_expiry)]
            if database_url:
                args += ["--database-url", database_url]
            result = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
            if result.returncode != 0:
                raise AssertionError(f"outpost-hub init failed: {result.stderr}")
            self.init_output = result.stdout
        if settings:
            self.set_settings(**settings)
        self.token = (data / "operator.token").read_text().strip()
        self.root = (data / "tuf" / "metadata" / "root.json").read_bytes()

    def set_settings(self, **values: Any) -> None:
        """Change keys of DATA/hub.toml (as `outpost-hub init` wrote it) before `start`."""
        path = self.data / "hub.toml"
        lines = path.read_text().splitlines()
        for key, value in values.items():
            rendered = f"{key} = {json.dumps(value)}"  # TOML reads JSON strings, numbers, booleans
            at = [i for i, line in enumerate(lines) if line.split("=")[0].strip() == key]
            if at:
                lines[at[0]] = rendered
            else:
                lines.append(rendered)
        path.write_text("\n".join(lines) + "\n")

    def start(self, mqtt_url: str | None = None, client_id: str | None = None) -> HubProcess:
        """Serve; with `mqtt_url`, also consume fleet telemetry from that broker (--mqtt), as
        `client_id` when given (--mqtt-client-id)."""
        log = self.log_path.open("ab")
        args = [HUB_BIN, "serve", "--data", str(self.data), "--listen", f"127.0.0.1:{self.port}"]
        if mqtt_url is not None:
            args += ["--mqtt", mqtt_url]
        if client_id is not None:
            args += ["--mqtt-client-id", client_id]
        self.proc = subprocess.Popen(args, stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"hub exited: {self.log()}")
            try:
                if requests.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"hub did not start: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def api(
        self, method: str, path: str, token: str | None = None, auth: bool = True, **kwargs: Any
    ) -> requests.Response:
        headers = kwargs.pop("headers", {})
        if auth:
            headers["Authorization"] = f"Bearer {token or self.token}"
        return requests.request(method, self.url + path, headers=headers, timeout=60, **kwargs)

    def outpost(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "OUTPOST_HUB": self.url, "OUTPOST_TOKEN": self.token}
        result = subprocess.run(
            [OUTPOST_BIN, *args], capture_output=True, text=True, env=env, timeout=120, check=False
        )
        if check and result.returncode != 0:
            raise AssertionError(f"outpost {args} failed: {result.stdout} {result.stderr}")
        return result
