"""The on-disk store of installed model versions.

Layout under `data_dir`:

    models/<name>/<version>/manifest.json
    models/<name>/<version>/<model file>
    staging/                      work area; never read as installed

A version directory appears by one `rename` from staging after every file in it
was written and fsynced, so a crash mid-install leaves no half version behind
(leftovers in staging are swept at start). Installed versions are immutable.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from agent.errors import PackageError
from agent.fsutil import fsync_dir
from agent.package.manifest import MANIFEST_FILE, Manifest, parse_manifest

log = logging.getLogger(__name__)

MAX_MANIFEST_BYTES = 16 * 1024 * 1024
MAX_MODEL_BYTES = 2 * 1024 * 1024 * 1024


@dataclass(frozen=True)
class InstalledVersion:
    manifest: Manifest
    directory: Path

    @property
    def model_path(self) -> Path:
        return self.directory / self.manifest.model.file


def sha256_file(path: Path) -> str:
    # Imported here: hashlib brings OpenSSL's digests (0.7 MB resident), and the serving daemon
    # only reads installed manifests; installs (the CLI, the updater) hash.
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(directory: Path) -> Manifest:
    path = directory / MANIFEST_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise PackageError(f"{directory}: no {MANIFEST_FILE}") from None
    except OSError as exc:
        raise PackageError(f"{path}: cannot read the manifest ({exc.strerror})") from exc
    if len(raw) > MAX_MANIFEST_BYTES:
        raise PackageError(f"{path}: manifest larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise PackageError(f"{path}: not valid JSON ({exc})") from exc
    return parse_manifest(doc)


def verify_package_dir(directory: Path) -> Manifest:
    """Check a package directory: manifest valid, model file present with the stated size and hash."""
    manifest = read_manifest(directory)
    model = directory / manifest.model.file
    if not model.is_file():
        raise PackageError(f"{directory}: model file {manifest.model.file!r} is missing")
    size = model.stat().st_size
    if size != manifest.model.size:
        raise PackageError(
            f"{model}: size {size} does not match the manifest ({manifest.model.size}); "
            "the package is corrupt or truncated"
        )
    if sha256_file(model) != manifest.model.sha256:
        raise PackageError(f"{model}: SHA-256 does not match the manifest; the package is corrupt")
    return manifest


def _extract_tar(archive: Path, into: Path) -> Path:
    """Extract a package archive safely (regular files only, no paths outside `into`)."""
    import shutil
    import tarfile  # only installs need it; the serving daemon does not load it

    try:
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
            total = sum(m.size for m in members)
            if total > MAX_MODEL_BYTES + MAX_MANIFEST_BYTES:
                raise PackageError(f"{archive}: archive too large ({total} bytes)")
            for m in members:
                name = Path(m.name).name  # flatten: a package is a flat set of files
                if name.startswith("."):
                    continue
                src = tar.extractfile(m)
                if src is None:
                    continue
                with (into / name).open("wb") as dst:
                    shutil.copyfileobj(src, dst)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise PackageError(f"{archive}: not a readable package archive ({exc})") from exc
    return into


def write_package_tar(directory: Path, archive: Path) -> None:
    """Pack a package directory into a tar file (manifest first, then the model, then the files
    of the hardware variants the manifest lists, each checked against its listed SHA-256)."""
    import io
    import tarfile

    manifest = read_manifest(directory)
    names = [MANIFEST_FILE, manifest.model.file]
    for v in manifest.variants:
        for name, digest in ((v.manifest, v.manifest_sha256), (v.model, v.sha256)):
            path = directory / name
            if not path.is_file() or sha256_file(path) != digest:
                raise PackageError(
                    f"{path}: variant {v.name}'s file is missing or not the one the manifest lists"
                )
            names.append(name)
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w") as tar:
        for name in names:
            data = (directory / name).read_bytes()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))


class Store:
    """Installed model versions under `data_dir/models`."""

    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir / "models"
        self.staging = data_dir / "staging"

    def prepare(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.staging.mkdir(parents=True, exist_ok=True)
        for leftover in self.staging.iterdir():
            log.info("removing leftover staging entry %s", leftover)
            if leftover.is_dir():
                # shutil and tempfile (with bz2, lzma and random: about 0.8 MB of RSS) are imported
                # where the store changes, not by a daemon that serves what is installed.
                import shutil

                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)

    def version_dir(self, name: str, version: int) -> Path:
        return self.root / name / str(version)

    def install(self, package: Path) -> InstalledVersion:
        """Verify a package (directory or tar) and install it; idempotent for an identical package."""
        import shutil
        import tempfile

        self.root.mkdir(parents=True, exist_ok=True)
        self.staging.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="install-", dir=self.staging))
        try:
            if package.is_dir():
                src = package
            elif package.is_file():
                (work / "unpacked").mkdir()
                src = _extract_tar(package, work / "unpacked")
            else:
                raise PackageError(f"{package}: no such package file or directory")
            manifest = verify_package_dir(src)
            target = self.version_dir(manifest.name, manifest.version)
            if target.exists():
                existing = read_manifest(target)
                if existing.model.sha256 == manifest.model.sha256:
                    log.info("%s version %d is already installed", manifest.name, manifest.version)
                    return InstalledVersion(existing, target)
                raise PackageError(
                    f"{manifest.name} version {manifest.version} is already installed with a "
                    "different model; versions are immutable, publish a new version number"
                )
            ready = work / "ready"
            ready.mkdir()
            for name in (MANIFEST_FILE, manifest.model.file):
                shutil.copyfile(src / name, ready / name)
                with (ready / name).open("rb") as f:
                    os.fsync(f.fileno())
            fsync_dir(ready)
            target.parent.mkdir(parents=True, exist_ok=True)
            ready.rename(target)
            fsync_dir(target.parent)
            log.info("installed %s version %d", manifest.name, manifest.version)
            return InstalledVersion(manifest, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def get(self, name: str, version: int) -> InstalledVersion:
        """One installed version (its manifest read and checked); PackageError if it is not there."""
        directory = self.version_dir(name, version)
        manifest = read_manifest(directory)
        if (manifest.name, manifest.version) != (name, version):
            raise PackageError(f"{directory}: its manifest says {manifest.name} version {manifest.version}")
        return InstalledVersion(manifest, directory)

    def remove(self, name: str, version: int) -> bool:
        """Delete an installed version: renamed out of `models/` first (one atomic step), then
        deleted, so a crash never leaves half a version that looks installed."""
        import shutil
        import tempfile

        target = self.version_dir(name, version)
        if not target.is_dir():
            return False
        self.staging.mkdir(parents=True, exist_ok=True)
        doomed = Path(tempfile.mkdtemp(prefix=f"remove-{name}-{version}-", dir=self.staging))
        target.rename(doomed / "version")
        fsync_dir(target.parent)
        shutil.rmtree(doomed, ignore_errors=True)
        log.info("removed %s version %d from the store", name, version)
        return True

    def installed(self) -> list[InstalledVersion]:
        """Every valid installed version; invalid ones are logged and skipped, never fatal."""
        found: list[InstalledVersion] = []
        if not self.root.is_dir():
            return found
        for model_dir in sorted(self.root.iterdir()):
            if not model_dir.is_dir():
                continue
            for version_dir in sorted(model_dir.iterdir(), key=lambda p: p.name):
                if not version_dir.is_dir() or not version_dir.name.isdigit():
                    continue
                try:
                    manifest = read_manifest(version_dir)
                except PackageError as exc:
                    log.error("skipping %s: %s", version_dir, exc)
                    continue
                if (manifest.name, str(manifest.version)) != (model_dir.name, version_dir.name):
                    log.error(
                        "skipping %s: its manifest says %s version %d",
                        version_dir,
                        manifest.name,
                        manifest.version,
                    )
                    continue
                found.append(InstalledVersion(manifest, version_dir))
        return found
