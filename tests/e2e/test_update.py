"""End to end: the real hub process and the real agent; the agent pulls signed versions,
tries each on probation, commits it or falls back by itself."""

from __future__ import annotations

import json
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.support.agentproc import AgentProcess
from tests.support.hubproc import HubProcess
from tests.support.packages import FAST_PROBATION, fast_wine_versions

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def wine(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Versions 1-3 of the example model, with a probation short enough for a test."""
    out = tmp_path_factory.mktemp("wine")
    return fast_wine_versions(out)


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubProcess]:
    process = HubProcess(tmp_path / "hub").start()
    yield process
    process.kill()


def device(tmp_path: Path, hub: HubProcess, name: str = "dev-001", group: str = "lab") -> AgentProcess:
    root_file = tmp_path / f"{name}-root.json"
    root_file.write_bytes(hub.root)
    return AgentProcess(
        tmp_path / name,
        extra={
            "device_id": name,
            "group": group,
            "hub": {"url": hub.url, "trusted_root": str(root_file), "poll_interval_s": 0.3},
        },
    )


def wait_for(
    what: str, predicate: Callable[[], bool], timeout: float = 60.0, agent: AgentProcess | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    detail = ""
    if agent is not None:
        detail = f": {json.dumps(update_status(agent), indent=1)[-3000:]}"
    raise AssertionError(f"timed out waiting for {what}{detail}")


def update_status(agent: AgentProcess) -> dict[str, Any]:
    status: dict[str, Any] = agent.json("GET", "/v1/status")[1]["update"]
    return status


def committed_device(
    tmp_path: Path, hub: HubProcess, wine: dict[int, Path], push: tuple[int, ...] = (1,)
) -> AgentProcess:
    """Push `push`, deploy v1 to group lab, start a device and wait until v1 is committed
    (probation needs answers: some traffic runs meanwhile). The caller kills the agent."""
    for version in push:
        hub.outpost("push", str(wine[version]), "--quiet")
    hub.outpost("deploy", "wine", "1", "--group", "lab")
    agent = device(tmp_path, hub)
    agent.start(wait_ready=False)
    try:
        wait_for("v1 to serve", lambda: served_version(agent) == "1")
        with Traffic(agent):
            wait_for("v1 committed", lambda: update_status(agent)["state"] == "committed", agent=agent)
    except BaseException:
        agent.kill()
        raise
    return agent


def x_doc(n: int = 1) -> dict[str, Any]:
    rows = np.random.default_rng(0).normal(size=(n, 13)).astype(np.float32) * 10 + 50
    return {"inputs": [{"name": "input", "shape": [n, 13], "datatype": "FP32", "data": rows.tolist()}]}


def served_version(agent: AgentProcess) -> str | None:
    status, doc = agent.json("POST", "/v2/models/wine/infer", x_doc())
    return doc["model_version"] if status == 200 else None


class Traffic:
    """Clients that keep asking for predictions and record every failure."""

    def __init__(
        self,
        agent: AgentProcess,
        clients: int = 4,
        path: str = "/v2/models/wine/infer",
        doc: Callable[[], dict[str, Any]] = x_doc,
    ) -> None:
        self.agent, self.path, self.doc = agent, path, doc
        self.failures: list[str] = []
        self.answers = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                status, doc = self.agent.json("POST", self.path, self.doc())
            except OSError as exc:
                self.failures.append(repr(exc))
                continue
            if status != 200:
                self.failures.append(f"{status} {doc}")
            self.answers += 1

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)


def test_deploy_update_commit_and_hub_rollback(
    tmp_path: Path, hub: HubProcess, wine: dict[int, Path]
) -> None:
    for version in (1, 2):
        hub.outpost("push", str(wine[version]), "--quiet")
    hub.outpost("deploy", "wine", "1", "--group", "lab")
    agent = device(tmp_path, hub)
    agent.start(wait_ready=False)
    try:
        wait_for("v1 to serve", lambda: served_version(agent) == "1")
        with Traffic(agent, clients=16) as traffic:
            # The first version too is on probation until it has shown enough answers.
            wait_for("v1 committed", lambda: update_status(agent)["state"] == "committed")
            hub.outpost("deploy", "wine", "2", "--group", "lab")
            wait_for("v2 on probation", lambda: update_status(agent)["state"] in ("probation", "committed"))
            wait_for(
                "v2 committed",
                lambda: (
                    update_status(agent)["state"] == "committed"
                    and "v2" in (update_status(agent)["current"] or "")
                ),
            )
            assert served_version(agent) == "2"
            hub.outpost("rollback", "wine", "--group", "lab")
            wait_for("hub rollback to v1", lambda: served_version(agent) == "1")
        assert traffic.failures == []
        assert traffic.answers > 20
        events = [e["event"] for e in update_status(agent)["events"]]
        assert "probation_passed" in events and "hub_rollback" in events
        metrics = agent.request("GET", "/metrics")[2].decode()
        assert 'outpost_update_transitions_total{event="probation_passed"} 2.0' in metrics
        assert 'outpost_update_state{state="rolled_back"} 1.0' in metrics
        assert agent.stop() == 0
    finally:
        agent.kill()


def _sign_directly(hub: HubProcess, name: str, version: int, files: dict[str, bytes]) -> None:
    """Sign a version without the registry's validation (a model the hub would refuse, as a
    device with another onnxruntime might see it), then assign it through a forged deployment."""
    from hub.settings import load_settings
    from hub.signing import KeyStore, SignedRepository

    settings = load_settings(hub.data)
    repo = SignedRepository(
        settings.tuf_dir, KeyStore(settings.online_keys, settings.offline_keys), settings.expiry_policy()
    )
    repo.add_model_version(name, version, files)


def _assign(hub: HubProcess, group: str, doc: dict[str, Any]) -> None:
    from hub.registry.deployments import canonical_json
    from hub.settings import load_settings
    from hub.signing import KeyStore, SignedRepository

    settings = load_settings(hub.data)
    repo = SignedRepository(
        settings.tuf_dir, KeyStore(settings.online_keys, settings.offline_keys), settings.expiry_policy()
    )
    repo.set_assignment(group, canonical_json(doc))


def _version_doc(files: dict[str, bytes], name: str, version: int) -> dict[str, Any]:
    import hashlib

    return {
        "version": version,
        "manifest": f"models/{name}/{version}/manifest.json",
        "model": f"models/{name}/{version}/model.onnx",
        "sha256": hashlib.sha256(files["model.onnx"]).hexdigest(),
        "manifest_sha256": hashlib.sha256(files["manifest.json"]).hexdigest(),
    }


def _files(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]


def _broken(files: dict[str, bytes], kind: str) -> dict[str, bytes]:
    import hashlib

    manifest = json.loads(files["manifest.json"])
    model = files["model.onnx"]
    manifest["version"] = 3
    if kind == "load-fails":
        model = b"\x08\x07" + b"not an onnx graph" * 20
    elif kind == "self-test-fails":
        manifest["self_test"]["outputs"][1]["data"] = [
            (v + 0.5) for v in manifest["self_test"]["outputs"][1]["data"]
        ]
    manifest["model"] = {**manifest["model"], "sha256": hashlib.sha256(model).hexdigest(), "size": len(model)}
    return {"manifest.json": json.dumps(manifest).encode(), "model.onnx": model}


@pytest.mark.parametrize("kind", ["load-fails", "self-test-fails"])
def test_a_broken_version_falls_back_by_itself_and_is_not_retried(
    tmp_path: Path, hub: HubProcess, wine: dict[int, Path], kind: str
) -> None:
    bad = _broken(_files(wine[3]), kind)
    _sign_directly(hub, "wine", 3, bad)
    agent = committed_device(tmp_path, hub, wine)
    try:
        doc = {
            "format": "outpost-assignment/1",
            "group": "lab",
            "model": "wine",
            "serial": 1000,
            "stable": _version_doc(bad, "wine", 3),
            "candidate": None,
            "percent": 0,
            "salt": "s",
            "created": "2026-11-27T00:00:00Z",
        }
        with Traffic(agent) as traffic:
            _assign(hub, "lab", doc)
            wait_for("the fall back", lambda: update_status(agent)["state"] == "rolled_back")
            time.sleep(1.5)  # several more polls: the bad version must not be tried again
        st = update_status(agent)
        assert "v1" in st["current"]
        assert served_version(agent) == "1"
        assert traffic.failures == []
        falls = [e for e in st["events"] if e["event"] == "load_failed"]
        assert len(falls) == 1, st["events"]
        assert falls[0]["reason"]
    finally:
        agent.kill()


@pytest.mark.parametrize(("variant", "reason"), [("slow", "latency"), ("failing", "error rate")])
def test_a_version_failing_probation_falls_back(
    tmp_path: Path, hub: HubProcess, wine: dict[int, Path], variant: str, reason: str
) -> None:
    from examples.broken_versions import make_failing_variant, make_slow_variant

    hub.outpost("push", str(wine[1]), "--quiet")
    hub.outpost("deploy", "wine", "1", "--group", "lab")
    unpacked = tmp_path / "wine-1"
    unpacked.mkdir()
    with tarfile.open(wine[1]) as tar:
        for member in tar.getmembers():
            (unpacked / member.name).write_bytes(tar.extractfile(member).read())  # type: ignore[union-attr]
    manifest = json.loads((unpacked / "manifest.json").read_text())
    manifest["probation"] = {**FAST_PROBATION, "max_latency_ratio": 2.0}
    (unpacked / "manifest.json").write_text(json.dumps(manifest))
    make = make_slow_variant if variant == "slow" else make_failing_variant
    broken = make(unpacked, tmp_path, 3)
    agent = device(tmp_path, hub)
    agent.start(wait_ready=False)
    try:
        wait_for("v1 to serve", lambda: served_version(agent) == "1")
        with Traffic(agent) as traffic:
            wait_for("v1 committed", lambda: update_status(agent)["state"] == "committed")
            hub.outpost("push", str(broken), "--quiet")  # the hub accepts it: its self-test passes
            hub.outpost("deploy", "wine", "3", "--group", "lab")
            wait_for("the fall back", lambda: update_status(agent)["state"] == "rolled_back")
        st = update_status(agent)
        failed = [e for e in st["events"] if e["event"] == "probation_failed"]
        assert failed and reason in failed[0]["reason"], st["events"]
        assert "v1" in st["current"]
        assert served_version(agent) == "1"
        if variant == "slow":
            assert traffic.failures == []
        else:  # the failing version's own errors, while it was on probation, and nothing else
            assert all(f.startswith("500") for f in traffic.failures), traffic.failures[:3]
    finally:
        agent.kill()


def _ref(archive: Path) -> dict[str, Any]:
    import hashlib

    files = _files(archive)
    manifest = json.loads(files["manifest.json"])
    return {
        "model": "wine",
        "version": manifest["version"],
        "sha256": hashlib.sha256(files["model.onnx"]).hexdigest(),
    }


@pytest.mark.parametrize("state", ["downloading", "verifying", "staged", "probation"])
def test_power_loss_in_each_state_resumes_to_a_verified_version(
    tmp_path: Path, hub: HubProcess, wine: dict[int, Path], state: str
) -> None:
    """The record is saved before each step's side effects, so a power cut in state X leaves a
    record saying X (and maybe half-written files). Started on that, the agent must finish."""
    hub.outpost("push", str(wine[1]), "--quiet")
    hub.outpost("deploy", "wine", "1", "--group", "lab")
    agent = device(tmp_path, hub)
    record = {
        "format": "outpost-update-state/1",
        "state": state,
        "pending": _ref(wine[1]),
        "current": None,
        "previous": None,
        "attempts": 1 if state in ("staged", "probation") else 0,
        "retries": 0,
        "bad": [],
        "assigned": _ref(wine[1]),
        "assignment_serial": None,
        "reason": "power cut",
    }
    agent.data_dir.mkdir(parents=True, exist_ok=True)
    if state in ("staged", "probation"):
        agent.install(wine[1])  # the runner installs while verifying: by staged, it is on disk
    (agent.data_dir / "update-state.json").write_text(json.dumps(record))
    half = agent.data_dir / "staging" / "downloads" / ".outpost-fetch-x"
    half.mkdir(parents=True)
    (half / "model.onnx").write_bytes(b"\x08half a model")  # a partial download must never load
    agent.start(wait_ready=False)
    try:
        with Traffic(agent) as traffic:
            wait_for("v1 committed", lambda: update_status(agent)["state"] == "committed", 60, agent)
        assert served_version(agent) == "1"
        assert not half.exists()
        # Before its first hub version a fresh device has no model: 404 (unknown) or 503 only.
        assert all(f.startswith(("404", "503")) for f in traffic.failures), traffic.failures[:3]
    finally:
        agent.kill()


def test_kill_9_during_probation_and_a_crash_loop_falls_back(
    tmp_path: Path, hub: HubProcess, wine: dict[int, Path]
) -> None:
    agent = committed_device(tmp_path, hub, wine, push=(1, 2))
    try:
        hub.outpost("deploy", "wine", "2", "--group", "lab")
        for attempt in range(1, 4):  # no traffic: v2 stays on probation until killed
            # Wait for this run's own load of v2 (attempt n), not the state a restart reads back.
            wait_for(
                f"v2 on probation (attempt {attempt})",
                lambda n=attempt: (
                    (st := update_status(agent))["state"] == "probation" and st["attempts"] == n
                ),
                agent=agent,
            )
            agent.kill()  # SIGKILL: nothing cleaned up
            agent.start(wait_ready=False)
            assert served_version(agent) in ("1", "2")  # always a verified version
        wait_for(
            "the crash loop to fall back", lambda: update_status(agent)["state"] == "rolled_back", 60, agent
        )
        st = update_status(agent)
        assert "v1" in st["current"]
        assert any(e["event"] == "crash_loop" for e in st["events"]), st["events"]
        assert served_version(agent) == "1"
    finally:
        agent.kill()


def test_canary_routes_the_devices_in_its_buckets(
    tmp_path: Path, hub: HubProcess, wine: dict[int, Path]
) -> None:
    from agent.update.canary import bucket

    for version in (1, 2):
        hub.outpost("push", str(wine[version]), "--quiet")
    result = hub.outpost("deploy", "wine", "1", "--group", "lab", "--canary", "2", "--percent", "50")
    assert "canary v2 at 50%" in result.stdout
    salt = hub.api("GET", "/api/v1/groups/lab").json()["current"]["salt"]
    # The salt is random: pick three ids on each side of the split, so both are exercised.
    candidates = [f"dev-{i:03d}" for i in range(200)]
    inside = [n for n in candidates if bucket(salt, n) < 50][:3]
    outside = [n for n in candidates if bucket(salt, n) >= 50][:3]
    names = inside + outside
    expected = {n: "2" if n in inside else "1" for n in names}
    agents = [device(tmp_path, hub, name=n) for n in names]
    try:
        for a in agents:
            a.start(wait_ready=False)
        for a, n in zip(agents, names, strict=True):
            wait_for(f"{n} to serve", lambda a=a: served_version(a) is not None)
            assert served_version(a) == expected[n], (n, update_status(a))
            assert update_status(a)["canary"]["role"] == ("candidate" if expected[n] == "2" else "stable")
    finally:
        for a in agents:
            a.kill()


def test_tampered_download_is_refused_and_a_dead_hub_changes_nothing(
    tmp_path: Path, hub: HubProcess, wine: dict[int, Path]
) -> None:
    agent = committed_device(tmp_path, hub, wine, push=(1, 2, 3))
    try:
        with Traffic(agent) as traffic:
            # A mirror (here: the hub's own disk) serves altered bytes for v2's model.
            target = next((hub.data / "tuf" / "targets" / "models" / "wine" / "2").glob("*.model.onnx"))
            original = target.read_bytes()
            target.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))
            hub.outpost("deploy", "wine", "2", "--group", "lab")
            wait_for(
                "the refusal",
                lambda: any(e["event"] == "download_failed" for e in update_status(agent)["events"]),
                agent=agent,
            )
            refusal = next(e for e in update_status(agent)["events"] if e["event"] == "download_failed")
            assert "hash" in refusal["reason"].lower() or "length" in refusal["reason"].lower()
            assert served_version(agent) == "1"
            assert not (agent.data_dir / "models" / "wine" / "2").exists()  # nothing installed
            target.write_bytes(original)
            # The hub goes away: the device keeps serving what it verified and says why.
            hub.kill()
            agent.request("POST", "/v1/update")
            wait_for(
                "the failed check", lambda: update_status(agent)["last_check"]["ok"] is False, agent=agent
            )
            assert "hub" in update_status(agent)["last_check"]["error"].lower()
            assert served_version(agent) == "1"
        assert traffic.failures == []
    finally:
        agent.kill()


def test_only_the_current_and_previous_versions_stay_on_disk(
    tmp_path: Path, hub: HubProcess, wine: dict[int, Path]
) -> None:
    agent = committed_device(tmp_path, hub, wine, push=(1, 2, 3))
    try:
        with Traffic(agent):
            for version in (2, 3):
                hub.outpost("deploy", "wine", str(version), "--group", "lab")
                wait_for(
                    f"v{version} committed",
                    lambda v=version: (
                        update_status(agent)["state"] == "committed"
                        and f"v{v} " in (update_status(agent)["current"] or "")
                    ),
                    agent=agent,
                )

        # The record says committed before its actions (the clean-up among them) run: wait for them.
        def on_disk() -> list[str]:
            return sorted(p.name for p in (agent.data_dir / "models" / "wine").iterdir())

        wait_for("the clean-up after the commit", lambda: on_disk() == ["2", "3"], agent=agent)
    finally:
        agent.kill()
