"""The hub's TUF repository against python-tuf's own client (ngclient), no mocks of TUF.

The client reads the repository directory through a small fetcher (the HTTP server that
serves it is tested elsewhere). python-tuf's client checks expiry against the real clock,
so tests that need expired metadata run the hub's injected clock in the past.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner
from tuf.api.exceptions import (
    BadVersionNumberError,
    DownloadHTTPError,
    DownloadLengthMismatchError,
    ExpiredMetadataError,
    LengthOrHashMismatchError,
    RepositoryError,
    UnsignedMetadataError,
)
from tuf.api.metadata import DelegatedRole, Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.ngclient import Updater
from tuf.ngclient.fetcher import FetcherInterface

from hub.errors import (
    InvalidNameError,
    KeyMismatchError,
    MissingKeyError,
    RepositoryStateError,
    SigningError,
    TargetConflictError,
    UnknownTargetError,
)
from hub.signing import ExpiryPolicy, KeyStore, SignedRepository
from hub.signing.store import MetadataStore

BASE = "http://hub.test/"
WINE_V1 = {"manifest.json": b'{"name": "wine", "version": 1}', "model.onnx": b"\x08\x07onnx-wine-1" * 50}
WINE_V2 = {"manifest.json": b'{"name": "wine", "version": 2}', "model.onnx": b"\x08\x07onnx-wine-2" * 60}
IRIS_V1 = {"manifest.json": b'{"name": "iris", "version": 1}', "model.onnx": b"\x08\x07onnx-iris-1" * 40}


class FakeClock:
    def __init__(self, now: datetime | None = None) -> None:
        self.now = now or datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


class DirFetcher(FetcherInterface):
    """Serves `BASE/metadata/...` and `BASE/targets/...` from a repository directory."""

    def __init__(self, repo_dir: Path) -> None:
        self.repo_dir = repo_dir

    def _fetch(self, url: str) -> Iterator[bytes]:
        assert url.startswith(BASE), url
        path = self.repo_dir / unquote(url.removeprefix(BASE))
        if not path.is_file():
            raise DownloadHTTPError(f"404 {url}", 404)
        return iter([path.read_bytes()])


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def keys(tmp_path: Path) -> KeyStore:
    return KeyStore.under(tmp_path / "keys")


@pytest.fixture
def repo(tmp_path: Path, keys: KeyStore, clock: FakeClock) -> SignedRepository:
    r = SignedRepository(tmp_path / "repo", keys, clock=clock)
    r.create()
    return r


@pytest.fixture
def make_client(tmp_path: Path) -> Callable[..., Updater]:
    """A device: a fresh Updater over `cache` (a new directory unless given)."""
    counter = iter(range(1000))

    def make(repo: SignedRepository, bootstrap: bytes | None = None, cache: Path | None = None) -> Updater:
        cache = cache or tmp_path / f"device-{next(counter)}"
        cache.mkdir(parents=True, exist_ok=True)
        root = bootstrap if bootstrap is not None else (repo.layout.metadata_dir / "1.root.json").read_bytes()
        return Updater(
            str(cache / "metadata"),
            BASE + "metadata/",
            str(cache / "targets"),
            BASE + "targets/",
            DirFetcher(repo.layout.base),
            bootstrap=root,
        )

    return make


def download(client: Updater, path: str) -> tuple[bytes, TargetFile]:
    info = client.get_targetinfo(path)
    assert info is not None, f"{path} is not signed"
    data = Path(client.download_target(info)).read_bytes()
    assert hashlib.sha256(data).hexdigest() == info.hashes["sha256"]
    return data, info


def published(repo_dir: Path) -> dict[str, Metadata[Any]]:
    """The repository as a client would walk it: timestamp -> snapshot -> every targets role."""
    md_dir = repo_dir / "metadata"
    timestamp = Metadata[Timestamp].from_bytes((md_dir / "timestamp.json").read_bytes())
    snap_v = timestamp.signed.snapshot_meta.version
    snapshot = Metadata[Snapshot].from_bytes((md_dir / f"{snap_v}.snapshot.json").read_bytes())
    out: dict[str, Metadata[Any]] = {"timestamp": timestamp, "snapshot": snapshot}
    for name, meta in snapshot.signed.meta.items():
        role = name.removesuffix(".json")
        out[role] = Metadata[Targets].from_bytes((md_dir / f"{meta.version}.{name}").read_bytes())
    out["root"] = Metadata[Root].from_bytes((md_dir / "root.json").read_bytes())
    return out


def signer_from(path: Path) -> CryptoSigner:
    return CryptoSigner(load_pem_private_key(path.read_bytes(), None))


def publish_forged(
    repo: SignedRepository, role: str, mutate: Callable[[Targets], None], key: CryptoSigner
) -> None:
    """An attacker holding `key` and the online snapshot/timestamp keys publishes a new `role`."""
    md_dir = repo.layout.metadata_dir
    state = published(repo.layout.base)
    md: Metadata[Targets] = copy.deepcopy(state[role])
    mutate(md.signed)
    md.signed.version += 1
    md.sign(key)
    data = md.to_bytes()
    (md_dir / f"{md.signed.version}.{role}.json").write_bytes(data)
    snapshot: Metadata[Snapshot] = copy.deepcopy(state["snapshot"])
    snapshot.signed.meta[f"{role}.json"] = MetaFile(md.signed.version, length=len(data))
    snapshot.signed.version += 1
    snapshot.sign(signer_from(repo.keystore.path("snapshot")))
    snap_data = snapshot.to_bytes()
    (md_dir / f"{snapshot.signed.version}.snapshot.json").write_bytes(snap_data)
    timestamp: Metadata[Timestamp] = copy.deepcopy(state["timestamp"])
    timestamp.signed.version += 1
    timestamp.signed.snapshot_meta = MetaFile(snapshot.signed.version, length=len(snap_data))
    timestamp.sign(signer_from(repo.keystore.path("timestamp")))
    (md_dir / "timestamp.json").write_bytes(timestamp.to_bytes())


def metadata_files(repo: SignedRepository) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(repo.layout.metadata_dir.iterdir())}


# -- publishing and fetching ------------------------------------------------------------


def test_client_downloads_every_model_file_and_assignment(repo: SignedRepository, make_client) -> None:
    assert repo.add_model_version("wine", 1, WINE_V1, custom={"task": "classification"}) == 2
    assert repo.add_model_version("iris", 1, IRIS_V1) == 3
    assert repo.set_assignment("default", b'{"stable": {"wine": 1}}') == 1
    assert repo.set_assignment("lab", b'{"stable": {"iris": 1}}') == 1

    client = make_client(repo)
    client.refresh()
    for name, files in (("wine", WINE_V1), ("iris", IRIS_V1)):
        for filename, content in files.items():
            data, info = download(client, f"models/{name}/1/{filename}")
            assert data == content
            assert info.custom["model"] == name and info.custom["version"] == 1
    assert download(client, "models/wine/1/model.onnx")[1].custom["task"] == "classification"
    assert download(client, "groups/default/assignment.json")[0] == b'{"stable": {"wine": 1}}'
    assert download(client, "groups/lab/assignment.json")[0] == b'{"stable": {"iris": 1}}'
    for unknown in ("models/wine/2/model.onnx", "groups/other/assignment.json", "elsewhere.txt"):
        assert client.get_targetinfo(unknown) is None
    assert repo.model_versions() == {"iris": [1], "wine": [1]}
    assert repo.groups() == ["default", "lab"]


def test_on_disk_layout_is_consistent_snapshots(repo: SignedRepository) -> None:
    repo.add_model_version("wine", 1, WINE_V1)
    repo.set_assignment("default", b"{}")
    names = set(metadata_files(repo))
    assert {
        "1.root.json",
        "root.json",
        "timestamp.json",
        "1.targets.json",
        "2.models.json",
        "2.deploy.json",
        "1.group-default.json",
        "3.snapshot.json",
    } <= names
    assert repo.root_path().read_bytes() == (repo.layout.metadata_dir / "1.root.json").read_bytes()
    onnx = WINE_V1["model.onnx"]
    stored = repo.layout.targets_dir / "models/wine/1" / f"{hashlib.sha256(onnx).hexdigest()}.model.onnx"
    assert stored.read_bytes() == onnx
    root = Metadata[Root].from_bytes(repo.root_path().read_bytes()).signed
    assert root.consistent_snapshot
    for role in (
        "online/snapshot",
        "online/timestamp",
        "online/models",
        "online/deploy",
        "offline/root",
        "offline/targets",
    ):
        assert (repo.keystore.online_dir.parent / f"{role}.pem").stat().st_mode & 0o777 == 0o600


def test_second_push_and_new_assignment_are_seen_by_a_fresh_updater(
    repo: SignedRepository, make_client, tmp_path: Path
) -> None:
    models_v = repo.add_model_version("wine", 1, WINE_V1)
    group_v = repo.set_assignment("default", b'{"stable": 1}')
    device = tmp_path / "device"
    download(make_client(repo, cache=device), "groups/default/assignment.json")

    assert repo.add_model_version("wine", 2, WINE_V2) == models_v + 1
    assert repo.set_assignment("default", b'{"stable": 2}') == group_v + 1
    assert repo.set_assignment("canary", b'{"stable": 2}') == 1

    for client in (make_client(repo, cache=device), make_client(repo)):
        assert download(client, "models/wine/2/model.onnx")[0] == WINE_V2["model.onnx"]
        assert download(client, "models/wine/1/model.onnx")[0] == WINE_V1["model.onnx"]
        assert download(client, "groups/default/assignment.json")[0] == b'{"stable": 2}'
        assert download(client, "groups/canary/assignment.json")[0] == b'{"stable": 2}'


def test_versions_are_immutable_and_can_be_withdrawn(repo: SignedRepository, make_client) -> None:
    version = repo.add_model_version("wine", 1, WINE_V1)
    before = metadata_files(repo)
    assert repo.add_model_version("wine", 1, dict(WINE_V1)) == version  # same files: no-op
    assert repo.set_assignment("g", b"{}") == repo.set_assignment("g", b"{}")
    with pytest.raises(TargetConflictError, match="wine version 1"):
        repo.add_model_version("wine", 1, {**WINE_V1, "model.onnx": b"other bytes"})
    with pytest.raises(TargetConflictError):
        repo.add_model_version("wine", 1, {"model.onnx": WINE_V1["model.onnx"]})
    with pytest.raises(TargetConflictError):
        repo.add_model_version("wine", 1, WINE_V1, custom={"task": "changed"})
    assert set(before) <= set(metadata_files(repo))

    assert repo.remove_model_version("wine", 1) == version + 1
    with pytest.raises(UnknownTargetError):
        repo.remove_model_version("wine", 1)
    assert make_client(repo).get_targetinfo("models/wine/1/model.onnx") is None
    assert repo.model_versions() == {}


BAD_CALLS = [
    ("add_model_version", ("../etc", 1, {"m": b"x"})),
    ("add_model_version", ("a/b", 1, {"m": b"x"})),
    ("add_model_version", ("wine*", 1, {"m": b"x"})),
    ("add_model_version", (".hidden", 1, {"m": b"x"})),
    ("add_model_version", ("wine", 0, {"m": b"x"})),
    ("add_model_version", ("wine", True, {"m": b"x"})),
    ("add_model_version", ("wine", "1", {"m": b"x"})),
    ("add_model_version", ("wine", 1, {"sub/model.onnx": b"x"})),
    ("add_model_version", ("wine", 1, {})),
    ("add_model_version", ("wine", 1, {"m": b"x"}, {"version": 9})),
    ("add_model_version", ("wine", 1, {"m": b"x"}, {"bad": float("nan")})),
    ("set_assignment", ("", b"{}")),
    ("set_assignment", ("a b", b"{}")),
    ("set_assignment", ("[ab]", b"{}")),
    ("rotate_key", ("group-default",)),
    ("rotate_key", ("nobody",)),
]


@pytest.mark.parametrize(("call", "args"), BAD_CALLS, ids=[f"{c}{a!r}"[:60] for c, a in BAD_CALLS])
def test_names_that_cannot_be_target_paths_are_refused(
    repo: SignedRepository, call: str, args: tuple
) -> None:
    before = metadata_files(repo)
    with pytest.raises(InvalidNameError):
        getattr(repo, call)(*args)
    assert metadata_files(repo) == before


def test_create_refuses_an_existing_repository_and_use_before_create(
    repo: SignedRepository, tmp_path: Path, keys: KeyStore
) -> None:
    with pytest.raises(RepositoryStateError, match="already holds metadata"):
        repo.create()
    empty = SignedRepository(tmp_path / "empty", keys)
    with pytest.raises(RepositoryStateError, match="outpost-hub init"):
        empty.add_model_version("wine", 1, WINE_V1)
    with pytest.raises(RepositoryStateError):
        empty.refresh()


# -- expiry ---------------------------------------------------------------------------------

SHORT = ExpiryPolicy(
    root=timedelta(days=1),
    targets=timedelta(days=1),
    models=timedelta(hours=3),
    deploy=timedelta(hours=3),
    group=timedelta(hours=3),
    snapshot=timedelta(hours=12),
    timestamp=timedelta(hours=1),
)


def test_expired_timestamp_is_refused_until_the_hub_refreshes(
    tmp_path: Path, keys: KeyStore, make_client
) -> None:
    # ngclient judges expiry by the real clock, so the hub signs 150 minutes in the past.
    real_now = datetime.now(UTC)
    clock = FakeClock(real_now - timedelta(minutes=150))
    repo = SignedRepository(tmp_path / "repo", keys, expiry=SHORT, clock=clock)
    repo.create()
    repo.add_model_version("wine", 1, WINE_V1)
    repo.set_assignment("default", b'{"stable": 1}')

    with pytest.raises(ExpiredMetadataError, match="timestamp"):
        make_client(repo).refresh()

    clock.now = real_now
    report = repo.refresh()
    # 30 of their 180 minutes left (< 1/3): the online delegated roles are renewed too.
    assert report.resigned == ("models", "deploy", "group-default", "snapshot", "timestamp")
    assert report.offline_expiring == ()
    assert report.next_due == (clock.now + timedelta(minutes=40)).replace(microsecond=0)
    assert download(make_client(repo), "models/wine/1/model.onnx")[0] == WINE_V1["model.onnx"]

    before = metadata_files(repo)
    assert repo.refresh().resigned == ()  # nothing due: no new files
    assert metadata_files(repo) == before


def test_a_hub_that_refreshes_never_lets_published_metadata_expire(tmp_path: Path, keys: KeyStore) -> None:
    clock = FakeClock()
    repo = SignedRepository(tmp_path / "repo", keys, expiry=SHORT, clock=clock)
    repo.create()
    repo.set_assignment("default", b"{}")
    seen_offline: set[str] = set()
    for _ in range(3 * 36):  # 36 hours, refreshing every 20 minutes
        clock.advance(timedelta(minutes=20))
        report = repo.refresh()
        assert report.next_due > clock.now
        seen_offline |= set(report.offline_expiring)
        for role, md in published(repo.layout.base).items():
            if role not in ("root", "targets"):
                assert not md.signed.is_expired(clock.now), role
    # root and targets (1 day) are offline: the hub can only say they need an operator.
    assert seen_offline == {"root", "targets"}


# -- keys -----------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["root", "targets", "snapshot", "timestamp", "models", "deploy"])
def test_rotating_a_key_keeps_old_clients_updating(
    repo: SignedRepository, make_client, tmp_path: Path, role: str
) -> None:
    repo.add_model_version("wine", 1, WINE_V1)
    repo.set_assignment("default", b'{"stable": 1}')
    old_root = repo.root_path().read_bytes()
    device = tmp_path / "device"
    download(make_client(repo, cache=device), "groups/default/assignment.json")
    old_key = repo.keystore.path(role).read_bytes()

    rotation = repo.rotate_key(role)

    assert rotation.retired_key is not None and rotation.retired_key.read_bytes() == old_key
    assert repo.keystore.path(role).read_bytes() != old_key
    assert signer_from(repo.keystore.path(role)).public_key.keyid == rotation.new_keyid
    state = published(repo.layout.base)
    top_level = role in ("root", "targets", "snapshot", "timestamp")
    delegator = state["root"].signed if top_level else state["targets"].signed
    assert delegator.get_delegated_role(role).keyids == [rotation.new_keyid]
    if role == "deploy":
        assert state["deploy"].signed.get_delegated_role("group-default").keyids == [rotation.new_keyid]
    # the hub keeps working with the new key (no offline key needed for these)
    repo.add_model_version("wine", 2, WINE_V2)
    repo.set_assignment("default", b'{"stable": 2}')
    repo.set_assignment("new-group", b'{"stable": 2}')
    # the device that synced before the rotation, and one provisioned long ago with the old root
    synced, provisioned = make_client(repo, old_root, device), make_client(repo, old_root)
    for client in (synced, provisioned):
        assert download(client, "models/wine/1/model.onnx")[0] == WINE_V1["model.onnx"]
        assert download(client, "models/wine/2/model.onnx")[0] == WINE_V2["model.onnx"]
        assert download(client, "groups/default/assignment.json")[0] == b'{"stable": 2}'
        assert download(client, "groups/new-group/assignment.json")[0] == b'{"stable": 2}'


def test_root_rotation_is_a_chain_old_devices_follow(
    repo: SignedRepository, make_client, tmp_path: Path
) -> None:
    repo.add_model_version("wine", 1, WINE_V1)
    first_root = repo.root_path().read_bytes()
    retired = [repo.rotate_key("root").retired_key for _ in range(2)]
    assert repo.rotate_key("timestamp").published["root"] == 4

    md_dir = repo.layout.metadata_dir
    assert repo.root_path().read_bytes() == (md_dir / "4.root.json").read_bytes()
    v2 = Metadata[Root].from_bytes((md_dir / "2.root.json").read_bytes())
    v1 = Metadata[Root].from_bytes(first_root)
    assert v2.signed.get_root_verification_result(v1.signed, v2.signed_bytes, v2.signatures).verified
    client = make_client(repo, bootstrap=first_root, cache=tmp_path / "device")
    assert download(client, "models/wine/1/model.onnx")[0] == WINE_V1["model.onnx"]
    assert (tmp_path / "device/metadata/root_history/4.root.json").is_file()

    # A root v5 signed with a retired root key only is not accepted.
    assert retired[0] is not None
    forged = Metadata[Root].from_bytes(repo.root_path().read_bytes())
    forged.signed.version = 5
    forged.sign(signer_from(retired[0]))
    (md_dir / "5.root.json").write_bytes(forged.to_bytes())
    with pytest.raises(UnsignedMetadataError):
        make_client(repo, bootstrap=first_root).refresh()


def test_a_retired_timestamp_key_signs_nothing_clients_accept(repo: SignedRepository, make_client) -> None:
    rotation = repo.rotate_key("timestamp")
    assert rotation.retired_key is not None
    ts_path = repo.layout.metadata_dir / "timestamp.json"
    forged = Metadata[Timestamp].from_bytes(ts_path.read_bytes())
    forged.signed.version += 1
    forged.sign(signer_from(rotation.retired_key))
    ts_path.write_bytes(forged.to_bytes())
    with pytest.raises(UnsignedMetadataError):
        make_client(repo).refresh()


def test_offline_keys_are_only_needed_for_offline_operations(repo: SignedRepository, make_client) -> None:
    offline = repo.keystore.offline_dir
    away = offline.with_name("usb-stick")
    offline.rename(away)
    # everything a running hub does works with the online keys alone
    repo.add_model_version("wine", 1, WINE_V1)
    repo.set_assignment("first-group", b"{}")
    repo.refresh()
    before = metadata_files(repo)
    needs = {"timestamp": "root", "root": "root", "models": "targets", "deploy": "targets"}
    for role, missing in needs.items():
        with pytest.raises(MissingKeyError) as err:
            repo.rotate_key(role)
        assert f"the private key of the {missing} role is not in {offline}" in str(err.value)
    assert metadata_files(repo) == before  # nothing half-done
    assert not list(repo.keystore.online_dir.glob("*.next.pem"))

    away.rename(offline)
    repo.rotate_key("models")
    assert download(make_client(repo), "models/wine/1/model.onnx")[0] == WINE_V1["model.onnx"]


def test_a_key_file_that_is_not_the_trusted_key_is_refused(repo: SignedRepository) -> None:
    path = repo.keystore.path("models")
    path.unlink()
    repo.keystore.generate("models")
    before = metadata_files(repo)
    with pytest.raises(KeyMismatchError, match="models"):
        repo.add_model_version("wine", 1, WINE_V1)
    assert metadata_files(repo) == before
    assert not repo.layout.targets_dir.exists()  # not even the model's bytes were stored


def test_a_key_readable_by_others_is_refused(repo: SignedRepository) -> None:
    repo.keystore.path("timestamp").chmod(0o644)
    with pytest.raises(SigningError, match="chmod 600"):
        repo.set_assignment("default", b"{}")


def test_a_rotation_cut_short_is_finished_by_the_next_signature(
    repo: SignedRepository, make_client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Crash after the metadata trusts the new key but before the key files were switched."""
    keystore = repo.keystore
    monkeypatch.setattr(keystore, "promote", lambda role: None)
    repo.rotate_key("timestamp")
    monkeypatch.undo()
    assert (keystore.online_dir / "timestamp.next.pem").is_file()
    repo.add_model_version("wine", 1, WINE_V1)  # signs the timestamp: finds and promotes the new key
    assert not (keystore.online_dir / "timestamp.next.pem").exists()
    assert download(make_client(repo), "models/wine/1/model.onnx")[0] == WINE_V1["model.onnx"]


