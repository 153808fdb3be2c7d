"""The TUF repository kept in the object store (`tuf_state = "s3"`, issue 8): hub processes on
different hosts, each with its own directory, sign in turn on the bucket's state.

Hosts here are SignedRepository objects with their own directories and copies of the online
keys over one bucket: an in-memory one that checks after every write that a reader never sees a
dangling reference, and moto's real S3 server for the adapter. What must hold: every host signs
on what any host published last (versions strictly increase, a published file is never
replaced), a publish that fails undoes the operation, the bucket's copy wins over a directory's,
a second host joins instead of making a second root, a bucket that does not verify is refused,
and, on PostgreSQL, an advisory lock serialises the hosts and a lost lock publishes nothing."""

from __future__ import annotations

import hashlib
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote

import pytest
from sqlalchemy import create_engine, text
from tuf.api.exceptions import DownloadHTTPError
from tuf.api.metadata import Metadata, Timestamp
from tuf.ngclient import Updater
from tuf.ngclient.fetcher import FetcherInterface

from hub.errors import (
    KeyMismatchError,
    NotFoundError,
    ObjectStoreError,
    RepositoryStateError,
    SigningError,
    SigningLockError,
)
from hub.objectstore.s3 import S3Bucket, S3Location
from hub.settings import HubSettings, SettingsError
from hub.signing import KeyStore, SignedRepository
from hub.signing.lock import AdvisoryLock, FileLock
from hub.signing.mirror import Mirror, plan_sync
from hub.signing.publish import Publisher
from tests.support.s3server import S3Server, running_s3

WINE = {"manifest.json": b'{"name": "wine"}', "model.onnx": b"onnx-wine" * 40}

# -- the plan (pure) --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("local", "remote", "fetch", "remove"),
    [
        ({}, {"metadata/1.root.json": "a", "metadata/timestamp.json": "t"}, ("metadata/1.root.json",), ()),
        ({"metadata/2.models.json": "a"}, {"metadata/2.models.json": "a"}, (), ()),
        ({"metadata/2.models.json": "x"}, {"metadata/2.models.json": "a"}, ("metadata/2.models.json",), ()),
        ({"targets/m/ab.f": None}, {"targets/m/ab.f": "multipart-2"}, (), ()),
        ({"metadata/3.snapshot.json": "a"}, {}, (), ("metadata/3.snapshot.json",)),
        ({"metadata/timestamp.json": "x"}, {"metadata/timestamp.json": "y"}, (), ()),
        (
            {},
            {"metadata/2.snapshot.json": "s", "metadata/2.root.json": "r", "targets/g/x.a": "t",
             "metadata/3.models.json": "m"},
            ("targets/g/x.a", "metadata/2.root.json", "metadata/3.models.json", "metadata/2.snapshot.json"),
            (),
        ),
    ],
    ids=[
        "new-directory",
        "same",
        "bucket-wins",
        "targets-by-name",
        "pruned-or-unpublished",
        "mutable-not-planned",
        "publish-order",
    ],
)  # fmt: skip
def test_plan_sync(
    local: dict[str, str | None], remote: dict[str, str], fetch: tuple[str, ...], remove: tuple[str, ...]
) -> None:
    plan = plan_sync(local, remote)
    assert (plan.fetch, plan.remove) == (fetch, remove)


# -- a bucket in memory -----------------------------------------------------------------------


class MemoryBucket:
    """An object store in memory (sink and source); `fail_on` makes writes of names containing
    it fail; `heads` and `lists` count requests."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.fail_on = ""
        self.heads = 0
        self.lists = 0
        self.history: dict[str, set[bytes]] = {}  # every content ever written under a name

    def put(
        self, name: str, body: bytes | IO[bytes], *, content_type: str = "", cache_control: str = ""
    ) -> None:
        if self.fail_on and self.fail_on in name:
            raise ObjectStoreError(f"injected failure writing {name}")
        data = body if isinstance(body, bytes) else body.read()
        self.files[name] = data
        self.history.setdefault(name, set()).add(data)

    def delete(self, name: str) -> None:
        self.files.pop(name, None)

    def get(self, name: str) -> bytes:
        if name not in self.files:
            raise NotFoundError(name)
        return self.files[name]

    def stream(self, name: str, chunk_size: int = 1024) -> Iterator[bytes]:
        return iter([self.get(name)])

    def etag(self, name: str) -> str | None:
        self.heads += 1
        data = self.files.get(name)
        return None if data is None else hashlib.md5(data).hexdigest()

    def listing(self, under: str = "") -> Iterator[tuple[str, str]]:
        self.lists += 1
        return iter(
            [(n, hashlib.md5(d).hexdigest()) for n, d in list(self.files.items()) if n.startswith(under)]
        )


class BucketFetcher(FetcherInterface):
    """A device reading the bucket's tuf/ tree (like one behind a CDN)."""

    def __init__(self, bucket: MemoryBucket) -> None:
        self.bucket = bucket

    def _fetch(self, url: str) -> Iterator[bytes]:
        name = "tuf/" + unquote(url.removeprefix("http://cdn.test/"))
        if name not in self.bucket.files:
            raise DownloadHTTPError(f"404 {url}", 404)
        return iter([self.bucket.files[name]])


