"""agent.package.store: installing real ONNX packages into a data directory in tmp_path.

What matters is what is left on disk: a version directory appears whole or not at all, a
bad package leaves nothing under models/, and an archive cannot write outside the store.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import pytest
from onnx import TensorProto, helper

from agent.errors import PackageError
from agent.package.manifest import MANIFEST_FILE, Manifest, ModelFile, TensorSpec
from agent.package.store import Store, sha256_file, verify_package_dir, write_package_tar


def onnx_model(op: str = "Identity") -> bytes:
    """y = x (Identity) or y = x + x (Add), FP32 [-1, 2]: small, real, valid ONNX."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])
    node = helper.make_node(op, ["x"] if op == "Identity" else ["x", "x"], ["y"])
    graph = helper.make_graph([node], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def make_package(directory: Path, *, name: str = "iris", version: int = 1, op: str = "Identity") -> Path:
    directory.mkdir(parents=True)
    raw = onnx_model(op)
    (directory / "model.onnx").write_bytes(raw)
    manifest = Manifest(
        name=name,
        version=version,
        model=ModelFile("model.onnx", hashlib.sha256(raw).hexdigest(), len(raw)),
        inputs=(TensorSpec("x", "FP32", (-1, 2)),),
        outputs=(TensorSpec("y", "FP32", (-1, 2)),),
    )
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest.to_json()))
    return directory


@pytest.fixture
def package(tmp_path: Path) -> Path:
    return make_package(tmp_path / "pkg")


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "data")
    s.prepare()
    return s


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def assert_nothing_installed(store: Store) -> None:
    assert tree(store.root) == []
    assert tree(store.staging) == []  # the install's work area was cleaned up too
    assert store.installed() == []


def tar_of(members: list[tuple[str, bytes]], path: Path) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


# -- installing ----------------------------------------------------------------------------------


def test_install_from_a_directory(store: Store, package: Path) -> None:
    got = store.install(package)
    assert got.directory == store.root / "iris" / "1"
    assert got.manifest.name == "iris"
    assert got.manifest.version == 1
    assert got.model_path == got.directory / "model.onnx"
    assert got.model_path.read_bytes() == (package / "model.onnx").read_bytes()
    assert sorted(p.name for p in got.directory.iterdir()) == ["manifest.json", "model.onnx"]
    assert tree(store.staging) == []
    assert [(v.manifest, v.directory) for v in store.installed()] == [(got.manifest, got.directory)]
    assert verify_package_dir(got.directory) == got.manifest


def test_install_from_a_tar(store: Store, package: Path, tmp_path: Path) -> None:
    archive = tmp_path / "out" / "iris-1.tar"
    write_package_tar(package, archive)
    with tarfile.open(archive) as tar:
        assert tar.getnames() == ["manifest.json", "model.onnx"]  # manifest first: streamable
    got = store.install(archive)
    assert got.directory == store.root / "iris" / "1"
    assert sha256_file(got.model_path) == got.manifest.model.sha256
    assert tree(store.staging) == []


def test_install_from_a_gzipped_tar(store: Store, package: Path, tmp_path: Path) -> None:
    archive = tmp_path / "iris-1.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("manifest.json", "model.onnx"):
            tar.add(package / name, arcname=f"iris-1/{name}")  # a top folder is flattened away
    assert store.install(archive).model_path.is_file()


def test_reinstalling_the_same_package_is_a_no_op(store: Store, package: Path, tmp_path: Path) -> None:
    first = store.install(package)
    before = {p: p.stat().st_mtime_ns for p in first.directory.iterdir()}
    again = store.install(package)
    archive = tmp_path / "iris.tar"
    write_package_tar(package, archive)
    from_tar = store.install(archive)
    assert again.directory == from_tar.directory == first.directory
    assert again.manifest == first.manifest
    assert {p: p.stat().st_mtime_ns for p in first.directory.iterdir()} == before  # not rewritten
    assert len(store.installed()) == 1


def test_same_version_with_a_different_model_is_refused(store: Store, package: Path, tmp_path: Path) -> None:
    first = store.install(package)
    original = first.model_path.read_bytes()
    other = make_package(tmp_path / "other", op="Add")
    with pytest.raises(PackageError, match="iris version 1 is already installed with a different model"):
        store.install(other)
    assert first.model_path.read_bytes() == original  # installed versions are immutable
    assert tree(store.staging) == []


