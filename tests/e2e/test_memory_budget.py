"""End to end: the memory budget in a real agent process with the real onnxruntime.

A model that does not fit is refused with the reason while the models loaded keep answering;
the least recently used version nothing pins is evicted to make room; with a budget too small
for two versions, a hub update's probation runs without the previous version warm and a failing
candidate still falls back to it (reloaded from disk).

The packages carry an unused 4 MiB initializer: onnxruntime drops it at load (so the measured
cost stays small), the estimate counts it (2x the file), so each version is charged its
estimate and the budgets below do not depend on how much RSS a load happens to add. The agent's
baseline is taken from a first run of the same configuration without a budget.
"""

from __future__ import annotations

import json
import math
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from agent.package.manifest import SelfTest, Tensor, TensorSpec, parse_manifest
from agent.package.store import write_package_tar
from agent.runtime.memory import estimate
from tests.e2e.test_update import Traffic, device, served_version, update_status, wait_for
from tests.support.agentproc import AgentProcess
from tests.support.hubproc import HubProcess
from tests.support.packages import FAST_PROBATION, affine_model, wine_versions, write_package

pytestmark = pytest.mark.e2e

PAD_FLOATS = 1024 * 1024  # 4 MiB of unused weights
MAX_BATCH = 64  # the default runtime.max_batch_size the estimates assume


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubProcess]:
    process = HubProcess(tmp_path / "hub").start()
    yield process
    process.kill()


def padded(model: onnx.ModelProto, seed: int = 0, floats: int = PAD_FLOATS) -> onnx.ModelProto:
    """The model with an initializer no node reads: a bigger file, the same graph."""
    pad = np.random.default_rng(seed).standard_normal(floats).astype(np.float32)
    model.graph.initializer.append(numpy_helper.from_array(pad, "unused_padding"))
    return model


def affine_padded(out: Path, name: str, version: int = 1, scale: float = 2.0) -> Path:
    rows = np.arange(8, dtype=np.float32).reshape(2, 4)
    y = rows * scale + 1
    test = SelfTest(
        inputs=(Tensor("x", "FP32", (2, 4), rows.ravel().tolist()),),
        outputs=(
            Tensor("y", "FP32", (2, 4), y.ravel().tolist()),
            Tensor("label", "INT64", (2,), y.argmax(axis=1).tolist()),
        ),
    )
    return write_package(
        out / f"{name}-{version}",
        padded(affine_model(scale), seed=version),
        name=name,
        version=version,
        inputs=[TensorSpec("x", "FP32", (-1, 4))],
        outputs=[TensorSpec("y", "FP32", (-1, 4)), TensorSpec("label", "INT64", (-1,))],
        self_test=test,
    )


def estimate_mb(package: Path) -> float:
    manifest = parse_manifest(json.loads((package / "manifest.json").read_text()))
    return estimate(manifest, MAX_BATCH).total / (1024 * 1024)


def memory(agent: AgentProcess) -> dict[str, Any]:
    doc: dict[str, Any] = agent.json("GET", "/v1/status")[1]["memory"]
    return doc


def baseline_mb(root: Path, extra: dict[str, Any] | None = None) -> float:
    """The baseline of an agent with this configuration (and no budget), from a first run."""
    agent = AgentProcess(root, extra=extra)
    agent.start(wait_ready=False)
    try:
        doc = memory(agent)
        assert doc["budget_mb"] is None
        return float(doc["baseline_mb"])
    finally:
        agent.kill()


def budget(extra: int) -> dict[str, Any]:
    return {"runtime": {"memory_budget_mb": extra}}


def x_doc() -> dict[str, Any]:
    return {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]}]}


def hammer(agent: AgentProcess, path: str) -> Traffic:
    """Clients asking one model (or version) without pause; every failure is recorded."""
    return Traffic(agent, clients=3, path=path, doc=x_doc)


