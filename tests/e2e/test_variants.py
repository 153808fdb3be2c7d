"""End to end: a real hub with a version in two hardware variants, and two real agents whose
hardware differs; each installs and serves only the variant that fits it."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from examples.train_example import NAME, TARGET, build_example
from hub.operator_cli import main
from tests.support.agentproc import AgentProcess
from tests.support.hubproc import HubProcess
from tests.support.packages import FAST_PROBATION

pytestmark = pytest.mark.e2e

VNNI = ["arch:x86_64", "cpu:avx2", "cpu:vnni", "ep:cpu"]
PLAIN = ["arch:x86_64", "cpu:avx2", "ep:cpu"]


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    example = build_example(tmp_path_factory.mktemp("example")).parent
    out = tmp_path_factory.mktemp("variants")
    argv = [
        "package", str(example / f"{NAME}.joblib"), "--sample", str(example / f"{NAME}-sample.csv"),
        "--target", TARGET, "--name", NAME, "--version", "1", "--out", str(out), "--variants", "int8,fp32",
    ]  # fmt: skip
    assert main(argv) == 0
    directory = out / f"{NAME}-1"
    # A probation a test can wait for, in both variants (the generic manifest lists the int8
    # manifest by hash, so it is written last).
    int8 = json.loads((directory / "manifest.int8.json").read_text())
    int8["probation"] = FAST_PROBATION
    (directory / "manifest.int8.json").write_text(json.dumps(int8))
    generic = json.loads((directory / "manifest.json").read_text())
    generic["probation"] = FAST_PROBATION
    generic["variants"][0]["manifest_sha256"] = hashlib.sha256(
        (directory / "manifest.int8.json").read_bytes()
    ).hexdigest()
    (directory / "manifest.json").write_text(json.dumps(generic))
    return directory


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubProcess]:
    process = HubProcess(tmp_path / "hub").start()
    yield process
    process.kill()


def device(tmp_path: Path, hub: HubProcess, name: str, tags: list[str]) -> AgentProcess:
    root_file = tmp_path / f"{name}-root.json"
    root_file.write_bytes(hub.root)
    return AgentProcess(
        tmp_path / name,
        extra={
            "device_id": name,
            "group": "lab",
            "hub": {"url": hub.url, "trusted_root": str(root_file), "poll_interval_s": 0.3},
            "runtime": {"hardware_tags": tags},
        },
    )


def serving_variant(agent: AgentProcess) -> str | None:
    status, doc = agent.json("GET", "/v1/status")
    for model in doc.get("models", []) if status == 200 else []:
        for v in model["versions"]:
            if model["name"] == NAME and v["state"] == "ready" and model["default_version"] == v["version"]:
                return str(v["variant"])
    return None


def infer(agent: AgentProcess) -> int:
    row = [13.2, 2.77, 2.51, 18.5, 96.0, 1.9, 0.58, 0.63, 1.14, 7.5, 0.67, 1.73, 880.0]
    body = {"inputs": [{"name": "input", "shape": [1, 13], "datatype": "FP32", "data": row}]}
    status, doc = agent.json("POST", f"/v2/models/{NAME}/infer", body)
    assert status == 200, doc
    assert doc["model_version"] == "1"
    return int(doc["outputs"][0]["data"][0])


def files_under(root: Path) -> set[str]:
    return {p.name for p in root.rglob("*.onnx")}


def test_each_device_installs_only_the_variant_its_hardware_fits(
    tmp_path: Path, hub: HubProcess, package: Path
) -> None:
    pushed = hub.outpost("push", str(package), "--quiet")
    assert pushed.returncode == 0, pushed.stderr
    hub.outpost("deploy", NAME, "1", "--group", "lab")
    vnni = device(tmp_path, hub, "dev-vnni", VNNI)
    plain = device(tmp_path, hub, "dev-plain", PLAIN)
    try:
        for agent in (vnni, plain):
            agent.start(wait_ready=False)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and (
            serving_variant(vnni) is None or serving_variant(plain) is None
        ):
            time.sleep(0.2)
        assert serving_variant(vnni) == "int8", vnni.log()[-3000:]
        assert serving_variant(plain) == "fp32", plain.log()[-3000:]
        # Both serve, and agree on this clear-cut row.
        assert infer(vnni) == infer(plain)
        # Only the fitting variant was downloaded and installed (data_dir holds the store, the
        # TUF cache and staging).
        assert files_under(vnni.data_dir) == {"model.int8.onnx"}
        assert files_under(plain.data_dir) == {"model.onnx"}
        installed = vnni.data_dir / "models" / NAME / "1"
        assert (installed / "manifest.json").read_bytes() == (package / "manifest.int8.json").read_bytes()
        assert (plain.data_dir / "models" / NAME / "1" / "manifest.json").read_bytes() == (
            package / "manifest.json"
        ).read_bytes()
        _, doc = vnni.json("GET", "/v1/status")
        assert doc["hardware"] == {"tags": sorted(VNNI), "source": "configured (runtime.hardware_tags)"}
        (version,) = doc["models"][0]["versions"]
        assert version["providers"] == ["CPUExecutionProvider"]
    finally:
        vnni.kill()
        plain.kill()


def update_state(agent: AgentProcess) -> dict[str, object]:
    status: dict[str, object] = agent.json("GET", "/v1/status")[1]["update"]
    return status


def test_a_device_whose_tags_change_keeps_the_variant_it_runs(
    tmp_path: Path, hub: HubProcess, package: Path
) -> None:
    """Installed versions are immutable: new tags (here: cpu:vnni appears) apply from the next
    version on, and the variant running now is neither swapped nor marked bad."""
    hub.outpost("push", str(package), "--quiet")
    hub.outpost("deploy", NAME, "1", "--group", "lab")
    agent = device(tmp_path, hub, "dev-1", PLAIN)
    agent.start(wait_ready=False)
    stop = threading.Event()

    def traffic() -> None:  # probation needs answers
        while not stop.is_set():
            try:
                infer(agent)
            except (OSError, AssertionError):
                time.sleep(0.05)

    worker = threading.Thread(target=traffic, daemon=True)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and serving_variant(agent) is None:
            time.sleep(0.2)
        worker.start()
        while time.monotonic() < deadline and update_state(agent)["state"] != "committed":
            time.sleep(0.2)
        assert update_state(agent)["state"] == "committed", agent.log()[-3000:]
        stop.set()
        worker.join(10)
        agent.kill()

        again = device(tmp_path, hub, "dev-1", VNNI)  # the same data_dir, new tags
        again.start()
        agent = again
        checks = update_state(again)["last_check"]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and update_state(again)["last_check"] == checks:
            time.sleep(0.2)
        time.sleep(1.0)  # a few more polls at 0.3 s
        state = update_state(again)
        assert state["state"] == "committed", state
        assert state["bad"] == [] and state["pending"] is None, state
        assert serving_variant(again) == "fp32"
        assert files_under(again.data_dir) == {"model.onnx"}
        assert "is already installed with a different model" not in again.log()
    finally:
        stop.set()
        agent.kill()
