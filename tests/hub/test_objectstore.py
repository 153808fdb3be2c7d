"""The object store (hub.objectstore): settings, the blob stores' contract run on the
filesystem and on a real S3-compatible server (moto's, on loopback), and publishing the TUF
repository to a bucket in an order that never shows a reader a dangling reference."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from tuf.api.metadata import Metadata, Snapshot, Targets, Timestamp

from examples.train_example import build_example
from hub.errors import BlobCorruptError, NotFoundError, ObjectStoreError
from hub.objectstore import blob_store, tuf_publisher
from hub.objectstore.s3 import S3Bucket, S3Location
from hub.registry import Blobs, BlobStore, Database, Registry
from hub.registry.s3blobs import S3BlobStore
from hub.settings import HubSettings, SettingsError, load_settings
from hub.signing import KeyStore, SignedRepository
from hub.signing.publish import IMMUTABLE_CACHE, MUTABLE_CACHE, Publisher, publish_order
from tests.support.s3server import S3Server, running_s3

# -- settings -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"blob_store": "minio"}, 'blob_store must be "fs" or "s3"'),
        ({"tuf_publish": "cdn"}, 'tuf_publish must be "" (off) or "s3"'),
        ({"blob_store": "s3"}, "the bucket's name is needed"),
        ({"tuf_publish": "s3", "s3_bucket": "No_Such"}, "s3_bucket 'No_Such'"),
        ({"s3_bucket": "models"}, 's3_bucket set but unused: set blob_store = "s3"'),
        ({"blob_store": "s3", "s3_bucket": "models", "s3_prefix": "a b/"}, "s3_prefix 'a b/'"),
        ({"blob_store": "s3", "s3_bucket": "models", "s3_prefix": "a//b"}, "s3_prefix 'a//b'"),
        (
            {"blob_store": "s3", "s3_bucket": "models", "s3_endpoint_url": "minio:9000"},
            "expected http(s)://HOST[:PORT]",
        ),
    ],
    ids=[
        "unknown-store",
        "unknown-publish",
        "no-bucket",
        "bad-bucket",
        "bucket-unused",
        "bad-prefix",
        "empty-segment",
        "endpoint-no-scheme",
    ],
)
def test_invalid_object_store_settings_say_what_to_fix(
    tmp_path: Path, values: dict[str, str], message: str
) -> None:
    (tmp_path / "hub.toml").write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
    with pytest.raises(SettingsError) as err:
        load_settings(tmp_path)
    assert message in str(err.value)
    assert str(tmp_path / "hub.toml") in str(err.value)


def test_the_filesystem_is_the_default_and_needs_no_boto3_settings(tmp_path: Path) -> None:
    settings = HubSettings(data_dir=tmp_path)
    assert (settings.blob_store, settings.tuf_publish) == ("fs", "")
    store = blob_store(settings)
    assert isinstance(store, BlobStore) and store.root == tmp_path / "blobs"
    assert tuf_publisher(settings) is None


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [("", ""), ("outpost", "outpost/"), ("/a/b/", "a/b/")],
    ids=["none", "bare", "slashes"],
)
def test_the_prefix_is_one_directory_of_keys(tmp_path: Path, prefix: str, expected: str) -> None:
    settings = HubSettings(
        data_dir=tmp_path,
        blob_store="s3",
        s3_bucket="models",
        s3_prefix=prefix,
        s3_endpoint_url="http://h:9/",
    )
    assert settings.s3_location() == S3Location("models", expected, "http://h:9", "")


# -- a real S3-compatible server ----------------------------------------------------------------


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with running_s3(tmp_path_factory.mktemp("s3") / "moto.log") as server:
        yield server


_buckets = iter(range(10_000))


@pytest.fixture
def bucket(s3: S3Server) -> S3Bucket:
    name = s3.bucket(f"test-{next(_buckets)}")
    return S3Bucket(S3Location(name, "outpost/", s3.url))


@pytest.fixture(params=["fs", "s3"])
def blobs(request: pytest.FixtureRequest, tmp_path: Path) -> Blobs:
    if request.param == "fs":
        return BlobStore(tmp_path / "blobs")
    return S3BlobStore(request.getfixturevalue("bucket"))


def test_blob_stores_are_content_addressed_and_idempotent(blobs: Blobs) -> None:
    data = b"model bytes" * 1000
    digest = hashlib.sha256(data).hexdigest()
    assert not blobs.exists(digest)
    assert blobs.put(data) == digest
    assert blobs.put(data) == digest  # again: a no-op
    assert blobs.exists(digest)
    assert blobs.read(digest) == data
    assert b"".join(blobs.stream(digest)) == data
    assert blobs.put_stream(iter([data[:7], data[7:]])) == (digest, len(data))
    other = blobs.put(b"another")
    assert blobs.hashes() == sorted([digest, other])


def test_blob_stores_delete_and_undo(blobs: Blobs) -> None:
    kept, gone = blobs.put(b"kept"), blobs.put(b"gone")
    held = blobs.take(kept)
    assert held is not None
    blobs.restore(kept, held)  # the database change failed: the blob is back
    assert blobs.read(kept) == b"kept"
    held = blobs.take(gone)
    blobs.purge(held)  # committed: gone for good
    assert not blobs.exists(gone)
    assert blobs.take(gone) is None
    assert blobs.delete(kept) is True
    assert blobs.delete(kept) is False
    with pytest.raises(NotFoundError):
        blobs.read(kept)
    with pytest.raises(NotFoundError):
        blobs.stream(kept)
    assert blobs.hashes() == []
    assert blobs.sweep() == 0


def test_s3_blobs_are_named_by_hash_under_the_prefix(s3: S3Server, bucket: S3Bucket) -> None:
    digest = S3BlobStore(bucket).put(b"abc")
    assert digest == hashlib.sha256(b"abc").hexdigest()
    assert s3.objects(bucket.location.bucket) == {f"outpost/blobs/{digest[:2]}/{digest}": b"abc"}


def test_a_tampered_blob_in_the_bucket_is_refused(s3: S3Server, bucket: S3Bucket) -> None:
    store = S3BlobStore(bucket)
    digest = store.put(b"the real model")
    s3.client().put_object(Bucket=bucket.location.bucket, Key=f"outpost/{store.name(digest)}", Body=b"evil")
    with pytest.raises(BlobCorruptError, match=f"blob {digest} is corrupt"):
        store.read(digest)


def test_large_blobs_go_up_in_parts(s3: S3Server, bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("hub.objectstore.s3.MULTIPART_THRESHOLD", 5 * 1024 * 1024)
    monkeypatch.setattr("hub.objectstore.s3.MULTIPART_CHUNK", 5 * 1024 * 1024)
    store = S3BlobStore(S3Bucket(bucket.location))
    data = bytes(range(256)) * (11 * 4096)  # 11 MiB: three parts
    chunks = (data[i : i + 65536] for i in range(0, len(data), 65536))
    digest, size = store.put_stream(chunks)
    assert (digest, size) == (hashlib.sha256(data).hexdigest(), len(data))
    head = s3.client().head_object(Bucket=bucket.location.bucket, Key=f"outpost/{store.name(digest)}")
    assert head["ETag"].strip('"').endswith("-3")  # S3's mark of a three-part upload
    assert store.read(digest) == data


def test_an_unreachable_store_is_one_clear_error(s3: S3Server) -> None:
    dead = S3Bucket(S3Location("models", "", "http://127.0.0.1:9"))
    with pytest.raises(ObjectStoreError, match=r"cannot look up s3://models/blobs/.* at http://127.0.0.1:9"):
        S3BlobStore(dead).exists("0" * 64)


def test_the_registry_pushes_and_deletes_through_the_bucket(
    tmp_path: Path, s3: S3Server, bucket: S3Bucket
) -> None:
    directory = build_example(tmp_path / "wine")
    manifest, model = (directory / "manifest.json").read_bytes(), (directory / "model.onnx").read_bytes()
    db = Database(f"sqlite:///{tmp_path / 'hub.db'}")
    db.create_all()
    try:
        registry = Registry(db, S3BlobStore(bucket))
        v1 = registry.push_version(manifest, model)
        doc = json.loads(manifest)
        v2 = registry.push_version(json.dumps({**doc, "version": 2}).encode(), model)  # same model bytes
        keys = set(s3.objects(bucket.location.bucket))
        assert keys == {
            f"outpost/blobs/{h[:2]}/{h}" for h in (v1.model_sha256, v1.manifest_sha256, v2.manifest_sha256)
        }
        registry.delete_version("wine", 1)  # the shared model blob stays: v2 uses it
        assert registry.blobs.hashes() == sorted([v2.model_sha256, v2.manifest_sha256])
        registry.delete_version("wine", 2)
        assert s3.objects(bucket.location.bucket) == {}
        registry.blobs.put(b"left behind by a crash")
        assert registry.collect_garbage() == [hashlib.sha256(b"left behind by a crash").hexdigest()]
    finally:
        db.dispose()


# -- publishing the TUF repository --------------------------------------------------------------


def test_publish_order_targets_first_timestamp_last() -> None:
    names = {
        "metadata/timestamp.json",
        "metadata/root.json",
        "metadata/3.snapshot.json",
        "metadata/2.snapshot.json",
        "metadata/2.models.json",
        "metadata/1.targets.json",
        "metadata/2.root.json",
        "metadata/1.root.json",
        "targets/models/wine/1/ab.model.onnx",
    }
    assert publish_order(names) == [
        "targets/models/wine/1/ab.model.onnx",
        "metadata/1.root.json",
        "metadata/2.root.json",
        "metadata/1.targets.json",
        "metadata/2.models.json",
        "metadata/2.snapshot.json",
        "metadata/3.snapshot.json",
        "metadata/root.json",
        "metadata/timestamp.json",
    ]


def dangling(files: dict[str, bytes]) -> list[str]:
    """What a client walking the published copy would miss: every file the timestamp reaches
    (snapshot, each targets role, each target) must be there."""
    if "metadata/timestamp.json" not in files:
        return []
    timestamp = Metadata[Timestamp].from_bytes(files["metadata/timestamp.json"])
    wanted = [f"metadata/{timestamp.signed.snapshot_meta.version}.snapshot.json"]
    if wanted[0] not in files:
        return wanted
    missing = []
    snapshot = Metadata[Snapshot].from_bytes(files[wanted[0]])
    for name, meta in snapshot.signed.meta.items():
        role_file = f"metadata/{meta.version}.{name}"
        if role_file not in files:
            missing.append(role_file)
            continue
        for target in Metadata[Targets].from_bytes(files[role_file]).signed.targets.values():
            directory, _, base = target.path.rpartition("/")
            path = f"targets/{directory}/{target.hashes['sha256']}.{base}"
            if path not in files:
                missing.append(path)
    return missing


class RecordingSink:
    """An object store in memory that checks, after every write, that what it holds is
    consistent; `fail_on` makes writes of names containing it fail."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.headers: dict[str, tuple[str, str]] = {}
        self.writes: list[str] = []
        self.fail_on = ""

    def put(
        self, name: str, body: bytes | IO[bytes], *, content_type: str = "", cache_control: str = ""
    ) -> None:
        if self.fail_on and self.fail_on in name:
            raise ObjectStoreError(f"injected failure writing {name}")
        rel = name.removeprefix("tuf/")
        self.files[rel] = body if isinstance(body, bytes) else body.read()
        self.headers[rel] = (content_type, cache_control)
        self.writes.append(rel)
        assert dangling(self.files) == [], f"after writing {rel}"

    def delete(self, name: str) -> None:
        self.files.pop(name.removeprefix("tuf/"), None)

    def listing(self, under: str = "") -> Iterator[tuple[str, str]]:
        return iter(
            (f"tuf/{n}", hashlib.md5(data).hexdigest())
            for n, data in self.files.items()
            if f"tuf/{n}".startswith(under)
        )


