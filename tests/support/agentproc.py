"""Runs the real outpost-agent process for end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from agent.client import UnixHTTPConnection

AGENT_BIN = str(Path(sys.executable).parent / "outpost-agent")


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(path: Path, doc: dict[str, Any]) -> Path:
    lines: list[str] = []
    tables: list[tuple[str, dict[str, Any]]] = []
    for key, value in doc.items():
        if isinstance(value, dict):
            tables.append((key, value))
        else:
            lines.append(f"{key} = {toml_value(value)}")
    while tables:
        name, table = tables.pop(0)
        lines.append(f"[{name}]")
        for key, value in table.items():
            if isinstance(value, dict):
                tables.append((f"{name}.{key}", value))
            else:
                lines.append(f"{key} = {toml_value(value)}")
    path.write_text("\n".join(lines) + "\n")
    return path


class AgentProcess:
    """An agent in its own temp directory, serving on a Unix socket there."""

    def __init__(self, root: Path, extra: dict[str, Any] | None = None, env: dict[str, str] | None = None):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.socket = str(root / "agent.sock")
        self.data_dir = root / "data"
        doc: dict[str, Any] = {
            "device_id": "test-device",
            "group": "test",
            "data_dir": str(self.data_dir),
            "log_level": "info",
            "server": {"socket": self.socket},
        }
        for key, value in (extra or {}).items():
            if isinstance(value, dict) and isinstance(doc.get(key), dict):
                doc[key] = {**doc[key], **value}
            else:
                doc[key] = value
        self.config = write_config(root / "agent.toml", doc)
        self.log_path = root / "agent.log"
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [AGENT_BIN, *args, "--config", str(self.config)],
            capture_output=True,
            text=True,
            timeout=120,
            env=self.env,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"outpost-agent {args} failed: {result.stdout} {result.stderr}")
        return result

    def install(self, package: Path) -> None:
        self.cli("install", str(package))

    def start(self, wait_ready: bool = True) -> AgentProcess:
        self.root.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [AGENT_BIN, "run", "--config", str(self.config)], stdout=log, stderr=log, env=self.env
        )
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited with {self.proc.returncode}: {self.log()}")
            if os.path.exists(self.socket):
                try:
                    status, _, _ = self.request("GET", "/v2/health/live")
                except OSError:
                    status = 0
                if status == 200:
                    if not wait_ready or self.request("GET", "/v2/health/ready")[0] == 200:
                        return self
            time.sleep(0.05)
        raise AssertionError(f"agent did not become ready: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 30,
    ) -> tuple[int, dict[str, str], bytes]:
        conn = UnixHTTPConnection(self.socket, timeout)
        try:
            payload = orjson.dumps(body) if isinstance(body, dict) else body
            conn.request(method, path, body=payload, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
        finally:
            conn.close()

    def json(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        status, _, data = self.request(method, path, body)
        return status, orjson.loads(data) if data else None


def plain_agent_env(workdir: Path) -> dict[str, str]:
    """The environment that runs the agent as plain Python: a byte-compiled copy of its sources
    without the modules setup.py compiled with mypyc, first on PYTHONPATH (which comes before the
    editable install's finder, so the copy's modules are the ones imported)."""
    import compileall

    import agent

    root = workdir / "plain-src"
    if not root.exists():
        shutil.copytree(
            Path(agent.__file__).parent, root / "agent", ignore=shutil.ignore_patterns("*.so", "__pycache__")
        )
        compileall.compile_dir(str(root / "agent"), quiet=1)
    return {"PYTHONPATH": str(root)}


@contextlib.contextmanager
def running_agent(root: Path, *packages: Path, **kwargs: Any) -> Iterator[AgentProcess]:
    agent = AgentProcess(root, **kwargs)
    for package in packages:
        agent.install(package)
    agent.start()
    try:
        yield agent
    finally:
        agent.kill()


__all__ = ["AgentProcess", "plain_agent_env", "running_agent", "write_config"]