def test_next_version_installs_beside_the_first(store: Store, package: Path, tmp_path: Path) -> None:
    store.install(package)
    store.install(make_package(tmp_path / "v2", version=2, op="Add"))
    store.install(make_package(tmp_path / "wine", name="wine"))
    got = [(v.manifest.name, v.manifest.version) for v in store.installed()]
    assert got == [("iris", 1), ("iris", 2), ("wine", 1)]


def test_install_creates_the_store_without_prepare(tmp_path: Path, package: Path) -> None:
    store = Store(tmp_path / "fresh")
    assert store.installed() == []
    assert store.install(package).model_path.is_file()


# -- refusing bad packages -----------------------------------------------------------------------


def flip_byte(path: Path, offset: int = 10) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))


def corrupt_model(pkg: Path) -> None:
    flip_byte(pkg / "model.onnx")


def truncate_model(pkg: Path) -> None:
    raw = (pkg / "model.onnx").read_bytes()
    (pkg / "model.onnx").write_bytes(raw[:-3])


def remove_model(pkg: Path) -> None:
    (pkg / "model.onnx").unlink()


def remove_manifest(pkg: Path) -> None:
    (pkg / MANIFEST_FILE).unlink()


def break_manifest_json(pkg: Path) -> None:
    (pkg / MANIFEST_FILE).write_text('{"name": "iris",')


def invalid_manifest(pkg: Path) -> None:
    doc = json.loads((pkg / MANIFEST_FILE).read_text())
    doc["version"] = 0
    (pkg / MANIFEST_FILE).write_text(json.dumps(doc))


BAD_PACKAGES = [
    pytest.param(corrupt_model, "SHA-256 does not match", id="flipped-byte"),
    pytest.param(truncate_model, "does not match the manifest", id="truncated-model"),
    pytest.param(remove_model, "model file 'model.onnx' is missing", id="no-model"),
    pytest.param(remove_manifest, "no manifest.json", id="no-manifest"),
    pytest.param(break_manifest_json, "not valid JSON", id="manifest-not-json"),
    pytest.param(invalid_manifest, "version must be a positive integer", id="manifest-invalid"),
]


@pytest.mark.parametrize(("damage", "message"), BAD_PACKAGES)
@pytest.mark.parametrize("as_tar", [False, True], ids=["dir", "tar"])
def test_bad_package_is_refused_and_leaves_nothing(
    store: Store, package: Path, tmp_path: Path, damage: Callable[[Path], None], message: str, as_tar: bool
) -> None:
    damage(package)
    source = package
    if as_tar:
        source = tmp_path / "bad.tar"
        members = [(p.name, p.read_bytes()) for p in sorted(package.iterdir())]
        tar_of(members, source)
    with pytest.raises(PackageError, match=message):
        store.install(source)
    assert_nothing_installed(store)


def test_missing_package_path(store: Store, tmp_path: Path) -> None:
    with pytest.raises(PackageError, match="no such package"):
        store.install(tmp_path / "nope.tar")


def test_truncated_tar_is_refused(store: Store, package: Path, tmp_path: Path) -> None:
    archive = tmp_path / "iris.tar"
    write_package_tar(package, archive)
    raw = archive.read_bytes()
    # Cut inside the model's data: the headers read fine, the contents end early.
    model_offset = raw.index(onnx_model()[:16])
    archive.write_bytes(raw[: model_offset + 20])
    with pytest.raises(PackageError, match="not a readable package archive"):
        store.install(archive)
    assert_nothing_installed(store)


def test_file_that_is_not_a_tar_is_refused(store: Store, tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"\x89PNG not a tar at all" * 50)
    with pytest.raises(PackageError, match="not a readable package archive"):
        store.install(junk)
    assert_nothing_installed(store)


def test_tar_member_names_cannot_write_outside_the_store(store: Store, package: Path, tmp_path: Path) -> None:
    outside = tmp_path / "victim"
    outside.mkdir()
    archive = tar_of(
        [
            ("../manifest.json", (package / MANIFEST_FILE).read_bytes()),
            ("../../model.onnx", (package / "model.onnx").read_bytes()),
            ("../evil", b"owned"),
            ("../../victim/evil", b"owned"),
            (str(outside / "evil-absolute"), b"owned"),
            ("a/../../../evil-nested", b"owned"),
        ],
        tmp_path / "traversal.tar",
    )
    before = tree(tmp_path)
    got = store.install(archive)  # names are flattened: the package itself is fine
    assert sorted(p.name for p in got.directory.iterdir()) == ["manifest.json", "model.onnx"]
    new = set(tree(tmp_path)) - set(before)
    # Everything new lives under the data directory, and no stray file came along.
    assert all(p.startswith("data/models/") for p in new), new
    assert not [p for p in tree(tmp_path) if "evil" in p]


