"""The retained `state` message names the hardware class and each model's execution providers."""

from __future__ import annotations

from pathlib import Path

from agent.config import parse_config
from agent.daemon import Agent
from tests.support.packages import affine_package


def test_state_carries_providers_and_hardware(tmp_path: Path) -> None:
    cfg = parse_config(
        {
            "data_dir": str(tmp_path / "data"),
            "server": {"socket": str(tmp_path / "a.sock")},
            "runtime": {"providers": ["CUDAExecutionProvider"], "hardware_tags": ["arch:x86_64", "ep:cpu"]},
            "monitor": {"enabled": False},
        }
    )
    agent = Agent(cfg)
    try:
        agent.store.prepare()
        installed = agent.store.install(affine_package(tmp_path / "pkg"))
        agent.registry.add(agent.registry.load(installed))
        agent._refresh_state()
        state = agent._state_snapshot
        assert state["versions"] == {"affine": 1}
        assert state["providers"] == {"affine": ["CPUExecutionProvider"]}
        assert state["hardware"] == ["arch:x86_64", "ep:cpu"]
        assert state["variants"] == {}  # a package without variants
        assert agent._status_info()["hardware"]["source"] == "configured (runtime.hardware_tags)"
    finally:
        agent.infer_pool.shutdown()
        agent.load_pool.shutdown()