def test_a_model_that_does_not_fit_is_refused_while_serving_continues(tmp_path: Path) -> None:
    a = affine_padded(tmp_path / "pkgs", "alpha")
    b = affine_padded(tmp_path / "pkgs", "beta")
    base = baseline_mb(tmp_path / "calibrate")
    # room for alpha and half of beta
    limit = math.ceil(base + estimate_mb(a) + 0.5 * estimate_mb(b))
    agent = AgentProcess(tmp_path / "agent", extra=budget(limit))
    agent.install(a)
    agent.start()
    try:
        with hammer(agent, "/v2/models/alpha/infer") as traffic:
            result = agent.cli("install", str(b), check=False)
            for _ in range(50):  # keep asking alpha a little after the refusal too
                assert agent.json("POST", "/v2/models/alpha/infer", x_doc())[0] == 200
        assert result.returncode == 1, result.stdout + result.stderr
        assert "could not load beta version 1: memory budget: beta v1 needs ~" in result.stdout
        assert f"of {float(limit)} MiB are in use" in result.stdout
        assert traffic.failures == []
        assert traffic.answers > 20
        assert agent.json("POST", "/v2/models/beta/infer", x_doc())[0] == 503
        status, doc = agent.json("POST", "/v2/models/beta/versions/1/infer", x_doc())
        assert status == 503 and "failed to load: memory budget" in doc["error"], doc
        mem = memory(agent)
        assert mem["budget_mb"] == limit
        assert mem["refused"] == 1
        assert mem["used_mb"] <= limit
        assert [v["model"] for v in mem["versions"]] == ["alpha"]
        alpha = mem["versions"][0]
        assert alpha["estimate_mb"] == pytest.approx(estimate_mb(a), abs=0.1)
        assert alpha["measured_mb"] is not None and alpha["pinned_by"] == "default version"
        assert mem["events"][-1]["what"] == "refused" and mem["events"][-1]["version"] == "beta v1"
        metrics = agent.request("GET", "/metrics")[2].decode()
        values = dict(line.rsplit(" ", 1) for line in metrics.splitlines() if not line.startswith("#"))
        assert float(values["outpost_memory_budget_bytes"]) == limit * 1024 * 1024
        assert "outpost_memory_refusals_total 1.0" in metrics
        assert 'outpost_model_memory_estimate_bytes{model="alpha",version="1"}' in metrics
        assert 'outpost_model_memory_measured_bytes{model="alpha",version="1"}' in metrics
        assert "memory budget" in agent.log()
        out = agent.cli("status").stdout
        assert f"MiB counted of {float(limit)} MiB" in out and "refused 1, evicted 0" in out, out
    finally:
        agent.kill()