def device(bucket: MemoryBucket, root: bytes, where: Path) -> Updater:
    where.mkdir(parents=True, exist_ok=True)
    return Updater(
        str(where / "metadata"),
        "http://cdn.test/metadata/",
        str(where / "targets"),
        "http://cdn.test/targets/",
        BucketFetcher(bucket),
        bootstrap=root,
    )


def host(tmp_path: Path, name: str, bucket: Any, keys: Path | None = None) -> SignedRepository:
    """A hub host: its own directory and its own copy of the online keys (of `keys`)."""
    key_dir = tmp_path / name / "keys"
    if keys is not None:
        shutil.copytree(keys / "online", key_dir / "online")
    return SignedRepository(
        tmp_path / name / "tuf",
        KeyStore.under(key_dir),
        publisher=Publisher(bucket),
        mirror=Mirror(bucket),
        lock=FileLock(tmp_path / name / "tuf" / ".lock"),
    )


def tree(repo: SignedRepository) -> dict[str, bytes]:
    base = repo.layout.base
    return {
        "tuf/" + p.relative_to(base).as_posix(): p.read_bytes()
        for top in ("metadata", "targets")
        for p in (base / top).rglob("*")
        if p.is_file()
    }


@pytest.fixture
def bucket() -> MemoryBucket:
    return MemoryBucket()


@pytest.fixture
def hosts(tmp_path: Path, bucket: MemoryBucket) -> tuple[SignedRepository, SignedRepository]:
    a = host(tmp_path, "a", bucket)
    a.create()
    b = host(tmp_path, "b", bucket, keys=tmp_path / "a" / "keys")
    assert b.join() == "joined"
    return a, b


def timestamp_version(bucket: MemoryBucket) -> int:
    return Metadata[Timestamp].from_bytes(bucket.files["tuf/metadata/timestamp.json"]).signed.version


def test_hosts_sign_in_turn_on_the_bucket_state(
    tmp_path: Path, bucket: MemoryBucket, hosts: tuple[SignedRepository, SignedRepository]
) -> None:
    a, b = hosts
    seen = [timestamp_version(bucket)]
    assert b.add_model_version("wine", 1, WINE) == 2
    seen.append(timestamp_version(bucket))
    assert a.set_assignment("lab", b'{"stable": 1}') == 1  # A had not seen B's push: it pulled
    seen.append(timestamp_version(bucket))
    assert a.model_versions() == {"wine": [1]}
    assert b.set_assignment("lab", b'{"stable": 2}') == 2
    seen.append(timestamp_version(bucket))
    assert a.add_model_version("wine", 2, {**WINE, "model.onnx": b"onnx-2"}) == 3
    seen.append(timestamp_version(bucket))
    assert seen == sorted(set(seen)), seen  # strictly increasing
    # No name in the bucket ever held two contents (timestamp and root.json are rewritten).
    assert all(
        len(v) == 1 for n, v in bucket.history.items() if not n.endswith(("timestamp.json", "/root.json"))
    )
    assert tree(a) == bucket.files
    # A device verifies the bucket from the root alone and sees the last assignment.
    client = device(bucket, bucket.files["tuf/metadata/1.root.json"], tmp_path / "dev")
    client.refresh()
    info = client.get_targetinfo("groups/lab/assignment.json")
    assert info is not None
    assert Path(client.download_target(info)).read_bytes() == b'{"stable": 2}'
    assert client.get_targetinfo("models/wine/2/model.onnx") is not None