def test_refresh_heals_a_rotation_that_stopped_after_publishing_the_root(
    repo: SignedRepository, make_client, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo.add_model_version("wine", 1, WINE_V1)
    write = MetadataStore.write

    def disk_full_at_timestamp(self: MetadataStore, role: str, md: Any, data: bytes) -> None:
        if role == "timestamp":
            raise SigningError("cannot write timestamp.json: No space left on device")
        write(self, role, md, data)

    monkeypatch.setattr(MetadataStore, "write", disk_full_at_timestamp)
    with pytest.raises(SigningError, match="No space left"):
        repo.rotate_key("timestamp")
    monkeypatch.undo()
    # root v2 trusts the new timestamp key; the published timestamp is signed by the old one
    with pytest.raises(UnsignedMetadataError):
        make_client(repo).refresh()

    assert repo.refresh().resigned == ("timestamp",)
    assert download(make_client(repo), "models/wine/1/model.onnx")[0] == WINE_V1["model.onnx"]
    assert not (repo.keystore.online_dir / "timestamp.next.pem").exists()


def test_offline_roles_are_renewed_where_their_keys_are(tmp_path: Path, keys: KeyStore, make_client) -> None:
    clock = FakeClock(datetime.now(UTC) - timedelta(hours=17))
    repo = SignedRepository(tmp_path / "repo", keys, expiry=SHORT, clock=clock)
    repo.create()
    first_root = repo.root_path().read_bytes()
    repo.add_model_version("wine", 1, WINE_V1)
    clock.now = datetime.now(UTC)
    assert repo.refresh().offline_expiring == ("root", "targets")  # 7 of 24 hours left

    assert repo.renew("root") == {"root": 2}
    assert repo.renew("targets") == {"targets": 2, "snapshot": 4, "timestamp": 4}
    assert repo.renew("timestamp") == {"timestamp": 5}
    with pytest.raises(InvalidNameError):
        repo.renew("group-nobody")
    assert repo.refresh().offline_expiring == ()
    client = make_client(repo, bootstrap=first_root)
    assert download(client, "models/wine/1/model.onnx")[0] == WINE_V1["model.onnx"]


# -- attacks --------------------------------------------------------------------------------


def test_tampered_target_bytes_are_refused(repo: SignedRepository, make_client) -> None:
    repo.add_model_version("wine", 1, WINE_V1)
    repo.set_assignment("default", b'{"stable": 1}')
    onnx = WINE_V1["model.onnx"]
    stored = repo.layout.targets_dir / "models/wine/1" / f"{hashlib.sha256(onnx).hexdigest()}.model.onnx"
    stored.write_bytes(onnx[:-1] + b"X")  # same length, other bytes
    client = make_client(repo)
    info = client.get_targetinfo("models/wine/1/model.onnx")
    assert info is not None
    with pytest.raises(LengthOrHashMismatchError):
        client.download_target(info)
    stored.write_bytes(onnx + b"trailer")  # longer: the client stops reading at the signed length
    with pytest.raises(DownloadLengthMismatchError):
        client.download_target(info)
    assign = next((repo.layout.targets_dir / "groups/default").iterdir())
    assign.write_bytes(b'{"stable": 9}')
    with pytest.raises(LengthOrHashMismatchError):
        client.download_target(client.get_targetinfo("groups/default/assignment.json"))
    # publishing those bytes again (a rollback) repairs the file instead of trusting its name
    repo.set_assignment("default", b'{"stable": 2}')
    repo.set_assignment("default", b'{"stable": 1}')
    assert download(make_client(repo), "groups/default/assignment.json")[0] == b'{"stable": 1}'


def test_replayed_older_metadata_is_refused(repo: SignedRepository, make_client, tmp_path: Path) -> None:
    md_dir = repo.layout.metadata_dir
    repo.set_assignment("default", b'{"stable": 1}')
    old_timestamp = (md_dir / "timestamp.json").read_bytes()
    repo.set_assignment("default", b'{"stable": 2}')
    device = tmp_path / "device"
    assert download(make_client(repo, cache=device), "groups/default/assignment.json")[0] == b'{"stable": 2}'
    current_timestamp = (md_dir / "timestamp.json").read_bytes()

    # an older timestamp (pointing at the older snapshot and assignment) after a newer one
    (md_dir / "timestamp.json").write_bytes(old_timestamp)
    with pytest.raises(BadVersionNumberError):
        make_client(repo, cache=device).refresh()
    (md_dir / "timestamp.json").write_bytes(current_timestamp)

    # the older snapshot served under the current snapshot's name
    snap_v = Metadata[Timestamp].from_bytes(current_timestamp).signed.snapshot_meta.version
    current_snapshot = (md_dir / f"{snap_v}.snapshot.json").read_bytes()
    shutil.copy(md_dir / f"{snap_v - 1}.snapshot.json", md_dir / f"{snap_v}.snapshot.json")
    with pytest.raises(RepositoryError):
        make_client(repo).refresh()
    (md_dir / f"{snap_v}.snapshot.json").write_bytes(current_snapshot)

    # the older assignment (group role v1) served as v2
    shutil.copy(md_dir / "1.group-default.json", md_dir / "2.group-default.json")
    with pytest.raises(RepositoryError):
        make_client(repo).get_targetinfo("groups/default/assignment.json")
    # ...also to a device that already trusts v2: it keeps its verified copy, never the replay
    assert download(make_client(repo, cache=device), "groups/default/assignment.json")[0] == b'{"stable": 2}'


def test_a_group_role_cannot_sign_outside_its_delegation(repo: SignedRepository, make_client) -> None:
    """The deploy key (and every online key but models') in an attacker's hands."""
    repo.add_model_version("wine", 1, WINE_V1)
    repo.set_assignment("a", b'{"stable": 1}')
    repo.set_assignment("b", b'{"stable": 1}')
    deploy_key = signer_from(repo.keystore.path("deploy"))
    evil = b"evil model"
    evil_target = TargetFile.from_data("x", evil)
    for path in ("groups/b/assignment.json", "models/wine/1/model.onnx", "models/evil/1/model.onnx"):
        dirname, _, base = path.rpartition("/")
        stored = repo.layout.targets_dir / dirname / f"{evil_target.hashes['sha256']}.{base}"
        stored.parent.mkdir(parents=True, exist_ok=True)
        stored.write_bytes(evil)

    def forge_group_a(targets: Targets) -> None:
        for path in ("groups/b/assignment.json", "models/wine/1/model.onnx", "models/evil/1/model.onnx"):
            targets.targets[path] = TargetFile(evil_target.length, dict(evil_target.hashes), path)

    publish_forged(repo, "group-a", forge_group_a, deploy_key)

    def forge_deploy(targets: Targets) -> None:
        assert targets.delegations is not None and targets.delegations.roles is not None
        role = DelegatedRole("group-evil", [deploy_key.public_key.keyid], 1, False, ["models/*/*/*"])
        targets.delegations.roles = {"group-evil": role, **targets.delegations.roles}
        targets.targets["models/evil/1/model.onnx"] = TargetFile(
            evil_target.length, dict(evil_target.hashes), "models/evil/1/model.onnx"
        )

    publish_forged(repo, "deploy", forge_deploy, deploy_key)
    forged = published(repo.layout.base)
    assert "models/evil/1/model.onnx" in forged["group-a"].signed.targets  # the forgery is served...

    client = make_client(repo)
    # ...but a group role only answers for its own directory, and only `models` for models.
    assert download(client, "groups/a/assignment.json")[0] == b'{"stable": 1}'
    assert download(client, "groups/b/assignment.json")[0] == b'{"stable": 1}'
    assert download(client, "models/wine/1/model.onnx")[0] == WINE_V1["model.onnx"]
    assert client.get_targetinfo("models/evil/1/model.onnx") is None


# -- one writer at a time --------------------------------------------------------------------


def test_concurrent_writers_are_serialized(tmp_path: Path, keys: KeyStore, make_client) -> None:
    SignedRepository(tmp_path / "repo", keys).create()
    per_thread = 6
    barrier = threading.Barrier(3)
    results: dict[str, list[int]] = {}
    errors: list[BaseException] = []

    def work(name: str) -> None:
        writer = SignedRepository(tmp_path / "repo", keys)  # its own instance: own cache, own lock fd
        try:
            barrier.wait()
            if name == "group":
                results[name] = [writer.set_assignment("g", b'{"n": %d}' % i) for i in range(per_thread)]
            else:
                files = {"model.onnx": name.encode() * 10}
                results[name] = [writer.add_model_version(name, v, files) for v in range(1, per_thread + 1)]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in ("alpha", "beta", "group")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    models_versions = results["alpha"] + results["beta"]
    assert sorted(models_versions) == list(range(2, 2 + 2 * per_thread))  # every version used once
    for versions in results.values():
        assert versions == sorted(versions)
    assert results["group"] == list(range(1, per_thread + 1))

    repo = SignedRepository(tmp_path / "repo", keys)
    assert repo.model_versions() == {"alpha": list(range(1, 7)), "beta": list(range(1, 7))}
    snapshots = sorted(int(p.name.split(".")[0]) for p in repo.layout.metadata_dir.glob("*.snapshot.json"))
    assert snapshots == list(range(1, 2 + 3 * per_thread))  # one per operation, none lost
    client = make_client(repo)
    assert download(client, "models/beta/6/model.onnx")[0] == b"beta" * 10
    assert json.loads(download(client, "groups/g/assignment.json")[0]) == {"n": per_thread - 1}


WRITER = """
import sys
from hub.signing import KeyStore, SignedRepository
repo_dir, keys_dir, name = sys.argv[1:]
repo = SignedRepository(repo_dir, KeyStore.under(keys_dir))
print(*[repo.add_model_version(name, v, {"model.onnx": name.encode() * v}) for v in range(1, 6)])
"""


def test_writers_in_separate_processes_are_serialized(tmp_path: Path, keys: KeyStore) -> None:
    repo = SignedRepository(tmp_path / "repo", keys)
    repo.create()
    args = [str(tmp_path / "repo"), str(tmp_path / "keys")]
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, *args, name], stdout=subprocess.PIPE, text=True)
        for name in ("p1", "p2")
    ]
    outputs = [[int(v) for v in proc.communicate(timeout=60)[0].split()] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0]
    assert all(out == sorted(out) for out in outputs)
    assert sorted(outputs[0] + outputs[1]) == list(range(2, 12))
    assert repo.model_versions() == {"p1": [1, 2, 3, 4, 5], "p2": [1, 2, 3, 4, 5]}


