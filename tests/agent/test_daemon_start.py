"""Start-up order: the outbox takes the monitor's windows before the socket takes requests.

A client that sends its requests the moment the socket appears can fill a window before the broker
connection is even tried; that window must be stored in the outbox (sent once connected), not
counted as unpublished. The broker here is a loopback port nobody listens on: the window stays in
the outbox, as it would with the network down.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import orjson

from agent.config import parse_config
from agent.daemon import Agent
from tests.support.packages import affine_package


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _first_request(path: str) -> bytes:
    body = orjson.dumps(
        {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    )
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(b"POST /v2/models/affine/infer HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    writer.close()
    return head


def test_a_window_closed_at_once_is_kept_in_the_outbox(tmp_path: Path) -> None:
    sock = str(tmp_path / "a.sock")
    cfg = parse_config(
        {
            "data_dir": str(tmp_path / "data"),
            "server": {"socket": sock},
            "mqtt": {"url": f"mqtt://127.0.0.1:{_free_port()}", "reconnect_min_s": 30.0},
            "monitor": {"window_requests": 1, "window_s": 3600.0},
        }
    )
    agent = Agent(cfg)
    agent.store.prepare()
    agent.store.install(affine_package(tmp_path / "pkg"))
    wired_when_serving: list[bool] = []

    async def main() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        serve = loop.create_unix_server

        async def create_unix_server(*args: Any, **kwargs: Any) -> Any:
            # The moment requests can come in: the monitor must have somewhere to put a window.
            assert agent.monitor is not None
            wired_when_serving.append(agent.monitor.publish is not None)
            return await serve(*args, **kwargs)

        loop.create_unix_server = create_unix_server  # type: ignore[method-assign]
        await agent.start()
        try:
            assert (await _first_request(sock)).startswith(b"HTTP/1.1 200")
            await asyncio.sleep(0.05)  # the window closes after the answer went out
            return agent.app.status()
        finally:
            await agent.stop()

    status = asyncio.run(main())
    assert wired_when_serving == [True]
    monitor = status["monitor"]
    assert monitor["unpublished"] == 0
    assert monitor["versions"][0]["windows_published"] == 1
    assert status["telemetry"]["queued"] >= 1  # stored, waiting for the broker
