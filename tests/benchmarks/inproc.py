"""The agent's request path in-process: CPU per request without the socket, for profiling.

    python -m tests.benchmarks.inproc [--clients 16] [--monitor off] [--canned] [--unhook-monitor]
                                      [--profile tottime|cumulative]

A real agent (`agent.daemon.Agent`, the bench's tabular package installed with its CLI, the default
config) is started in this process; `--clients` protocol objects (`agent.serving.http.HttpProtocol`)
on stand-in transports each get the bench's one-row request at the start of a loop iteration, and
the loop runs until every one has written its answer: what `--clients` closed-loop clients give, minus
the read and write system calls. The figure is process CPU per request, the best of five rounds.

- `--canned`: the handler answers a prebuilt 200 at once: the HTTP layer alone.
- `--monitor off`: `[monitor] enabled = false`; `--unhook-monitor`: the monitor on, but the batches
  not handed to it (what holding and counting them costs the path, apart from the rest).
- `--profile`: cProfile of one more round, sorted so (it inflates small Python calls).

docs/benchmarks.md quotes what it gave; the socket figures come from `make bench`.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import uvloop

from tests.benchmarks.client import json_infer_request
from tests.benchmarks.models import TABULAR, build_packages, tabular_data
from tests.benchmarks.servers import agent_cli, write_agent_config

ROUNDS = 5
BURSTS = 3000


class _Transport(asyncio.Transport):
    """Counts and keeps what the protocol writes; everything else is a no-op."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.last = b""

    def write(self, data: Any) -> None:
        self.writes += 1
        self.last = bytes(data)

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def _main(args: argparse.Namespace) -> None:
    from agent.config import load_config
    from agent.daemon import Agent
    from agent.serving.http import HttpProtocol, Response

    packages = build_packages(Path("bench-results/packages"))
    work = Path(tempfile.mkdtemp(prefix="outpost-inproc-"))
    (work / "agent").mkdir()
    sections = {"monitor": {"enabled": False}} if args.monitor == "off" else None
    config = write_agent_config(work / "agent", str(work / "agent.sock"), {}, sections)
    agent_cli(config, "install", str(packages.tabular))
    agent = Agent(load_config(config))
    await agent.start()
    try:
        if args.canned:
            canned = Response(200, b'{"ok":true}')
            agent.state.handler = lambda _request: canned
        if args.unhook_monitor:
            for lv in agent.registry.all_loaded():
                lv.batcher.observer = None
        x, _ = tabular_data(seed=1)
        raw = json_infer_request(TABULAR, [("input", "FP32", x[:1].astype(np.float32))])
        conns = []
        for _ in range(args.clients):
            transport = _Transport()
            protocol = HttpProtocol(agent.state)
            protocol.connection_made(transport)
            conns.append((transport, protocol))

        async def burst() -> None:
            for transport, protocol in conns:
                transport.writes = 0
                protocol.data_received(raw)
            while any(t.writes == 0 for t, _ in conns):
                await asyncio.sleep(0)

        for _ in range(300):
            await burst()
        assert conns[0][0].last.startswith(b"HTTP/1.1 200"), conns[0][0].last[:200]
        best = float("inf")
        for _ in range(ROUNDS):
            started = time.process_time_ns()
            for _ in range(BURSTS):
                await burst()
            best = min(best, (time.process_time_ns() - started) / BURSTS / args.clients / 1000)
        what = (
            "canned 200"
            if args.canned
            else f"monitor {args.monitor}" + (", unhooked" if args.unhook_monitor else "")
        )
        print(json.dumps({"clients": args.clients, "what": what, "cpu_us_per_request": round(best, 2)}))
        if args.profile:
            profile = cProfile.Profile()
            profile.enable()
            for _ in range(BURSTS):
                await burst()
            profile.disable()
            pstats.Stats(profile).sort_stats(args.profile).print_stats(40)
    finally:
        await agent.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--monitor", choices=["on", "off"], default="on")
    parser.add_argument("--canned", action="store_true")
    parser.add_argument("--unhook-monitor", action="store_true")
    parser.add_argument("--profile", choices=["tottime", "cumulative"])
    uvloop.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