def test_tar_symlink_is_not_followed(store: Store, package: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"not a model")
    archive = tmp_path / "link.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(package / MANIFEST_FILE, arcname=MANIFEST_FILE)
        link = tarfile.TarInfo("model.onnx")
        link.type = tarfile.SYMTYPE
        link.linkname = str(secret)
        tar.addfile(link)
    with pytest.raises(PackageError, match="is missing"):
        store.install(archive)
    assert_nothing_installed(store)


def test_crash_while_copying_leaves_no_version(
    store: Store, package: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A failure between the first and the last file must not leave a half version behind:
    # the version directory appears by one rename, after everything was written.
    real_copy = shutil.copyfile
    calls: list[str] = []

    def failing_copy(src: Any, dst: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(Path(dst).name)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_copy(src, dst, *args, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", failing_copy)  # the store calls shutil.copyfile
    with pytest.raises(OSError, match="No space left"):
        store.install(package)
    assert calls == ["manifest.json", "model.onnx"]
    assert_nothing_installed(store)


# -- start-up: prepare and installed -------------------------------------------------------------


def test_prepare_sweeps_staging_leftovers(tmp_path: Path, package: Path) -> None:
    store = Store(tmp_path / "data")
    store.prepare()
    installed = store.install(package)
    # What a power cut mid-install would leave: a half-written work dir and a stray file.
    half = store.staging / "install-abc123" / "ready"
    half.mkdir(parents=True)
    (half / "model.onnx").write_bytes(b"half")
    (store.staging / "stray.tmp").write_bytes(b"x")
    store.prepare()
    assert tree(store.staging) == []
    assert [v.directory for v in store.installed()] == [installed.directory]  # installed ones stay


def test_installed_skips_invalid_version_dirs_without_raising(
    store: Store, package: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = store.install(package)
    # A version directory whose manifest is not JSON.
    broken = store.root / "iris" / "2"
    broken.mkdir()
    (broken / MANIFEST_FILE).write_text("{")
    # One with no manifest at all.
    (store.root / "iris" / "3").mkdir()
    # One whose manifest says another version: it was copied by hand into the wrong place.
    wrong = store.root / "iris" / "4"
    wrong.mkdir()
    (wrong / MANIFEST_FILE).write_bytes((good.directory / MANIFEST_FILE).read_bytes())
    # Not versions: a non-numeric directory, a file in a model dir, a file at the top.
    (store.root / "iris" / "latest").mkdir()
    (store.root / "iris" / "notes.txt").write_text("x")
    (store.root / "README").write_text("x")
    with caplog.at_level("ERROR", logger="agent.package.store"):
        found = store.installed()
    assert [v.directory for v in found] == [good.directory]
    logged = caplog.text
    assert "iris/2" in logged
    assert "iris/3" in logged
    assert "says iris version 1" in logged


def test_installed_skips_a_version_whose_manifest_is_a_directory(store: Store, package: Path) -> None:
    good = store.install(package)
    odd = store.root / "iris" / "2"
    (odd / MANIFEST_FILE).mkdir(parents=True)
    assert [v.directory for v in store.installed()] == [good.directory]


def test_install_ignores_extra_files_in_the_package(store: Store, package: Path) -> None:
    (package / "notes.txt").write_text("not part of the model")
    got = store.install(package)
    assert sorted(p.name for p in got.directory.iterdir()) == ["manifest.json", "model.onnx"]


def test_written_manifest_is_the_packages(store: Store, package: Path) -> None:
    got = store.install(package)
    doc: dict[str, Any] = json.loads((got.directory / MANIFEST_FILE).read_text())
    assert doc == json.loads((package / MANIFEST_FILE).read_text())


def test_remove_deletes_one_version_and_leaves_the_others(
    store: Store, package: Path, tmp_path: Path
) -> None:
    store.install(package)
    store.install(make_package(tmp_path / "v2", version=2))
    assert store.remove("iris", 1) is True
    assert [i.manifest.version for i in store.installed()] == [2]
    assert not store.version_dir("iris", 1).exists()
    assert list(store.staging.iterdir()) == []  # nothing left behind
    assert store.remove("iris", 1) is False  # already gone: not an error