def test_the_least_recently_used_unpinned_version_is_evicted_to_make_room(tmp_path: Path) -> None:
    pkgs = tmp_path / "pkgs"
    installed = [affine_padded(pkgs, name, version) for name in ("alpha", "gamma") for version in (1, 2)]
    beta = affine_padded(pkgs, "beta")
    base = baseline_mb(tmp_path / "calibrate")
    each = estimate_mb(beta)
    limit = math.ceil(base + 4 * each + 0.5 * each)  # the four, and half a fifth
    agent = AgentProcess(tmp_path / "agent", extra=budget(limit))
    for package in installed:
        agent.install(package)
    agent.start()
    try:
        # alpha v1 and gamma v1 are pinned by nothing (v2 is each model's default); alpha v1 is
        # asked now, gamma v1 was not asked since it loaded: gamma v1 goes.
        for _ in range(5):
            assert agent.json("POST", "/v2/models/alpha/versions/1/infer", x_doc())[0] == 200
        with hammer(agent, "/v2/models/gamma/infer") as traffic:
            result = agent.cli("install", str(beta), check=False)
        assert result.returncode == 0, result.stdout
        assert "now serves beta version 1" in result.stdout
        assert traffic.failures == [] and traffic.answers > 0
        assert agent.request("GET", "/v2/models/gamma/versions/1/ready")[0] != 200
        status, doc = agent.json("POST", "/v2/models/gamma/versions/1/infer", x_doc())
        assert status == 503 and "memory budget" in doc["error"], doc
        for path in ("alpha/versions/1", "alpha", "gamma", "beta"):
            assert agent.json("POST", f"/v2/models/{path}/infer", x_doc())[0] == 200, path
        mem = memory(agent)
        evicted = [e for e in mem["events"] if e["what"] == "evicted"]
        assert [e["version"] for e in evicted] == ["gamma v1"], mem["events"]
        assert "to make room for beta v1" in evicted[0]["reason"]
        assert mem["evicted"] == 1 and mem["used_mb"] <= limit
        loaded = {(v["model"], v["version"]): v["pinned_by"] for v in mem["versions"]}
        assert loaded == {
            ("alpha", 1): None,
            ("alpha", 2): "default version",
            ("beta", 1): "default version",
            ("gamma", 2): "default version",
        }
        assert "evicted gamma v1 to make room for beta v1" in agent.log()
        # a reload does not bring the evicted version back (it would only evict another)
        assert agent.json("POST", "/v1/reload")[1] == {"loaded": [], "failed": []}
    finally:
        agent.kill()


def _repackage(unpacked: Path, archive: Path, version: int, floats: int) -> Path:
    """The wine package in `unpacked` as `version`, padded with `floats` unused weights, with a
    short probation; written as `archive` (and its directory beside it)."""
    import hashlib

    out = archive.with_suffix("")
    out.mkdir()
    raw = padded(onnx.load(str(unpacked / "model.onnx")), seed=version, floats=floats).SerializeToString()
    (out / "model.onnx").write_bytes(raw)
    manifest = json.loads((unpacked / "manifest.json").read_text())
    manifest["version"] = version
    manifest["model"] = {**manifest["model"], "sha256": hashlib.sha256(raw).hexdigest(), "size": len(raw)}
    manifest["probation"] = FAST_PROBATION
    (out / "manifest.json").write_text(json.dumps(manifest))
    write_package_tar(out, archive)
    return archive


def wine_packages(tmp_path: Path) -> dict[str, Path]:
    """Wine v1 padded (archive "v1", directory "v1-dir"); v2 padded four times as much ("big":
    it fits no budget made for v1); v3, v1 failing on real traffic (examples.broken_versions)."""
    from examples.broken_versions import make_failing_variant

    archive = wine_versions(tmp_path / "wine", (1,))[1]
    plain = tmp_path / "wine-plain"
    plain.mkdir()
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            (plain / member.name).write_bytes(tar.extractfile(member).read())  # type: ignore[union-attr]
    v1 = _repackage(plain, tmp_path / "wine-padded-1.tar", 1, PAD_FLOATS)
    return {
        "v1": v1,
        "v1-dir": v1.with_suffix(""),
        "big": _repackage(plain, tmp_path / "wine-padded-2.tar", 2, 4 * PAD_FLOATS),
        "failing": make_failing_variant(v1.with_suffix(""), tmp_path, 3),
    }


def budget_device(tmp_path: Path, hub: HubProcess, room_mb: float) -> tuple[AgentProcess, int]:
    """A device of group lab whose budget leaves `room_mb` beside its baseline (taken from a first
    run of the same configuration without a budget)."""
    (tmp_path / "calibrate").mkdir()
    calibrate = device(tmp_path / "calibrate", hub)
    calibrate.start(wait_ready=False)
    try:
        base = float(memory(calibrate)["baseline_mb"])
    finally:
        calibrate.kill()
    limit = math.ceil(base + room_mb)
    agent = device(tmp_path, hub)
    config = agent.config.read_text()
    agent.config.write_text(config.replace("[server]", f"[runtime]\nmemory_budget_mb = {limit}\n[server]"))
    return agent, limit