def local_tree(repo: SignedRepository) -> dict[str, bytes]:
    base = repo.layout.base
    return {
        p.relative_to(base).as_posix(): p.read_bytes()
        for top in (repo.layout.metadata_dir, repo.layout.targets_dir)
        if top.is_dir()
        for p in top.rglob("*")
        if p.is_file()
    }


@pytest.fixture
def sink() -> RecordingSink:
    return RecordingSink()


@pytest.fixture
def repo(tmp_path: Path, sink: RecordingSink) -> SignedRepository:
    r = SignedRepository(tmp_path / "repo", KeyStore.under(tmp_path / "keys"), publisher=Publisher(sink))
    r.create()
    return r


def test_every_change_is_published_consistently_with_cache_headers(
    repo: SignedRepository, sink: RecordingSink
) -> None:
    assert sink.files == local_tree(repo)  # create() published version 1 of every role
    sink.writes.clear()
    repo.add_model_version("wine", 1, {"manifest.json": b"{}", "model.onnx": b"onnx-1"})
    assert [w.split("/")[0] for w in sink.writes[:2]] == ["targets", "targets"]
    assert sink.writes[-2:] == ["metadata/2.snapshot.json", "metadata/timestamp.json"]
    repo.set_assignment("lab", b'{"model": "wine"}')
    repo.refresh()
    repo.remove_model_version("wine", 1)
    assert sink.files == local_tree(repo)
    assert repo.publish_pending is False
    model_target = next(n for n in sink.files if n.endswith(".model.onnx"))
    assert sink.headers[model_target] == ("application/octet-stream", IMMUTABLE_CACHE)
    assert sink.headers["metadata/2.models.json"] == ("application/json", IMMUTABLE_CACHE)
    assert sink.headers["metadata/timestamp.json"] == ("application/json", MUTABLE_CACHE)
    assert sink.headers["metadata/root.json"] == ("application/json", MUTABLE_CACHE)


