"""Execution providers and the hardware class, seen through a real agent's status."""

from __future__ import annotations

from pathlib import Path

from tests.support.agentproc import running_agent
from tests.support.packages import affine_package

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def test_unavailable_provider_falls_back_to_cpu_and_status_says_why(tmp_path: Path) -> None:
    package = affine_package(tmp_path / "pkg")
    extra = {"runtime": {"providers": [CUDA, CPU], "models": {"other": {"providers": [CPU]}}}}
    with running_agent(tmp_path / "agent", package, extra=extra) as agent:
        status, doc = agent.json("GET", "/v1/status")
        assert status == 200
        (model,) = [m for m in doc["models"] if m["name"] == "affine"]
        (version,) = model["versions"]
        assert version["providers"] == [CPU]
        assert f"{CUDA} is not available" in version["providers_note"]
        hw = doc["hardware"]
        assert hw["source"] == "detected"
        assert "ep:cpu" in hw["tags"]
        assert any(t.startswith("arch:") for t in hw["tags"])
        assert "falling back to CPUExecutionProvider" in agent.log()
        status, _, _ = agent.request("POST", "/v2/models/affine/infer", _one_row())
        assert status == 200
        printed = agent.cli("status").stdout
        assert "  hardware: arch:" in printed and "(detected)" in printed
        assert f"on {CPU} ({CUDA} is not available in this onnxruntime build" in printed


def test_configured_hardware_tags_replace_detection(tmp_path: Path) -> None:
    package = affine_package(tmp_path / "pkg")
    extra = {"runtime": {"hardware_tags": ["arch:aarch64", "cpu:dotprod", "ep:cpu"]}}
    with running_agent(tmp_path / "agent", package, extra=extra) as agent:
        _, doc = agent.json("GET", "/v1/status")
        assert doc["hardware"] == {
            "tags": ["arch:aarch64", "cpu:dotprod", "ep:cpu"],
            "source": "configured (runtime.hardware_tags)",
        }
        (version,) = doc["models"][0]["versions"]
        assert version["providers"] == [CPU]
        assert version["providers_note"] == "as configured"


def _one_row() -> dict[str, object]:
    return {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