def test_a_failed_publish_is_undone_and_raises(
    bucket: MemoryBucket, hosts: tuple[SignedRepository, SignedRepository]
) -> None:
    a, b = hosts
    before = dict(bucket.files)
    local_before = tree(a)
    bucket.fail_on = "snapshot"
    with pytest.raises(ObjectStoreError, match="undone and nothing was published"):
        a.add_model_version("wine", 1, WINE)
    assert bucket.files["tuf/metadata/timestamp.json"] == before["tuf/metadata/timestamp.json"]
    # A's directory (what its /tuf/ serves) holds no metadata that is not in the bucket.
    assert {n: d for n, d in tree(a).items() if n.startswith("tuf/metadata/")} == {
        n: d for n, d in local_before.items() if n.startswith("tuf/metadata/")
    }
    bucket.fail_on = ""
    # B signs next: 2.models.json went up before the snapshot failed, so B skips that number
    # although no timestamp names it; A then signs on top of B.
    assert b.add_model_version("iris", 1, WINE) == 3
    assert a.add_model_version("wine", 1, WINE) == 4
    assert a.model_versions() == {"iris": [1], "wine": [1]}
    assert all(
        len(v) == 1 for n, v in bucket.history.items() if not n.endswith(("timestamp.json", "/root.json"))
    )
    assert tree(a) == bucket.files


def test_an_unpublished_local_file_is_replaced_by_the_buckets_copy(
    bucket: MemoryBucket, hosts: tuple[SignedRepository, SignedRepository]
) -> None:
    a, b = hosts
    # A crash after A wrote 2.models.json but before anything was published: a stale file.
    stale = a.layout.metadata_file("models", 2)
    stale.write_bytes(b"never published")
    b.add_model_version("wine", 1, WINE)  # B knows nothing of it: its own 2.models.json
    assert a.model_versions() == {"wine": [1]}  # A pulled: the bucket's copy won
    assert stale.read_bytes() == bucket.files["tuf/metadata/2.models.json"]


def test_sync_follows_other_hosts_and_is_two_heads_when_nothing_changed(
    bucket: MemoryBucket, hosts: tuple[SignedRepository, SignedRepository]
) -> None:
    a, b = hosts
    a.set_assignment("lab", b'{"stable": 1}')
    report = b.sync()
    assert report is not None and "tuf/metadata/timestamp.json" not in report.fetched
    assert tree(b) == bucket.files
    heads, lists = bucket.heads, bucket.lists
    assert b.sync() is None
    assert (bucket.heads - heads, bucket.lists - lists) == (2, 0)
    # Files pruned by one host leave the other's directory at its next sync.
    for v in (1, 2, 3):
        a.add_model_version("wine", v, {**WINE, "model.onnx": f"onnx-{v}".encode()})
        a.remove_model_version("wine", v)
    assert a.prune(keep=1)
    b.sync()
    assert tree(b) == bucket.files == tree(a)


def test_a_second_host_joins_and_never_makes_a_second_root(
    tmp_path: Path, bucket: MemoryBucket, hosts: tuple[SignedRepository, SignedRepository]
) -> None:
    a, _ = hosts
    root = bucket.files["tuf/metadata/1.root.json"]
    # `outpost-hub init` on a third host made a repository of its own, with its own keys.
    c = host(tmp_path, "c", bucket)
    with pytest.raises(RepositoryStateError, match="joins it"):
        c.create()
    SignedRepository(c.layout.base, c.keystore).create()
    with pytest.raises(KeyMismatchError, match="copy the online keys"):
        c.join()
    assert bucket.files["tuf/metadata/1.root.json"] == root
    assert c.layout.metadata_file("root", 1).read_bytes() == root  # the bucket's root replaced its own
    shutil.rmtree(c.keystore.online_dir)
    shutil.copytree(a.keystore.online_dir, c.keystore.online_dir)
    assert c.join() == "joined"
    c.set_assignment("lab", b"{}")
    assert tree(c) == bucket.files


def test_the_first_host_publishes_its_repository_to_an_empty_bucket(
    tmp_path: Path, bucket: MemoryBucket
) -> None:
    SignedRepository(tmp_path / "a" / "tuf", KeyStore.under(tmp_path / "a" / "keys")).create()  # init
    a = host(tmp_path, "a", bucket)
    assert a.join() == "published"
    assert tree(a) == bucket.files
    empty = host(tmp_path, "e", MemoryBucket())
    with pytest.raises(RepositoryStateError, match="outpost-hub init"):
        empty.join()