# -- housekeeping -----------------------------------------------------------------------------


def test_prune_keeps_what_clients_can_still_need(repo: SignedRepository, make_client) -> None:
    repo.add_model_version("wine", 1, WINE_V1)
    for i in range(4):
        repo.set_assignment("default", b'{"stable": %d}' % i)
    repo.add_model_version("wine", 2, WINE_V2)
    repo.remove_model_version("wine", 1)
    removed = repo.prune(keep=2)

    names = {p.name for p in removed}
    assert "1.snapshot.json" in names and "1.group-default.json" in names
    assert not any(p.name.endswith(".root.json") for p in removed)
    snapshots = sorted(p.name for p in repo.layout.metadata_dir.glob("*.snapshot.json"))
    assert len(snapshots) == 2
    # wine v1 is still named by the older kept snapshot's models version: kept until that goes
    wine1 = repo.layout.targets_dir / "models/wine/1"
    assert any(wine1.iterdir())
    repo.set_assignment("default", b'{"stable": 9}')
    repo.prune(keep=1)
    assert not any(wine1.iterdir())
    client = make_client(repo)
    assert download(client, "models/wine/2/model.onnx")[0] == WINE_V2["model.onnx"]
    assert download(client, "groups/default/assignment.json")[0] == b'{"stable": 9}'