def test_a_failed_publish_leaves_the_old_state_and_is_caught_up(
    repo: SignedRepository, sink: RecordingSink
) -> None:
    before = dict(sink.files)
    sink.fail_on = "snapshot"
    version = repo.add_model_version("wine", 1, {"manifest.json": b"{}", "model.onnx": b"onnx-1"})
    assert version == 2  # signed and on disk: the hub's own /tuf/ is current
    assert repo.publish_pending is True
    # The published timestamp is still the old one, and everything it names is there.
    assert sink.files["metadata/timestamp.json"] == before["metadata/timestamp.json"]
    assert dangling(sink.files) == []
    sink.fail_on = ""
    sink.writes.clear()
    repo.refresh()  # what the running hub calls periodically
    assert sink.writes == ["metadata/2.snapshot.json", "metadata/timestamp.json"]
    assert sink.files == local_tree(repo)
    assert repo.publish_pending is False


def test_files_another_process_signs_are_published_by_the_next_refresh(
    repo: SignedRepository, sink: RecordingSink
) -> None:
    cli = SignedRepository(repo.layout.base, repo.keystore)  # `outpost-hub keys rotate`: no publisher
    cli.rotate_key("timestamp")
    assert sink.files != local_tree(repo)
    repo.refresh()
    assert sink.files == local_tree(repo)
    assert "metadata/2.root.json" in sink.files


