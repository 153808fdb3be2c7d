"""The registry with hardware variants: a version's variant files are checked, stored, named in
the assignment and kept (or removed) with the version. SQLite and PostgreSQL (database_url)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.update.canary import Assignment, choose
from examples.train_example import NAME, TARGET, build_example
from hub.errors import PackageRejected
from hub.operator_cli import main
from hub.registry import BlobStore, Database, Registry
from hub.registry.variants import variant_digests


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The wine example as int8 and fp32 variants of version 1: file name -> bytes."""
    example = build_example(tmp_path_factory.mktemp("example")).parent
    out = tmp_path_factory.mktemp("variants")
    argv = [
        "package", str(example / f"{NAME}.joblib"), "--sample", str(example / f"{NAME}-sample.csv"),
        "--target", TARGET, "--name", NAME, "--version", "1", "--out", str(out), "--variants", "int8,fp32",
    ]  # fmt: skip
    assert main(argv) == 0
    return {p.name: p.read_bytes() for p in (out / f"{NAME}-1").iterdir()}


@pytest.fixture
def registry(database_url: str, tmp_path: Path) -> Iterator[Registry]:
    db = Database(database_url)
    db.create_all()
    yield Registry(db, BlobStore(tmp_path / "blobs"))
    db.dispose()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def push(reg: Registry, files: dict[str, bytes]) -> None:
    others = {k: v for k, v in files.items() if k not in ("manifest.json", "model.onnx")}
    reg.push_version(files["manifest.json"], files["model.onnx"], others)


def test_variants_are_stored_and_named_in_the_assignment(
    registry: Registry, package: dict[str, bytes]
) -> None:
    push(registry, package)
    info = registry.get_version(NAME, 1)
    assert [v.name for v in info.manifest.variants] == ["int8"]
    assert set(registry.blobs.hashes()) == {sha(data) for data in package.values()}

    deployment = registry.set_deployment("lab", NAME, 1)
    doc = json.loads(registry.assignment_document(deployment))
    stable = doc["stable"]
    # What an agent without variants reads: the generic files, as before.
    assert stable["model"] == f"models/{NAME}/1/model.onnx"
    assert stable["sha256"] == sha(package["model.onnx"])
    assert stable["variant"] == "fp32"
    assert stable["variants"] == [
        {
            "name": "int8",
            "requires": ["cpu:vnni|cpu:dotprod"],
            "manifest": f"models/{NAME}/1/manifest.int8.json",
            "manifest_sha256": sha(package["manifest.int8.json"]),
            "model": f"models/{NAME}/1/model.int8.onnx",
            "sha256": sha(package["model.int8.onnx"]),
        }
    ]
    assignment = Assignment.parse(doc, group="lab")
    assert choose(assignment, "d", frozenset({"arch:aarch64", "cpu:dotprod"})).version.variant == "int8"
    assert choose(assignment, "d", frozenset({"arch:x86_64", "cpu:avx2"})).version.variant == "fp32"


def test_garbage_collection_keeps_variant_blobs_and_delete_removes_them(
    registry: Registry, package: dict[str, bytes]
) -> None:
    push(registry, package)
    assert registry.collect_garbage() == []
    assert len(registry.blobs.hashes()) == 4
    registry.delete_version(NAME, 1)
    assert registry.blobs.hashes() == []


def _rehash(files: dict[str, bytes], variant_manifest: bytes) -> dict[str, bytes]:
    """The package with the int8 manifest replaced, the generic manifest's listing updated."""
    doc = json.loads(files["manifest.json"])
    doc["variants"][0]["manifest_sha256"] = sha(variant_manifest)
    return {**files, "manifest.int8.json": variant_manifest, "manifest.json": json.dumps(doc).encode()}


def _edited(files: dict[str, bytes], key: str, value: object) -> bytes:
    doc = json.loads(files["manifest.int8.json"])
    doc[key] = value
    return json.dumps(doc).encode()


def _without_int8_model(f: dict[str, bytes]) -> dict[str, bytes]:
    return {k: v for k, v in f.items() if k != "model.int8.onnx"}


def _manifest_changed(f: dict[str, bytes]) -> dict[str, bytes]:
    return {**f, "manifest.int8.json": f["manifest.int8.json"] + b" "}


def _model_swapped(f: dict[str, bytes]) -> dict[str, bytes]:
    return {**f, "model.int8.onnx": f["model.onnx"]}


INT4 = {"name": "int4", "requires": []}
NO_REQUIREMENTS = {"name": "int8", "requires": []}


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize(
    ("change", "message"),
    [
        pytest.param(_without_int8_model, "has no 'model.int8.onnx'", id="missing-file"),
        pytest.param(_manifest_changed, "not the file manifest.json lists", id="manifest-hash"),
        pytest.param(_model_swapped, "belongs to another model", id="model-swapped"),
        pytest.param(lambda f: _rehash(f, _edited(f, "version", 2)), "not wine v1", id="other-version"),
        pytest.param(lambda f: _rehash(f, _edited(f, "variant", INT4)), "variant 'int8'", id="other-name"),
        pytest.param(
            lambda f: _rehash(f, _edited(f, "variant", NO_REQUIREMENTS)),
            "variant.requires",
            id="other-requires",
        ),
    ],
)
def test_bad_variants_are_refused_and_nothing_is_stored(
    registry: Registry, package: dict[str, bytes], change: object, message: str
) -> None:
    files = change(package)  # type: ignore[operator]
    with pytest.raises(PackageRejected, match=message):
        push(registry, files)
    assert registry.list_models() == []
    assert registry.blobs.hashes() == []


def test_variant_digests_reads_only_the_listing() -> None:
    assert variant_digests('{"variants": [{"sha256": "a", "manifest_sha256": "b"}, 3]}') == {"a", "b"}
    assert variant_digests("not json") == set()
    assert variant_digests('{"model": {"sha256": "c"}}') == set()


def test_an_uploaded_archive_gives_the_listed_variant_files(package: dict[str, bytes]) -> None:
    import io
    import tarfile

    from hub.api.upload import read_package_tar

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in {**package, "unlisted.bin": b"x"}.items():
            info = tarfile.TarInfo(f"wine-1/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    upload = read_package_tar(buf.getvalue(), 1 << 24)
    assert upload.manifest == package["manifest.json"] and upload.model == package["model.onnx"]
    assert upload.files == {k: package[k] for k in ("manifest.int8.json", "model.int8.onnx")}


def test_files_to_sign_and_their_targets(package: dict[str, bytes]) -> None:
    from agent.package.manifest import parse_manifest
    from hub.registry.variants import files_to_sign, variant_targets

    manifest = parse_manifest(json.loads(package["manifest.json"]))
    assert files_to_sign(manifest, package) == {
        "manifest.int8.json": package["manifest.int8.json"],
        "model.int8.onnx": package["model.int8.onnx"],
    }
    assert variant_targets(NAME, 1, manifest) == [
        f"models/{NAME}/1/manifest.int8.json",
        f"models/{NAME}/1/model.int8.onnx",
    ]
