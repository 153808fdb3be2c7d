"""The hub's model registry: real SQLite files, real blobs, real onnxruntime, real packages."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text

from examples.train_example import build_example
from hub.errors import (
    BlobCorruptError,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    PackageRejected,
    PackageTooLarge,
    RegistryError,
)
from hub.registry import (
    BlobStore,
    Database,
    Deployment,
    Experiment,
    Limits,
    Registry,
    canonical_json,
    in_canary,
)
from hub.registry import deployments as rules
from hub.registry.db import VersionRow
from hub.registry.tokens import token_hash
from hub.registry.validate import validate_package
from tests.support.packages import affine_package

P = pytest.param

# -- packages -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Package:
    manifest: bytes
    model: bytes

    @property
    def doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.manifest)
        return doc

    def edit(self, change: Callable[[dict[str, Any]], None], model: bytes | None = None) -> Package:
        """A copy with the manifest edited (and optionally other model bytes, hash left alone)."""
        doc = self.doc
        change(doc)
        return Package(json.dumps(doc, indent=2).encode(), self.model if model is None else model)

    def with_model(self, model: bytes) -> Package:
        """Other model bytes, with the manifest's hash and size updated to match them."""

        def rehash(doc: dict[str, Any]) -> None:
            doc["model"].update(sha256=hashlib.sha256(model).hexdigest(), size=len(model))

        return self.edit(rehash, model)

    def version(self, n: int) -> Package:
        return self.edit(lambda doc: doc.update(version=n))


def read_package(directory: Path) -> Package:
    return Package((directory / "manifest.json").read_bytes(), (directory / "model.onnx").read_bytes())


@pytest.fixture(scope="module")
def wine(tmp_path_factory: pytest.TempPathFactory) -> Package:
    return read_package(build_example(tmp_path_factory.mktemp("wine")))


@pytest.fixture(scope="module")
def affine(tmp_path_factory: pytest.TempPathFactory) -> Package:
    return read_package(affine_package(tmp_path_factory.mktemp("affine")))


# The registry runs unchanged on PostgreSQL: every test that uses a registry runs on a fresh SQLite
# file and on a fresh PostgreSQL database (`database_url`, tests/conftest.py).
sqlite_only = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

Factory = Callable[..., Registry]


@pytest.fixture
def new_registry(database_url: str, tmp_path: Path) -> Iterator[Factory]:
    """Registries over one database and blob store; each call is like another hub process."""
    made: list[Database] = []

    def make(limits: Limits | None = None) -> Registry:
        db = Database(database_url)
        db.create_all()
        made.append(db)
        return Registry(db, BlobStore(tmp_path / "blobs"), limits)

    yield make
    for db in made:
        db.dispose()


@pytest.fixture
def registry(new_registry: Factory) -> Registry:
    return new_registry()


def push(reg: Registry, pkg: Package) -> int:
    return reg.push_version(pkg.manifest, pkg.model).version


def snapshot(reg: Registry) -> tuple[Any, ...]:
    """Everything a refused request must leave as it was."""
    return (
        reg.list_models(),
        [(m.name, [v.version for v in reg.list_versions(m.name)]) for m in reg.list_models()],
        reg.blobs.hashes(),
        reg.list_groups(),
        [reg.deployment_history(g.name) for g in reg.list_groups()],
        reg.list_tokens(),
    )


# -- validation: every refusal says why and changes nothing -----------------------------------


def _label_plus_one(doc: dict[str, Any]) -> None:
    for out in doc["self_test"]["outputs"]:
        if out["name"] == "label":
            out["data"] = [(v + 1) % 3 for v in out["data"]]


def _probabilities_off(doc: dict[str, Any]) -> None:
    for out in doc["self_test"]["outputs"]:
        if out["name"] == "probabilities":
            out["data"] = [v + 0.25 for v in out["data"]]


def _rename_input(doc: dict[str, Any]) -> None:
    doc["inputs"][0]["name"] = "features"
    doc["self_test"]["inputs"][0]["name"] = "features"


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


Variant = Callable[[Package], Package]