def committed_v1(agent: AgentProcess, hub: HubProcess, v1: Path) -> None:
    hub.outpost("push", str(v1), "--quiet")
    hub.outpost("deploy", "wine", "1", "--group", "lab")
    agent.start(wait_ready=False)
    wait_for("v1 to serve", lambda: served_version(agent) == "1")
    with Traffic(agent):
        wait_for("v1 committed", lambda: update_status(agent)["state"] == "committed", agent=agent)


def test_an_assigned_version_that_does_not_fit_is_a_failed_install_while_v1_serves(
    tmp_path: Path, hub: HubProcess
) -> None:
    packages = wine_packages(tmp_path)
    each = estimate_mb(packages["v1-dir"])
    agent, limit = budget_device(tmp_path, hub, 1.5 * each)
    try:
        committed_v1(agent, hub, packages["v1"])
        with Traffic(agent) as traffic:
            hub.outpost("push", str(packages["big"]), "--quiet")
            hub.outpost("deploy", "wine", "2", "--group", "lab")
            wait_for("the refusal", lambda: update_status(agent)["state"] == "rolled_back", agent=agent)
            for _ in range(20):
                assert served_version(agent) == "1"
        assert traffic.failures == []  # v1 was never unloaded: the candidate did not fit even alone
        assert traffic.answers > 20
        st = update_status(agent)
        failed = [e for e in st["events"] if e["event"] == "load_failed"]
        assert len(failed) == 1, st["events"]
        assert (
            failed[0]["reason"].startswith("wine v2 (")
            and "memory budget: wine v2 needs ~" in failed[0]["reason"]
        )
        assert f"of {float(limit)} MiB are in use" in failed[0]["reason"]
        assert "previous_unloaded" not in [e["event"] for e in st["events"]]
        assert "v1" in st["current"]
        mem = memory(agent)
        assert mem["refused"] == 1 and mem["used_mb"] <= limit
        assert [(v["model"], v["version"]) for v in mem["versions"]] == [("wine", 1)]
    finally:
        agent.kill()


def test_probation_without_room_for_two_keeps_no_previous_warm_and_still_falls_back(
    tmp_path: Path, hub: HubProcess
) -> None:
    packages = wine_packages(tmp_path)
    each = estimate_mb(packages["v1-dir"])
    agent, limit = budget_device(tmp_path, hub, 1.5 * each)  # one version, not two
    try:
        committed_v1(agent, hub, packages["v1"])
        with Traffic(agent) as traffic:
            hub.outpost("push", str(packages["failing"]), "--quiet")
            hub.outpost("deploy", "wine", "3", "--group", "lab")
            wait_for("the fall back", lambda: update_status(agent)["state"] == "rolled_back", agent=agent)
        st = update_status(agent)
        events = [e["event"] for e in st["events"]]
        assert "previous_unloaded" in events and "probation_failed" in events, events
        pm = st["probation_memory"]
        assert pm["previous_warm"] is False
        assert pm["reason"].startswith("memory budget: wine v3")
        assert pm["fell_back"].startswith("wine v1 (") and pm["fell_back"].endswith("reloaded from disk")
        assert "v1" in st["current"]
        # The state says rolled_back when the fall back is decided; with no room for two, v1 is
        # then reloaded from disk after v3 is unloaded, and answers a moment later.
        wait_for("v1 to serve again", lambda: served_version(agent) == "1", agent=agent)
        # the candidate's own errors on probation, and 503s while it loaded with v1 unloaded
        assert all(f.startswith(("500", "503")) for f in traffic.failures), traffic.failures[:3]
        mem = memory(agent)
        assert mem["used_mb"] <= limit and mem["refused"] == 0
        assert [(v["model"], v["version"]) for v in mem["versions"]] == [("wine", 1)]
    finally:
        agent.kill()