def test_pruned_files_leave_the_bucket_too(repo: SignedRepository, sink: RecordingSink) -> None:
    for v in (1, 2, 3):
        repo.add_model_version("wine", v, {"manifest.json": b"{}", "model.onnx": f"onnx-{v}".encode()})
        repo.remove_model_version("wine", v)
    removed = repo.prune(keep=1)
    assert removed
    assert sink.files == local_tree(repo)
    assert not any(n.endswith(".model.onnx") for n in sink.files)


def test_a_new_process_publishes_only_what_the_bucket_lacks(
    tmp_path: Path, repo: SignedRepository, sink: RecordingSink
) -> None:
    repo.add_model_version("wine", 1, {"manifest.json": b"{}", "model.onnx": b"onnx-1"})
    again = SignedRepository(repo.layout.base, repo.keystore, publisher=Publisher(sink))
    sink.writes.clear()
    report = again.publish()
    assert report is not None
    # It lists the bucket once; the mutable files are sent once since it cannot know them.
    assert report.uploaded == ("metadata/root.json", "metadata/timestamp.json")
    assert again.publish() == type(report)((), ())


def test_the_repository_in_a_real_bucket_equals_the_directory(
    tmp_path: Path, s3: S3Server, bucket: S3Bucket
) -> None:
    repo = SignedRepository(tmp_path / "repo", KeyStore.under(tmp_path / "keys"), publisher=Publisher(bucket))
    repo.create()
    repo.add_model_version("wine", 1, {"manifest.json": b"{}", "model.onnx": b"onnx-1"})
    published = {
        k.removeprefix("outpost/tuf/"): v
        for k, v in s3.objects(bucket.location.bucket, "outpost/tuf/").items()
    }
    assert published == local_tree(repo)
    head: dict[str, Any] = s3.client().head_object(
        Bucket=bucket.location.bucket, Key="outpost/tuf/metadata/timestamp.json"
    )
    assert (head["ContentType"], head["CacheControl"]) == ("application/json", MUTABLE_CACHE)


def test_an_earlier_repository_under_the_prefix_is_replaced(
    tmp_path: Path, s3: S3Server, bucket: S3Bucket
) -> None:
    """Same names (1.root.json, ...), other keys and bytes: the listing's ETags tell them apart."""
    old = SignedRepository(
        tmp_path / "old", KeyStore.under(tmp_path / "old-keys"), publisher=Publisher(bucket)
    )
    old.create()
    old.add_model_version("wine", 1, {"manifest.json": b"{}", "model.onnx": b"onnx-1"})
    new = SignedRepository(
        tmp_path / "new", KeyStore.under(tmp_path / "new-keys"), publisher=Publisher(bucket)
    )
    new.create()
    published = {
        k.removeprefix("outpost/tuf/"): v
        for k, v in s3.objects(bucket.location.bucket, "outpost/tuf/").items()
    }
    assert published == local_tree(new)