def test_a_bucket_that_does_not_verify_is_refused(
    bucket: MemoryBucket, hosts: tuple[SignedRepository, SignedRepository]
) -> None:
    a, b = hosts
    b.add_model_version("wine", 1, WINE)
    timestamp = a.layout.base / "metadata" / "timestamp.json"
    before = timestamp.read_bytes()
    # Someone with write access to the bucket adds a target to the models role, unsigned.
    forged = bucket.files["tuf/metadata/2.models.json"].replace(b'"wine"', b'"evil"', 1)
    bucket.files["tuf/metadata/3.models.json"] = forged
    snap = bucket.files["tuf/metadata/2.snapshot.json"].replace(b'"version": 2', b'"version": 3', 1)
    bucket.files["tuf/metadata/3.snapshot.json"] = snap
    ts = Metadata[Timestamp].from_bytes(bucket.files["tuf/metadata/timestamp.json"])
    ts.signed.snapshot_meta.version = 3
    ts.signed.snapshot_meta.hashes = {"sha256": hashlib.sha256(snap).hexdigest()}
    ts.signed.snapshot_meta.length = len(snap)
    bucket.files["tuf/metadata/timestamp.json"] = ts.to_bytes()  # signature no longer valid
    with pytest.raises(SigningError, match="not signed by the keys trusted for timestamp"):
        a.set_assignment("lab", b"{}")
    assert timestamp.read_bytes() == before  # A's /tuf/ still serves the last good state


def test_a_bucket_whose_repository_was_replaced_is_refused(
    tmp_path: Path, bucket: MemoryBucket, hosts: tuple[SignedRepository, SignedRepository]
) -> None:
    a, _ = hosts
    other = SignedRepository(
        tmp_path / "o" / "tuf", KeyStore.under(tmp_path / "o" / "keys"), publisher=Publisher(bucket)
    )
    other.create()  # `tuf_publish = "s3"` (no mirror) of another repository over the same prefix
    with pytest.raises(SigningError, match="not the root this hub started from"):
        a.sync()


def test_a_failed_key_rotation_keeps_the_old_key(
    bucket: MemoryBucket, hosts: tuple[SignedRepository, SignedRepository]
) -> None:
    a, _ = hosts
    old = a.keystore.path("timestamp").read_bytes()
    bucket.fail_on = "root"
    with pytest.raises(ObjectStoreError):
        a.rotate_key("timestamp")
    assert a.keystore.path("timestamp").read_bytes() == old
    bucket.fail_on = ""
    a.set_assignment("lab", b"{}")  # still signs with the key the bucket's root trusts
    rotation = a.rotate_key("timestamp")
    assert a.keystore.path("timestamp").read_bytes() != old and rotation.published["root"] == 2