REFUSALS: list[tuple[str, Variant, Limits, type[PackageRejected], str]] = [
    ("corrupt-model", lambda p: replace(p, model=_flip(p.model, len(p.model) // 2)), Limits(),
     PackageRejected, "SHA-256 is .* but the manifest says .*corrupt"),
    ("truncated-model", lambda p: replace(p, model=p.model[:-100]), Limits(),
     PackageRejected, r"is \d+ bytes but the manifest says \d+.*truncated"),
    ("manifest-hash-mismatch", lambda p: p.edit(lambda d: d["model"].update(sha256="0" * 64)), Limits(),
     PackageRejected, "SHA-256 is .* but the manifest says 0{64}"),
    ("not-onnx", lambda p: p.with_model(b"this is not an ONNX model\n" * 40), Limits(),
     PackageRejected, "onnxruntime cannot load the model"),
    ("corrupt-onnx-rehashed", lambda p: p.with_model(p.model[: len(p.model) // 3]), Limits(),
     PackageRejected, "onnxruntime cannot load the model"),
    ("self-test-label", lambda p: p.edit(_label_plus_one), Limits(),
     PackageRejected, "self-test mismatch: output 'label' differs.*rebuild the package"),
    ("self-test-probabilities", lambda p: p.edit(_probabilities_off), Limits(),
     PackageRejected, "self-test mismatch: output 'probabilities' differs from the expected values by up to"),
    ("no-self-test", lambda p: p.edit(lambda d: d.pop("self_test")), Limits(),
     PackageRejected, "self_test is missing.*devices run them"),
    ("oversized-model", lambda p: p, Limits(max_model_bytes=1000),
     PackageTooLarge, r"the model is \d+ bytes; the hub accepts at most 1000 bytes.*max_model_bytes"),
    ("oversized-manifest", lambda p: p, Limits(max_manifest_bytes=512),
     PackageTooLarge, "the manifest is .*at most 512 bytes.*max_manifest_bytes"),
    ("invalid-json", lambda p: replace(p, manifest=b'{"name": "wine", '), Limits(),
     PackageRejected, "manifest.json is not valid JSON"),
    ("not-utf8", lambda p: replace(p, manifest=b"\xff\xfe{}"), Limits(),
     PackageRejected, "manifest.json is not UTF-8"),
    ("json-array", lambda p: replace(p, manifest=b"[]"), Limits(),
     PackageRejected, "the document must be a JSON object"),
    ("version-not-int", lambda p: p.edit(lambda d: d.update(version="2")), Limits(),
     PackageRejected, "manifest: version must be int"),
    ("bad-name", lambda p: p.edit(lambda d: d.update(name="../etc")), Limits(),
     PackageRejected, "manifest: name '../etc' must be"),
    ("input-renamed", lambda p: p.edit(_rename_input), Limits(),
     PackageRejected, "does not match its manifest: the manifest's input 'features' is not in the ONNX"),
    ("datatype-mismatch", lambda p: p.edit(lambda d: d["outputs"][1].update(datatype="FP64")), Limits(),
     PackageRejected, "output 'probabilities' is FP32 in the ONNX model, FP64 in the manifest"),
    ("shape-mismatch", lambda p: p.edit(lambda d: d["inputs"][0].update(shape=[-1, 12])), Limits(),
     PackageRejected, r"input 'input' has shape \[-1, 13\] in the ONNX model, \[-1, 12\] in the manifest"),
    ("rank-mismatch", lambda p: p.edit(lambda d: d["outputs"][1].update(shape=[-1])), Limits(),
     PackageRejected, r"output 'probabilities' has shape \[-1, 3\] in the ONNX model, \[-1\]"),
]  # fmt: skip


@pytest.mark.parametrize("populated", [False, True], ids=["empty", "with-v1"])
@pytest.mark.parametrize(
    ("variant", "limits", "error", "message"),
    [pytest.param(*case[1:], id=case[0]) for case in REFUSALS],
)
def test_bad_package_refused_and_nothing_changes(
    tmp_path: Path,
    new_registry: Factory,
    wine: Package,
    populated: bool,
    variant: Variant,
    limits: Limits,
    error: type[PackageRejected],
    message: str,
) -> None:
    reg = new_registry(limits if not populated else None)
    if populated:
        push(reg, wine)
        reg = Registry(reg.db, reg.blobs, limits)
    before = snapshot(reg)
    bad = variant(wine.version(2))
    with pytest.raises(error) as caught:
        reg.push_version(bad.manifest, bad.model)
    assert type(caught.value) is error
    assert re.search(message, str(caught.value)), str(caught.value)
    assert "Traceback" not in str(caught.value)
    assert snapshot(reg) == before
    if not populated:
        assert reg.list_models() == []
        assert [p for p in (tmp_path / "blobs").rglob("*") if p.is_file()] == []


def test_validate_package_returns_the_manifest(wine: Package) -> None:
    manifest = validate_package(wine.manifest, wine.model, Limits())
    assert (manifest.name, manifest.version) == ("wine", 1)
    assert manifest.self_test is not None


def test_limits_have_named_defaults() -> None:
    assert Limits().max_model_bytes == 256 * 1024 * 1024
    assert Limits().max_manifest_bytes == 4 * 1024 * 1024
    assert PackageTooLarge.status == 413
    assert PackageRejected.status == 422


# -- pushing versions -----------------------------------------------------------------------


def test_push_stores_blobs_and_describes_the_version(registry: Registry, wine: Package) -> None:
    info = registry.push_version(wine.manifest, wine.model)
    assert (info.model, info.version) == ("wine", 1)
    assert info.model_sha256 == hashlib.sha256(wine.model).hexdigest()
    assert info.manifest_sha256 == hashlib.sha256(wine.manifest).hexdigest()
    assert (info.model_size, info.manifest_size) == (len(wine.model), len(wine.manifest))
    assert (info.manifest_target, info.model_target) == (
        "models/wine/1/manifest.json",
        "models/wine/1/model.onnx",
    )
    assert info.created.tzinfo is UTC
    # Blobs are stored by content under ab/abcdef..., and read back verified.
    path = registry.blobs.path(info.model_sha256)
    assert path == registry.blobs.root / info.model_sha256[:2] / info.model_sha256
    assert registry.blobs.read(info.model_sha256) == wine.model
    assert registry.blobs.read(info.manifest_sha256) == wine.manifest  # the bytes as uploaded
    assert registry.get_version("wine", 1) == info
    assert registry.list_versions("wine") == [info]
    model = registry.get_model("wine")
    assert (model.versions, model.latest_version, model.last_version) == ((1,), 1, 1)


def test_versions_only_increase_and_are_never_reused(registry: Registry, wine: Package) -> None:
    push(registry, wine)
    push(registry, wine.version(3))
    before = snapshot(registry)
    cases = [
        (3, "wine version 3 exists; versions are immutable: push this package as version 4"),
        (2, "wine version 2 must be greater than 3, the latest pushed; push version 4 or higher"),
        (1, "wine version 1 exists"),
    ]
    for version, message in cases:
        with pytest.raises(ConflictError, match=re.escape(message)):
            push(registry, wine.version(version))
        assert snapshot(registry) == before
    registry.delete_version("wine", 3)
    with pytest.raises(ConflictError, match="version 3 was pushed before and deleted; versions are never"):
        push(registry, wine.version(3))
    assert push(registry, wine.version(4)) == 4
    assert registry.get_model("wine").versions == (1, 4)


def test_undoing_an_unpublished_push_frees_its_number(registry: Registry, wine: Package) -> None:
    push(registry, wine)
    push(registry, wine.version(2))
    registry.delete_version("wine", 2, unpublished=True)  # e.g. signing it failed
    assert registry.get_model("wine").last_version == 1
    assert push(registry, wine.version(2)) == 2
    push(registry, wine.version(3))
    registry.delete_version("wine", 2, unpublished=True)  # not the latest: 3 stays the bar
    assert registry.get_model("wine").last_version == 3


def test_the_same_model_bytes_under_two_versions_share_one_blob(registry: Registry, wine: Package) -> None:
    v1 = registry.push_version(wine.manifest, wine.model)
    v2 = registry.push_version(wine.version(2).manifest, wine.model)
    assert v1.model_sha256 == v2.model_sha256
    assert v1.manifest_sha256 != v2.manifest_sha256
    assert len(registry.blobs.hashes()) == 3
    registry.delete_version("wine", 2)
    assert registry.blobs.hashes() == sorted([v1.model_sha256, v1.manifest_sha256])
    registry.delete_version("wine", 1)
    assert registry.blobs.hashes() == []
    assert registry.get_model("wine").versions == ()  # the name and its history stay


def test_unknown_models_and_versions(registry: Registry, wine: Package) -> None:
    push(registry, wine)
    for call, message in [
        (lambda: registry.get_model("nope"), "there is no model named 'nope'"),
        (lambda: registry.list_versions("nope"), "there is no model named 'nope'"),
        (lambda: registry.get_version("wine", 7), "model 'wine' has no version 7"),
        (lambda: registry.delete_version("wine", 7), "model 'wine' has no version 7"),
        (lambda: registry.delete_version("nope", 1), "there is no model named 'nope'"),
    ]:
        with pytest.raises(NotFoundError, match=message):
            call()


def test_a_failed_blob_write_leaves_nothing(
    registry: Registry, wine: Package, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_put = registry.blobs.put
    calls: list[bytes] = []

    def put_then_fail(data: bytes) -> str:
        calls.append(data)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_put(data)

    monkeypatch.setattr(registry.blobs, "put", put_then_fail)
    with pytest.raises(OSError, match="No space left"):
        push(registry, wine)
    assert registry.list_models() == []
    assert registry.blobs.hashes() == []


# -- deleting versions ----------------------------------------------------------------------


def test_delete_refused_while_a_group_deploys_the_version(registry: Registry, wine: Package) -> None:
    for n in (1, 2, 3):
        push(registry, wine.version(n))
    registry.set_deployment("edge", "wine", 1, candidate=2, percent=10)
    registry.set_deployment("lab", "wine", 3)
    before = snapshot(registry)
    for version, message in [
        (1, r"wine version 1 is deployed to group edge \(as stable\); deploy another version there first"),
        (2, r"wine version 2 is deployed to group edge \(as candidate\)"),
        (3, r"wine version 3 is deployed to group lab \(as stable\)"),
    ]:
        with pytest.raises(ConflictError, match=message):
            registry.delete_version("wine", version)
        assert snapshot(registry) == before
    # Only the current deployment counts: once edge moves on, its old versions can go.
    registry.set_deployment("edge", "wine", 3)
    registry.delete_version("wine", 1)
    registry.delete_version("wine", 2)
    assert registry.get_model("wine").versions == (3,)


def test_a_delete_that_cannot_commit_puts_the_blobs_back(
    registry: Registry, wine: Package, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = registry.push_version(wine.manifest, wine.model)
    real_take = registry.blobs.take
    taken: list[str] = []

    def take_then_fail(digest: str) -> Path | None:
        taken.append(digest)
        if len(taken) == 2:
            raise OSError(5, "Input/output error")
        return real_take(digest)

    monkeypatch.setattr(registry.blobs, "take", take_then_fail)
    with pytest.raises(OSError):
        registry.delete_version("wine", 1)
    assert registry.get_version("wine", 1) == info
    assert registry.blobs.read(info.model_sha256) == wine.model
    assert registry.blobs.read(info.manifest_sha256) == wine.manifest


# -- deployments ----------------------------------------------------------------------------


@pytest.fixture
def three(registry: Registry, wine: Package) -> Registry:
    for n in (1, 2, 3):
        push(registry, wine.version(n))
    return registry


def test_first_deployment_creates_the_group(three: Registry) -> None:
    d = three.set_deployment("edge", "wine", 1, actor="ana")
    assert (d.group, d.model, d.stable, d.candidate, d.percent) == ("edge", "wine", 1, None, 0)
    assert (d.previous_stable, d.metadata_version, d.created_by) == (None, None, "ana")
    assert re.fullmatch(r"[0-9a-f]{32}", d.salt)
    assert three.current_deployment("edge") == d
    assert [g.name for g in three.list_groups()] == ["edge"]
    assert three.list_groups()[0].deployment == d


def test_previous_stable_and_salt_follow_the_rules(three: Registry) -> None:
    d1 = three.set_deployment("edge", "wine", 1)
    d2 = three.set_deployment("edge", "wine", 1, candidate=2, percent=10)
    assert d2.previous_stable is None  # the stable version did not change
    d3 = three.set_deployment("edge", "wine", 1, candidate=2, percent=50)
    assert d3.salt == d2.salt  # ramping keeps the devices already in the canary
    d4 = three.set_deployment("edge", "wine", 2)
    assert d4.previous_stable == 1
    d5 = three.set_deployment("edge", "wine", 2, candidate=3, percent=5)
    assert (d5.previous_stable, d5.salt != d4.salt) == (1, True)
    d6 = three.set_deployment("edge", "wine", 2, candidate=3, percent=5, salt="fixed-salt")
    assert d6.salt == "fixed-salt"
    serials = [d.serial for d in (d1, d2, d3, d4, d5, d6)]
    assert serials == sorted(serials) and len(set(serials)) == 6
    assert [d.id for d in three.deployment_history("edge")] == serials[::-1]


def test_repeating_the_current_deployment_changes_nothing(three: Registry) -> None:
    d = three.set_deployment("edge", "wine", 1, candidate=2, percent=20)
    assert three.set_deployment("edge", "wine", 1, candidate=2, percent=20) == d
    assert len(three.deployment_history("edge")) == 1


IR, NF = InvalidRequestError, NotFoundError


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        P({"percent": 101, "candidate": 2}, IR, "percent must be an integer from 0 to 100", id="percent-101"),
        P({"percent": -1, "candidate": 2}, IR, "percent must be", id="percent-negative"),
        P({"percent": True, "candidate": 2}, IR, "percent must be", id="percent-bool"),
        P({"percent": 10}, IR, "percent is 10 but there is no candidate", id="percent-without-candidate"),
        P({"candidate": 1}, IR, r"the candidate is the stable version \(1\)", id="candidate-is-stable"),
        P({"stable": 0}, IR, "stable version must be a positive integer", id="stable-zero"),
        P({"salt": "has space"}, IR, "the salt must be", id="salt-space"),
        P({"group": "../etc"}, IR, "group name '../etc'", id="group-path"),
        P({"group": "Edge"}, IR, "group name 'Edge'", id="group-uppercase"),
        P({"actor": "x" * 200}, IR, "actor", id="actor-too-long"),
        P({"model": "nope"}, NF, "there is no model named 'nope'", id="unknown-model"),
        P({"stable": 9}, NF, "model 'wine' has no version 9", id="unknown-stable"),
        P({"candidate": 9, "percent": 5}, NF, "model 'wine' has no version 9", id="unknown-candidate"),
    ],
)
def test_bad_deployments_refused_and_nothing_changes(
    three: Registry, kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    three.set_deployment("lab", "wine", 3)
    before = snapshot(three)
    request: dict[str, Any] = {"group": "edge", "model": "wine", "stable": 1} | kwargs
    with pytest.raises(error, match=message):
        three.set_deployment(**request)
    assert snapshot(three) == before


def test_rollback_walks_back_through_the_stable_versions(three: Registry) -> None:
    three.set_deployment("edge", "wine", 1)
    three.set_deployment("edge", "wine", 2)
    d = three.set_deployment("edge", "wine", 3, candidate=2, percent=30, actor="ana")
    assert d.previous_stable == 2
    r1 = three.rollback("edge", actor="bob")
    assert (r1.stable, r1.candidate, r1.percent, r1.previous_stable, r1.created_by) == (2, None, 0, 1, "bob")
    r2 = three.rollback("edge", model="wine")
    assert (r2.stable, r2.previous_stable) == (1, None)
    before = snapshot(three)
    with pytest.raises(ConflictError, match="no earlier stable version of 'wine' to roll back to"):
        three.rollback("edge")
    assert snapshot(three) == before
    history = three.deployment_history("edge")
    assert [h.stable for h in history] == [1, 2, 3, 2, 1]
    assert history[0] == three.current_deployment("edge") == r2
    assert r2.serial > r1.serial > d.serial


def test_rollback_refusals(three: Registry, wine: Package, affine: Package) -> None:
    with pytest.raises(NotFoundError, match="there is no group named 'edge'"):
        three.rollback("edge")
    three.set_deployment("edge", "wine", 1)
    three.set_deployment("edge", "wine", 2)
    with pytest.raises(ConflictError, match="group 'edge' deploys 'wine', not 'affine'"):
        three.rollback("edge", model="affine")
    # Switching the group to another model starts its rollback history afresh.
    push(three, affine)
    switched = three.set_deployment("edge", "affine", 1)
    assert switched.previous_stable is None
    with pytest.raises(ConflictError, match="no earlier stable version of 'affine'"):
        three.rollback("edge")
    # A previous stable version that was deleted meanwhile cannot come back.
    three.set_deployment("edge", "wine", 2)
    three.set_deployment("edge", "wine", 3)
    three.delete_version("wine", 2)
    before = snapshot(three)
    with pytest.raises(
        ConflictError, match="wine version 2, the previous stable version of group 'edge', has"
    ):
        three.rollback("edge")
    assert snapshot(three) == before


def test_unknown_group(three: Registry) -> None:
    for call in (lambda: three.current_deployment("x"), lambda: three.deployment_history("x")):
        with pytest.raises(NotFoundError, match="there is no group named 'x'"):
            call()


def test_record_metadata_version(three: Registry) -> None:
    d = three.set_deployment("edge", "wine", 1)
    recorded = three.record_metadata_version(d, 7)
    assert recorded == replace(d, metadata_version=7)
    assert three.current_deployment("edge").metadata_version == 7
    with pytest.raises(InvalidRequestError):
        three.record_metadata_version(d, 0)
    with pytest.raises(NotFoundError):
        three.record_metadata_version(replace(d, id=999), 1)


# -- the assignment document ----------------------------------------------------------------


def test_assignment_document_is_deterministic_canonical_json(three: Registry) -> None:
    d = three.set_deployment("edge", "wine", 1, candidate=2, percent=25, salt="s1")
    doc = three.assignment_document(d)
    assert doc == three.assignment_document(three.current_deployment("edge"))
    assert doc == three.assignment_document(three.record_metadata_version(d, 3))  # not part of it
    value = json.loads(doc)
    assert canonical_json(value) == doc
    assert doc == json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
    v1, v2 = three.get_version("wine", 1), three.get_version("wine", 2)
    assert value == {
        "format": "outpost-assignment/1",
        "group": "edge",
        "model": "wine",
        "serial": d.serial,
        "stable": {
            "version": 1,
            "manifest": "models/wine/1/manifest.json",
            "manifest_sha256": v1.manifest_sha256,
            "model": "models/wine/1/model.onnx",
            "sha256": v1.model_sha256,
        },
        "candidate": {
            "version": 2,
            "manifest": "models/wine/2/manifest.json",
            "manifest_sha256": v2.manifest_sha256,
            "model": "models/wine/2/model.onnx",
            "sha256": v2.model_sha256,
        },
        "percent": 25,
        "salt": "s1",
        "experiment": None,
        "capture": None,
        "created": d.created.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    later_deployment = three.set_deployment("edge", "wine", 3)
    later = json.loads(three.assignment_document(later_deployment))
    assert later["serial"] > value["serial"]
    assert later["candidate"] is None


def test_an_experiment_is_stored_with_the_deployment_and_signed_into_the_assignment(three: Registry) -> None:
    ab = Experiment("ab", 30)
    d = three.set_deployment("edge", "wine", 1, candidate=2, percent=100, experiment=ab)
    assert d.experiment == ab and three.current_deployment("edge").experiment == ab
    assert json.loads(three.assignment_document(d))["experiment"] == {"mode": "ab", "weight": 30}
    assert three.set_deployment("edge", "wine", 1, candidate=2, percent=100, experiment=ab).id == d.id
    shadow_mode = Experiment("shadow", 100)
    shadow = three.set_deployment("edge", "wine", 1, candidate=2, percent=100, experiment=shadow_mode)
    assert shadow.id > d.id and shadow.salt == d.salt  # same candidate: same devices
    assert json.loads(three.assignment_document(shadow))["experiment"] == {"mode": "shadow", "sample": 100}
    stopped = three.set_deployment("edge", "wine", 1)
    assert stopped.experiment is None
    assert json.loads(three.assignment_document(stopped))["experiment"] is None
    three.set_deployment("edge", "wine", 2, candidate=3, percent=50, experiment=ab)
    back = three.rollback("edge")  # a rollback ends the experiment too
    assert (back.stable, back.candidate, back.experiment) == (1, None, None)


@pytest.mark.parametrize(
    ("doc", "candidate", "percent", "message"),
    [
        ({"mode": "ab", "weight": 0}, 2, 100, "from 1 to 99"),
        ({"mode": "ab", "weight": 100}, 2, 100, "from 1 to 99"),
        ({"mode": "ab", "weight": True}, 2, 100, "from 1 to 99"),
        ({"mode": "shadow", "sample": 0}, 2, 100, "from 1 to 100"),
        ({"mode": "shadow", "sample": 101}, 2, 100, "from 1 to 100"),
        ({"mode": "shadow", "weight": 5}, 2, 100, "sample only"),
        ({"mode": "split", "weight": 5}, 2, 100, "mode must be"),
        ([1], 2, 100, "an experiment is"),
        ({"mode": "ab", "weight": 50}, None, 0, "needs a candidate"),
        ({"mode": "ab", "weight": 50}, 2, 0, "percent of at least 1"),
    ],
    ids=["weight-0", "weight-100", "weight-bool", "sample-0", "sample-101", "wrong-key", "mode", "not-object",
         "no-candidate", "percent-0"],
)  # fmt: skip
def test_bad_experiments_are_refused(
    three: Registry, doc: Any, candidate: int | None, percent: int, message: str
) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        experiment = rules.parse_experiment(doc)
        three.set_deployment("edge", "wine", 1, candidate=candidate, percent=percent, experiment=experiment)
    with pytest.raises(NotFoundError):
        three.current_deployment("edge")


def test_assignment_document_refuses_versions_of_another_deployment(three: Registry) -> None:
    d = three.set_deployment("edge", "wine", 1)
    with pytest.raises(ValueError, match="stable version does not belong"):
        rules.assignment_document(d, three.get_version("wine", 2), None)


# -- pure deployment rules ------------------------------------------------------------------

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def dep(id: int, stable: int, candidate: int | None = None, previous: int | None = None,
        model: str = "m", salt: str = "s") -> Deployment:  # fmt: skip
    return Deployment(id, "g", model, stable, candidate, 10 if candidate else 0, salt, previous, None, T0, "")


@pytest.mark.parametrize(
    ("prior", "request_", "expected"),
    [
        P(None, ("m", 1, None, 0, None), ("m", 1, None, 0, "new", None), id="first"),
        P(dep(1, 1), ("m", 2, None, 0, None), ("m", 2, None, 0, "new", 1), id="stable-changes"),
        P(
            dep(1, 2, previous=1),
            ("m", 2, 3, 10, None),
            ("m", 2, 3, 10, "new", 1),
            id="canary-keeps-previous",
        ),
        P(dep(1, 2, 3, previous=1), ("m", 2, 3, 50, None), ("m", 2, 3, 50, "s", 1), id="ramp-keeps-salt"),
        P(
            dep(1, 2, 3, previous=1),
            ("m", 2, 4, 10, None),
            ("m", 2, 4, 10, "new", 1),
            id="new-candidate-new-salt",
        ),
        P(dep(1, 2, 3, previous=1), ("m", 2, 3, 10, "mine"), ("m", 2, 3, 10, "mine", 1), id="given-salt"),
        P(
            dep(1, 2, 3, previous=1),
            ("m", 3, None, 0, None),
            ("m", 3, None, 0, "new", 2),
            id="promote-candidate",
        ),
        P(
            dep(1, 2, 3, model="other"),
            ("m", 2, 3, 10, None),
            ("m", 2, 3, 10, "new", None),
            id="model-switch",
        ),
    ],
)
def test_plan_deployment(
    prior: Deployment | None, request_: tuple[Any, ...], expected: tuple[Any, ...]
) -> None:
    plan = rules.plan_deployment(prior, *request_, make_salt=lambda: "new")
    assert plan == rules.Plan(*expected)


@pytest.mark.parametrize(
    ("history", "expected"),
    [
        P([dep(3, 3, previous=2), dep(2, 2, previous=1), dep(1, 1)], (2, 1), id="one-step"),
        P([dep(4, 2, previous=1), dep(3, 3, previous=2), dep(2, 2, previous=1)], (1, None), id="two-steps"),
        P([dep(3, 1, 4, previous=2), dep(2, 2, previous=None)], (2, None), id="drops-candidate"),
        P([dep(2, 5, previous=3)], (3, None), id="no-history-for-target"),
    ],
)
def test_plan_rollback(history: list[Deployment], expected: tuple[int, int | None]) -> None:
    plan = rules.plan_rollback(history)
    assert (plan.stable, plan.previous_stable, plan.candidate, plan.percent) == (*expected, None, 0)
    assert plan.salt == history[0].salt


@pytest.mark.parametrize(
    "history",
    [pytest.param([], id="no-deployment"), pytest.param([dep(1, 1)], id="no-previous")],
)
def test_plan_rollback_refusals(history: list[Deployment]) -> None:
    with pytest.raises(ConflictError):
        rules.plan_rollback(history)


def test_canary_ramp_keeps_the_first_devices() -> None:
    devices = [f"dev-{i:04d}" for i in range(2000)]
    at10 = {d for d in devices if in_canary("salt", d, 10)}
    at50 = {d for d in devices if in_canary("salt", d, 50)}
    assert at10 < at50
    assert 100 < len(at10) < 300 and 850 < len(at50) < 1150
    assert not any(in_canary("salt", d, 0) for d in devices)
    assert all(in_canary("salt", d, 100) for d in devices)


# -- tokens ---------------------------------------------------------------------------------


def test_tokens_verify_revoke_and_list(registry: Registry) -> None:
    ops = registry.create_token("ops")
    ci = registry.create_token("ci")
    assert ops != ci and ops.startswith("outpost_") and len(ops) > 40
    assert registry.verify_token(ops) == "ops"
    assert registry.verify_token(ci) == "ci"
    for wrong in ("", "outpost_", ops[:-1], ops + "x", "Bearer " + ops, "outpost_" + "é" * 10, "x" * 10_000):
        assert registry.verify_token(wrong) is None
    with pytest.raises(ConflictError, match="a token named 'ops' exists"):
        registry.create_token("ops")
    registry.revoke_token("ops")
    assert registry.verify_token(ops) is None
    assert registry.verify_token(ci) == "ci"
    with pytest.raises(NotFoundError, match="no live token named 'ops'"):
        registry.revoke_token("ops")
    again = registry.create_token("ops")  # a revoked name can be given out again
    assert registry.verify_token(again) == "ops"
    listed = [(t.name, t.active) for t in registry.list_tokens()]
    assert listed == [("ops", False), ("ci", True), ("ops", True)]
    with pytest.raises(InvalidRequestError):
        registry.create_token("no spaces")


@sqlite_only
def test_tokens_are_hashed_at_rest(tmp_path: Path, registry: Registry) -> None:
    reg = registry
    plaintext = reg.create_token("ops")
    secret_part = plaintext.removeprefix("outpost_").encode()
    reg.db.dispose()
    files = list(tmp_path.glob("hub.db*"))
    stored = b"".join(f.read_bytes() for f in files)
    assert token_hash(plaintext).encode() in stored  # the search does see the data
    assert secret_part not in stored


# -- concurrency ----------------------------------------------------------------------------


def race(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run the calls in threads released at once; each result or the exception it raised."""
    barrier = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = calls[i]()
        except Exception as exc:  # collected for the assertions
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


@pytest.mark.parametrize("processes", [1, 2], ids=["one-registry", "two-registries"])
def test_concurrent_pushes_never_duplicate(new_registry: Factory, wine: Package, processes: int) -> None:
    first = new_registry()
    push(first, wine)
    # Two Registry objects on one file behave like two hub processes: no shared lock.
    regs = [first, new_registry()] if processes == 2 else [first, first]
    for round_, (a, b) in enumerate([(2, 3), (5, 5), (6, 7), (9, 8)]):
        got = race([lambda r=r, v=v: push(r, wine.version(v)) for r, v in zip(regs, (a, b), strict=True)])
        errors = [g for g in got if isinstance(g, Exception)]
        assert all(isinstance(e, ConflictError) for e in errors), errors
        if a == b:
            assert len(errors) == 1, (round_, got)
        elif errors:
            # Only the lower version may lose, and only because the higher one got in first.
            expected = [errors[0], b] if a < b else [a, errors[0]]
            assert got == expected, (round_, got)
        else:
            assert got == [a, b]
    versions = first.get_model("wine").versions
    assert len(versions) == len(set(versions))
    assert list(versions) == sorted(versions)
    with first.db.session() as s:
        rows = s.execute(text("SELECT version FROM model_versions")).scalars().all()
    assert sorted(rows) == list(versions)
    infos = [first.get_version("wine", v) for v in versions]
    assert set(first.blobs.hashes()) == {h for i in infos for h in (i.manifest_sha256, i.model_sha256)}


def test_concurrent_creation_of_one_name(new_registry: Factory, wine: Package) -> None:
    """Two hub processes creating the same model or token name at once: no spurious errors."""
    regs = [new_registry(), new_registry()]
    got = race([lambda r=r, v=v: push(r, wine.version(v)) for r, v in zip(regs, (1, 2), strict=True)])
    assert got[1] == 2, got
    assert got[0] == 1 or (isinstance(got[0], ConflictError) and "must be greater than 2" in str(got[0]))
    got = race([lambda r=r: r.create_token("ops") for r in regs])
    errors = [g for g in got if isinstance(g, Exception)]
    assert len(errors) == 1 and re.search("a token named 'ops' exists", str(errors[0])), got
    assert [t.name for t in regs[0].list_tokens()] == ["ops"]


def test_concurrent_deployments_get_distinct_increasing_serials(new_registry: Factory, wine: Package) -> None:
    regs = [new_registry(), new_registry()]
    push(regs[0], wine)
    push(regs[0], wine.version(2))
    got = race([lambda r=r, v=v: r.set_deployment("edge", "wine", v) for r in regs for v in (1, 2)])
    assert not any(isinstance(g, Exception) for g in got), got
    history = regs[0].deployment_history("edge")
    assert len({d.id for d in history}) == len(history)
    # Each row's previous_stable is consistent with the row before it: the writes serialized.
    for newer, older in itertools.pairwise(history):
        expected = older.stable if older.stable != newer.stable else older.previous_stable
        assert newer.previous_stable == expected


def test_concurrent_rollbacks_and_deployments(new_registry: Factory, wine: Package) -> None:
    regs = [new_registry(), new_registry()]
    for n in (1, 2, 3):
        push(regs[0], wine.version(n))
    regs[0].set_deployment("edge", "wine", 1)
    regs[0].set_deployment("edge", "wine", 2)
    for _ in range(3):
        got = race([lambda: regs[0].rollback("edge"), lambda: regs[1].set_deployment("edge", "wine", 3)])
        # A rollback may find nothing to roll back to; nothing else may fail (no deadlock, no lock error).
        assert all(not isinstance(g, Exception) or isinstance(g, ConflictError) for g in got), got
    history = regs[0].deployment_history("edge")
    assert [d.id for d in history] == sorted((d.id for d in history), reverse=True)


# -- the database and the blob store --------------------------------------------------------


@sqlite_only
def test_sqlite_runs_in_wal_mode_with_foreign_keys(registry: Registry) -> None:
    with registry.db.session() as s:
        assert s.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert s.execute(text("PRAGMA foreign_keys")).scalar() == 1
    with pytest.raises(sa_exc.IntegrityError), registry.db.session(write=True) as s:
        s.add(VersionRow(model_id=42, version=1, manifest="{}", manifest_sha256="0" * 64, manifest_size=2,
                         model_sha256="0" * 64, model_size=0, created=datetime.now(UTC)))  # fmt: skip


def test_times_come_back_as_utc(registry: Registry, wine: Package) -> None:
    at = datetime(2025, 6, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    reg = Registry(registry.db, registry.blobs, clock=lambda: at)
    info = reg.push_version(wine.manifest, wine.model)
    assert info.created == at
    assert reg.get_version("wine", 1).created == at
    assert reg.get_version("wine", 1).created.tzinfo is UTC
    d = reg.set_deployment("edge", "wine", 1)
    assert json.loads(reg.assignment_document(d))["created"] == "2025-06-01T10:00:00Z"


def test_in_memory_sqlite(tmp_path: Path, wine: Package) -> None:
    db = Database("sqlite://")
    db.create_all()
    reg = Registry(db, BlobStore(tmp_path / "mem-blobs"))
    push(reg, wine)
    assert reg.get_model("wine").versions == (1,)
    db.dispose()


@pytest.mark.parametrize(
    "url",
    ["sqlite:///{tmp}/missing-dir/r.db", "postgresql+psycopg://outpost@127.0.0.1:{port}/nowhere"],
    ids=["sqlite-missing-dir", "postgresql-refused"],
)
def test_an_unusable_database_is_a_registry_error(tmp_path: Path, url: str) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    db = Database(url.format(tmp=tmp_path, port=port))
    with pytest.raises(RegistryError, match="cannot create the registry database"):
        db.create_all()
    db.dispose()


def test_blob_store(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    digest = store.put(b"hello")
    assert digest == hashlib.sha256(b"hello").hexdigest()
    assert store.path(digest) == tmp_path / "blobs" / digest[:2] / digest
    assert store.put(b"hello") == digest  # idempotent
    assert store.exists(digest) and store.read(digest) == b"hello"
    assert store.put_stream(iter([b"hel", b"", b"lo"])) == (digest, 5)
    big, size = store.put_stream(iter([b"x" * 1000] * 3))
    assert (big, size) == (hashlib.sha256(b"x" * 3000).hexdigest(), 3000)
    assert store.hashes() == sorted([digest, big])
    assert list((tmp_path / "blobs" / ".tmp").iterdir()) == []  # nothing half-written left
    with pytest.raises(ValueError, match="not a SHA-256"):
        store.path("../../etc/passwd")
    # Corruption is caught on read.
    path = store.path(digest)
    path.chmod(0o644)
    path.write_bytes(b"jello")
    with pytest.raises(BlobCorruptError, match=f"blob {digest} is corrupt"):
        store.read(digest)
    assert store.read(digest, verify=False) == b"jello"
    assert store.delete(digest) and not store.delete(digest)
    with pytest.raises(NotFoundError):
        store.read(digest)


def test_blob_trash_survives_a_crash(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    digest = store.put(b"model")
    held = store.take(digest)
    assert held is not None and not store.exists(digest)
    store.restore(digest, held)
    assert store.read(digest) == b"model"
    held = store.take(digest)
    assert store.take(digest) is None
    (tmp_path / ".tmp").mkdir()
    (tmp_path / ".tmp" / "put-half").write_bytes(b"half")
    # A crash between take and commit: the blob comes back at start-up, the upload goes.
    assert store.sweep() == 2
    assert store.read(digest) == b"model"
    assert list((tmp_path / ".tmp").iterdir()) == []


def test_collect_garbage_removes_only_unreferenced_blobs(registry: Registry, wine: Package) -> None:
    info = registry.push_version(wine.manifest, wine.model)
    orphan = registry.blobs.put(b"left behind by a crash")
    assert registry.collect_garbage() == [orphan]
    assert registry.blobs.hashes() == sorted([info.model_sha256, info.manifest_sha256])
