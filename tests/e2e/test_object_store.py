"""End to end on an S3-compatible object store: the real hub process keeps its package blobs in
a bucket of a real S3 server on loopback (moto's) and publishes its TUF repository there; a real
agent then updates from the bucket alone, with the hub stopped, like a device behind a CDN, and
refuses bytes altered in the bucket."""

from __future__ import annotations

import hashlib
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from tuf.ngclient import Updater

from tests.e2e.test_update import served_version, update_status, wait_for
from tests.support.agentproc import AgentProcess
from tests.support.hubproc import HubProcess, free_port
from tests.support.packages import fast_wine_versions
from tests.support.s3server import S3Server, running_s3

pytestmark = pytest.mark.e2e

BUCKET = "outpost-e2e"
PREFIX = "fleet-a/"


@pytest.fixture(scope="module")
def wine(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    return fast_wine_versions(tmp_path_factory.mktemp("wine"), versions=(1, 2))


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with running_s3(tmp_path_factory.mktemp("s3") / "moto.log", BUCKET) as server:
        yield server


@pytest.fixture(scope="module")
def hub(
    tmp_path_factory: pytest.TempPathFactory, s3: S3Server, wine: dict[int, Path]
) -> Iterator[HubProcess]:
    """A hub on the bucket with wine v1 deployed to `lab` and v2 to `tampered`, then stopped:
    the devices below have only the bucket."""
    process = HubProcess(
        tmp_path_factory.mktemp("hub") / "data",
        settings={
            "blob_store": "s3",
            "tuf_publish": "s3",
            "s3_bucket": BUCKET,
            "s3_prefix": PREFIX,
            "s3_endpoint_url": s3.url,
        },
    ).start()
    try:
        for version in (1, 2):
            process.outpost("push", str(wine[version]), "--quiet")
        process.outpost("deploy", "wine", "1", "--group", "lab")
        process.outpost("deploy", "wine", "2", "--group", "tampered")
        yield process
    finally:
        process.kill()


def _model_bytes(package: Path) -> bytes:
    with tarfile.open(package) as tar:
        member = tar.extractfile("model.onnx")
        assert member is not None
        return member.read()


def _repo_tree(data: Path) -> dict[str, bytes]:
    base = data / "tuf"
    return {
        p.relative_to(base).as_posix(): p.read_bytes()
        for top in ("metadata", "targets")
        for p in (base / top).rglob("*")
        if p.is_file()
    }


def test_blobs_land_in_the_bucket_and_the_hub_serves_downloads(
    hub: HubProcess, s3: S3Server, wine: dict[int, Path], tmp_path: Path
) -> None:
    info = hub.api("GET", "/api/v1/models/wine/versions/1").json()
    model = _model_bytes(wine[1])
    digest = info["model_sha256"]
    assert digest == hashlib.sha256(model).hexdigest()
    objects = s3.objects(BUCKET, f"{PREFIX}blobs/")
    assert objects[f"{PREFIX}blobs/{digest[:2]}/{digest}"] == model  # content-addressed
    assert len(objects) == 4  # manifest and model of two versions
    assert not any(p.is_file() for p in (hub.data / "blobs").rglob("*"))  # nothing on the disk

    # Devices that talk to the hub still download through it (its own /tuf/).
    cache = tmp_path / "client"
    (cache / "metadata").mkdir(parents=True)
    (cache / "targets").mkdir()
    u = Updater(
        str(cache / "metadata"),
        f"{hub.url}/tuf/metadata/",
        str(cache / "targets"),
        f"{hub.url}/tuf/targets/",
        bootstrap=hub.root,
    )
    u.refresh()
    target = u.get_targetinfo("models/wine/1/model.onnx")
    assert target is not None
    assert Path(u.download_target(target)).read_bytes() == model

    # The bucket holds the same repository as the hub's directory.
    published = s3.objects(BUCKET, f"{PREFIX}tuf/")
    assert {k.removeprefix(f"{PREFIX}tuf/"): v for k, v in published.items()} == _repo_tree(hub.data)


@pytest.fixture(scope="module")
def static_host(hub: HubProcess, s3: S3Server) -> str:
    """The published tree opened to anonymous readers (what a CDN origin needs), the hub gone."""
    s3.allow_anonymous_reads(BUCKET, f"{PREFIX}tuf/")
    hub.stop()
    return f"{s3.url}/{BUCKET}/{PREFIX}".rstrip("/")


def _device(tmp_path: Path, hub: HubProcess, url: str, group: str) -> AgentProcess:
    root_file = tmp_path / "root.json"
    root_file.write_bytes(hub.root)
    return AgentProcess(
        tmp_path / "device",
        extra={
            "device_id": f"dev-{group}",
            "group": group,
            "hub": {"url": url, "trusted_root": str(root_file), "poll_interval_s": 0.3},
        },
    )


def test_a_device_updates_from_the_published_files_alone(
    hub: HubProcess, static_host: str, tmp_path: Path
) -> None:
    assert hub.proc is not None and hub.proc.poll() is not None  # no hub to ask
    agent = _device(tmp_path, hub, static_host, "lab")
    agent.start(wait_ready=False)
    try:
        wait_for("v1 from the bucket", lambda: served_version(agent) == "1", agent=agent)
        assert update_status(agent)["last_check"]["ok"] is True
    finally:
        agent.kill()


def test_bytes_altered_in_the_bucket_are_refused(
    hub: HubProcess, s3: S3Server, static_host: str, tmp_path: Path
) -> None:
    client = s3.client()
    listing = client.list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}tuf/targets/models/wine/2/")
    key = next(o["Key"] for o in listing["Contents"] if o["Key"].endswith(".model.onnx"))
    original = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    client.put_object(Bucket=BUCKET, Key=key, Body=original[:-1] + bytes([original[-1] ^ 0xFF]))
    agent = _device(tmp_path, hub, static_host, "tampered")
    agent.start(wait_ready=False)
    try:
        wait_for(
            "the refusal",
            lambda: any(e["event"] == "download_failed" for e in update_status(agent)["events"]),
            agent=agent,
        )
        refusal = next(e for e in update_status(agent)["events"] if e["event"] == "download_failed")
        assert "hash" in refusal["reason"].lower() or "length" in refusal["reason"].lower()
        assert served_version(agent) is None  # nothing it could verify, nothing served
        assert not (agent.data_dir / "models" / "wine" / "2").exists()
    finally:
        agent.kill()
        client.put_object(Bucket=BUCKET, Key=key, Body=original)


def test_a_hub_whose_bucket_cannot_be_reached_says_so_and_does_not_start(
    tmp_path: Path, s3: S3Server
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    process = HubProcess(
        tmp_path / "data", settings={"blob_store": "s3", "s3_bucket": BUCKET, "s3_endpoint_url": dead}
    )
    with pytest.raises(AssertionError, match="hub exited"):
        process.start()
    assert f"outpost-hub: error: cannot reach the bucket s3://{BUCKET}/ at {dead}" in process.log()