# -- settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"tuf_state": "bucket"}, 'tuf_state must be "local" or "s3"'),
        ({"tuf_state": "s3"}, 'set tuf_publish = "s3" too'),
        (
            {"tuf_state": "s3", "tuf_publish": "s3", "s3_bucket": "b-1", "tuf_sync_interval_s": 0.0},
            "between 0.1",
        ),
    ],
    ids=["unknown", "needs-publish", "interval"],
)
def test_tuf_state_settings(tmp_path: Path, values: dict[str, Any], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        HubSettings(data_dir=tmp_path, **values)
    assert HubSettings(data_dir=tmp_path).tuf_state == "local"


# -- the real adapters ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with running_s3(tmp_path_factory.mktemp("s3") / "moto.log") as server:
        yield server


def test_hosts_on_a_real_bucket(tmp_path: Path, s3: S3Server) -> None:
    real = S3Bucket(S3Location(s3.bucket("tuf-state"), "outpost/", s3.url))
    assert real.etag("tuf/metadata/timestamp.json") is None
    a = host(tmp_path, "a", real)
    a.create()
    b = host(tmp_path, "b", real, keys=tmp_path / "a" / "keys")
    assert b.join() == "joined"
    b.add_model_version("wine", 1, WINE)
    a.set_assignment("lab", b"{}")
    assert b.sync() is not None and b.sync() is None
    objects = {k.removeprefix("outpost/"): v for k, v in s3.objects("tuf-state", "outpost/tuf/").items()}
    assert tree(a) == tree(b) == objects


@pytest.mark.postgres
def test_an_advisory_lock_serialises_hosts_and_a_lost_one_publishes_nothing(
    tmp_path: Path, postgres_url: str, bucket: MemoryBucket
) -> None:
    engine = create_engine(postgres_url)
    try:
        first = AdvisoryLock(engine, "s3://b/tuf/", tmp_path / "one.lock")
        second = AdvisoryLock(engine, "s3://b/tuf/", tmp_path / "two.lock", wait_s=0.3)
        other = AdvisoryLock(engine, "s3://other/tuf/", tmp_path / "three.lock", wait_s=0.3)
        with first.hold():
            first.check()
            with pytest.raises(SigningLockError, match="cannot take"), second.hold():
                pass
            with other.hold():  # another repository's lock is another key
                other.check()
        order: list[str] = []

        def hold(lock: AdvisoryLock, name: str) -> None:
            with lock.hold():
                order.append(name + " in")
                time.sleep(0.2)
                order.append(name + " out")

        t = [
            threading.Thread(
                target=hold, args=(AdvisoryLock(engine, "s3://b/tuf/", tmp_path / f"{i}.lock"), str(i))
            )
            for i in range(3)
        ]
        for th in t:
            th.start()
        for th in t:
            th.join()
        assert all(order[i].split()[0] == order[i + 1].split()[0] for i in range(0, 6, 2)), order

        class Dying(AdvisoryLock):
            """The database connection dies while the lock is held, just before publishing."""

            def check(self) -> None:
                with engine.connect() as admin:
                    admin.execute(
                        text(
                            "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' "
                            "AND objid::bigint = (CAST(:k AS bigint) & 4294967295)"
                        ),
                        {"k": self.key},
                    )
                    admin.commit()
                super().check()

        a = host(tmp_path, "a", bucket)
        a.create()
        b = SignedRepository(
            tmp_path / "b" / "tuf", a.keystore, publisher=Publisher(bucket), mirror=Mirror(bucket),
            lock=Dying(engine, "s3://b/tuf/", tmp_path / "b.lock"),
        )  # fmt: skip
        b.join()
        before = dict(bucket.files)
        with pytest.raises(SigningLockError, match="nothing was"):
            b.add_model_version("wine", 1, WINE)
        assert bucket.files == before
        assert tree(b) == before  # undone: b's /tuf/ serves what the bucket holds
    finally:
        engine.dispose()


def test_a_directory_ahead_of_the_bucket_is_published_at_start(
    tmp_path: Path, bucket: MemoryBucket, hosts: tuple[SignedRepository, SignedRepository]
) -> None:
    """`outpost-hub keys rotate` on host A's directory while its hub was stopped (no mirror, no
    publisher): at start A publishes it, since nobody committed since; B then needs the new key."""
    a, b = hosts
    SignedRepository(a.layout.base, a.keystore).rotate_key("timestamp")
    restarted = host(tmp_path, "a", bucket)
    assert restarted.join() == "published"
    assert tree(restarted) == bucket.files
    assert "tuf/metadata/2.root.json" in bucket.files
    with pytest.raises(KeyMismatchError, match="is not the key"):
        b.set_assignment("lab", b"{}")
    shutil.copy2(a.keystore.path("timestamp"), b.keystore.path("timestamp"))
    assert b.set_assignment("lab", b"{}") == 1
    # Behind the bucket (B signed since), the same directory is pulled instead.
    assert host(tmp_path, "a", bucket).join() == "joined"
    assert tree(restarted) == bucket.files


def test_a_file_altered_in_the_bucket_is_not_copied_over_the_good_one(
    bucket: MemoryBucket, hosts: tuple[SignedRepository, SignedRepository]
) -> None:
    a, b = hosts
    b.add_model_version("wine", 1, WINE)
    a.sync()
    good = a.layout.metadata_file("models", 2).read_bytes()
    bucket.files["tuf/metadata/2.models.json"] = good.replace(b'"wine"', b'"evil"', 1)
    with pytest.raises(SigningError, match="not signed by the keys trusted for models"):
        a.set_assignment("lab", b"{}")
    assert a.layout.metadata_file("models", 2).read_bytes() == good
