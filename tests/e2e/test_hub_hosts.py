"""Two hub hosts: two `outpost-hub serve` processes with SEPARATE data directories on one
PostgreSQL and one S3 bucket (moto's server), the repository kept in the bucket
(`tuf_state = "s3"`, issue 8).

The second host is made the way an operator would: no `init` (that is done once, for the
database and the root), a data directory holding the first host's hub.toml and online keys;
at start it joins the bucket's repository. A host whose keys are not the repository's (its own
`init`) refuses to start and publishes nothing. What must hold: pushes and deploys made at the same time
through both hosts all land; every metadata version handed out is handed out once, and the
bucket's repository verifies with python-tuf from the first host's root, naming every group's
latest assignment; a deploy made through one host is served by the other's /tuf/ within the
sync interval."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from tuf.api.metadata import Metadata, Snapshot, Targets, Timestamp

from agent.config import HubConfig
from agent.update.canary import Assignment
from agent.update.tuf_client import UpdateClient
from tests.support.hubproc import HUB_BIN, HubProcess
from tests.support.packages import fast_wine_versions
from tests.support.postgres import PostgresServer
from tests.support.s3server import S3Server, running_s3
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

BUCKET = "outpost-hosts"
PREFIX = "fleet/"
SYNC_S = 1.0
GROUPS = [f"g{i}" for i in range(6)]


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[S3Server]:
    with running_s3(tmp_path / "moto.log", BUCKET) as server:
        server.allow_anonymous_reads(BUCKET, f"{PREFIX}tuf/")  # what a CDN origin needs
        yield server


def verified_stable(url: str, root: Path, group: str, where: Path) -> int | None:
    """The stable version of `group` as a device verifies it from `url`/tuf/ (from `root`)."""
    shutil.rmtree(where / group, ignore_errors=True)
    client = UpdateClient(
        HubConfig(url=url, trusted_root=str(root)), group, where / group / "meta", where / group / "targets"
    )
    try:
        signed = client.check()
    finally:
        client.close()
    return None if signed is None else Assignment.parse(signed.document, group=group).stable.version


def second_host(a: HubProcess, data: Path) -> HubProcess:
    """Another host of `a`'s hub: its hub.toml and online keys (never the offline ones), and
    the operator token only because HubProcess reads it from the directory."""
    (data / "keys").mkdir(parents=True, mode=0o700)
    shutil.copytree(a.data / "keys" / "online", data / "keys" / "online")
    for name in ("hub.toml", "operator.token"):
        shutil.copy2(a.data / name, data / name)
    # HubProcess reads the root to trust from here; the hub replaces it with the bucket's.
    (data / "tuf" / "metadata").mkdir(parents=True)
    shutil.copy2(a.data / "tuf" / "metadata" / "root.json", data / "tuf" / "metadata" / "root.json")
    return HubProcess(data, init=False)


def bucket_metadata(s3: S3Server, prefix: str = PREFIX) -> dict[str, bytes]:
    objects = s3.objects(BUCKET, f"{prefix}tuf/metadata/")
    return {k.rsplit("/", 1)[-1]: v for k, v in objects.items()}


def test_two_hosts_sign_in_turn_on_one_bucket(tmp_path: Path, postgres: PostgresServer, s3: S3Server) -> None:
    url = postgres.fresh_url()
    shared = {
        "blob_store": "s3",
        "tuf_publish": "s3",
        "tuf_state": "s3",
        "s3_bucket": BUCKET,
        "s3_prefix": PREFIX,
        "s3_endpoint_url": s3.url,
        "tuf_sync_interval_s": SYNC_S,
    }
    a = HubProcess(tmp_path / "host-a", database_url=url, settings=shared)
    b = second_host(a, tmp_path / "host-b")
    root = tmp_path / "root.json"
    root.write_bytes(a.root)
    static = f"{s3.url}/{BUCKET}/{PREFIX}".rstrip("/")
    try:
        a.start()
        b.start()  # joins the repository A published to the bucket
        assert (b.data / "tuf" / "metadata" / "1.root.json").read_bytes() == a.root
        tars = fast_wine_versions(tmp_path / "wine", versions=(1, 2))
        handed_out: list[tuple[str, int]] = []  # (role, version) of every signature returned

        def push(hub: HubProcess, version: int) -> None:
            with tars[version].open("rb") as f:
                resp = hub.api("POST", "/api/v1/models/wine/versions", data=f)
            assert resp.status_code == 201, resp.text
            handed_out.append(("models", resp.json()["models_metadata_version"]))

        def deploy(i: int, stable: int) -> None:
            hub = (a, b)[i % 2]
            resp = hub.api(
                "PUT", f"/api/v1/groups/{GROUPS[i]}/deployment", json={"model": "wine", "stable": stable}
            )
            assert resp.status_code == 200, resp.text
            handed_out.append((f"group-{GROUPS[i]}", resp.json()["metadata_version"]))

        push(a, 1)
        # A push through B while both sign deploys; then the other groups through both at once.
        with ThreadPoolExecutor(4) as pool:
            jobs = [pool.submit(push, b, 2)] + [pool.submit(deploy, i, 1) for i in range(0, 6, 2)]
            for job in jobs:
                job.result()
        with ThreadPoolExecutor(6) as pool:
            jobs = [pool.submit(deploy, i, 2) for i in range(1, 6, 2)]
            jobs += [pool.submit(deploy, i, 2) for i in range(0, 6, 2)]  # re-deploys: new versions
            for job in jobs:
                job.result()
        repeated = [k for k, n in Counter(handed_out).items() if n > 1]
        assert repeated == [], f"metadata versions handed out twice: {repeated}"

        # The bucket: contiguous snapshot versions whose role versions never go back, every one
        # naming files that hold the version and length it says (a version signed twice with
        # other content would break that), and the latest verified by a device from the root.
        meta = bucket_metadata(s3)
        snapshots = sorted(int(n.split(".")[0]) for n in meta if n.endswith(".snapshot.json"))
        assert snapshots == list(range(1, snapshots[-1] + 1)), snapshots
        previous: dict[str, int] = {}
        for v in snapshots:
            snap = Metadata[Snapshot].from_bytes(meta[f"{v}.snapshot.json"]).signed
            for name, m in snap.meta.items():
                assert m.version >= previous.get(name, 0), (v, name)
                data = meta[f"{m.version}.{name}"]
                assert Metadata[Targets].from_bytes(data).signed.version == m.version
                assert m.length in (None, len(data)), (v, name)
            previous = {n: m.version for n, m in snap.meta.items()}
        timestamp = Metadata[Timestamp].from_bytes(meta["timestamp.json"]).signed
        assert timestamp.snapshot_meta.version == snapshots[-1]
        for role, version in handed_out:
            assert previous[f"{role}.json"] >= version
        for group in GROUPS:
            assert verified_stable(static, root, group, tmp_path / "bucket-device") == 2

        # Both hosts' /tuf/ serve the bucket's state, and a deploy through A reaches B's /tuf/
        # within the sync interval.
        for hub in (a, b):
            wait_for(
                "the host's /tuf/ to serve the bucket's timestamp",
                lambda hub=hub: (
                    hub.api("GET", "/tuf/metadata/timestamp.json", auth=False).content
                    == meta["timestamp.json"]
                ),
                timeout=10,
            )
        resp = a.api("PUT", "/api/v1/groups/g1/deployment", json={"model": "wine", "stable": 1})
        assert resp.status_code == 200, resp.text
        deployed = time.monotonic()
        wait_for(
            "B's /tuf/ to serve A's deploy",
            lambda: verified_stable(b.url, root, "g1", tmp_path / "b-device") == 1,
            timeout=30,
        )
        lag = time.monotonic() - deployed
        assert lag < SYNC_S + 2.0, f"B served A's deploy after {lag:.1f}s (sync interval {SYNC_S}s)"
        # B signs on top of it (it pulled A's state under the lock), and A's /tuf/ follows.
        resp = b.api("POST", "/api/v1/groups/g1/rollback", json={"model": "wine"})
        assert resp.status_code == 200, resp.text
        wait_for(
            "A's /tuf/ to serve B's rollback",
            lambda: verified_stable(a.url, root, "g1", tmp_path / "a-device") == 2,
            timeout=30,
        )
    finally:
        for hub in (a, b):
            hub.kill()


def test_a_host_with_other_online_keys_does_not_start(
    tmp_path: Path, postgres: PostgresServer, s3: S3Server
) -> None:
    url = postgres.fresh_url()
    settings: dict[str, Any] = {
        "tuf_publish": "s3",
        "tuf_state": "s3",
        "s3_bucket": BUCKET,
        "s3_prefix": "keys-test/",
        "s3_endpoint_url": s3.url,
    }
    a = HubProcess(tmp_path / "host-a", database_url=url, settings=settings)
    # `outpost-hub init` on host B (on a database of its own: the shared one has its operator
    # token already) made keys and a root of its own; then pointed at the shared database.
    b = HubProcess(tmp_path / "host-b", settings={**settings, "database_url": url})
    try:
        a.start()
        with pytest.raises(AssertionError, match="hub exited"):
            b.start()
        assert "copy the online keys" in b.log()
        # It did not publish its own root over A's.
        published = s3.objects(BUCKET, "keys-test/tuf/metadata/1.root.json")
        assert list(published.values()) == [a.root]
    finally:
        for hub in (a, b):
            hub.kill()


def test_a_key_rotated_on_one_host_reaches_the_others(
    tmp_path: Path, postgres: PostgresServer, s3: S3Server
) -> None:
    """`outpost-hub keys rotate` on host B while A serves: signed under the hosts' lock on the
    bucket's state and published at once. A follows the new root at its next sync, refuses to
    sign until it has the new key file (nothing published meanwhile), then signs with it; a
    device that trusts only the first root walks to the new one."""
    url = postgres.fresh_url()
    settings: dict[str, Any] = {
        "tuf_publish": "s3",
        "tuf_state": "s3",
        "s3_bucket": BUCKET,
        "s3_prefix": "rotate/",
        "s3_endpoint_url": s3.url,
        "tuf_sync_interval_s": SYNC_S,
    }
    a = HubProcess(tmp_path / "host-a", database_url=url, settings=settings)
    b = second_host(a, tmp_path / "host-b")
    root = tmp_path / "root.json"
    root.write_bytes(a.root)
    try:
        a.start()
        b.start()
        tars = fast_wine_versions(tmp_path / "wine", versions=(1,))
        with tars[1].open("rb") as f:
            assert a.api("POST", "/api/v1/models/wine/versions", data=f).status_code == 201
        first = a.api("PUT", "/api/v1/groups/g0/deployment", json={"model": "wine", "stable": 1})
        assert first.status_code == 200, first.text
        # An operator's offline work on B: the new root is signed by the root key, brought for it.
        b.stop()
        shutil.copytree(a.data / "keys" / "offline", b.data / "keys" / "offline")
        done = subprocess.run(
            [HUB_BIN, "keys", "rotate", "snapshot", "--data", str(b.data)], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        assert "2.root.json" in bucket_metadata(s3, "rotate/")
        # A runs on: its /tuf/ follows the bucket, but its snapshot key is the retired one.
        wait_for(
            "A's /tuf/ to serve the new root",
            lambda: a.api("GET", "/tuf/metadata/2.root.json", auth=False).status_code == 200,
            timeout=10,
        )
        before = bucket_metadata(s3, "rotate/")["timestamp.json"]
        refused = a.api("PUT", "/api/v1/groups/g1/deployment", json={"model": "wine", "stable": 1})
        assert refused.status_code >= 500, refused.text
        assert bucket_metadata(s3, "rotate/")["timestamp.json"] == before
        shutil.copy2(b.data / "keys" / "online" / "snapshot.pem", a.data / "keys" / "online" / "snapshot.pem")
        resp = a.api("PUT", "/api/v1/groups/g1/deployment", json={"model": "wine", "stable": 1})
        assert resp.status_code == 200, resp.text
        s3.allow_anonymous_reads(BUCKET, "rotate/tuf/")
        for where in (f"{s3.url}/{BUCKET}/rotate", a.url):
            for group in ("g0", "g1"):
                assert verified_stable(where, root, group, tmp_path / "device") == 1
    finally:
        for hub in (a, b):
            hub.kill()
