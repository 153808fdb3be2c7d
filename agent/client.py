"""A minimal HTTP client for the agent's Unix socket (stdlib only), used by the CLI."""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any

from agent.errors import AgentError


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 10.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def call(
    socket_path: str, method: str, path: str, body: Any = None, timeout: float = 30.0
) -> tuple[int, Any]:
    """Send one request to the agent; returns (status, decoded JSON body)."""
    conn = UnixHTTPConnection(socket_path, timeout)
    try:
        payload = None if body is None else json.dumps(body).encode()
        headers = {"content-type": "application/json"} if payload is not None else {}
        conn.request(method, path, body=payload, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
    except FileNotFoundError:
        raise AgentError(f"no agent socket at {socket_path}; is outpost-agent running?") from None
    except ConnectionRefusedError:
        raise AgentError(f"the agent at {socket_path} refused the connection; is it running?") from None
    except PermissionError:
        raise AgentError(
            f"no permission to use {socket_path}; join the socket's group (e.g. outpost)"
        ) from None
    except OSError as exc:
        raise AgentError(f"cannot talk to the agent at {socket_path}: {exc}") from exc
    finally:
        conn.close()
    try:
        return resp.status, json.loads(raw) if raw else None
    except ValueError:
        return resp.status, raw.decode("utf-8", "replace")
