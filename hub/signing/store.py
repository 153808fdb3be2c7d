"""The repository's metadata and target files on disk, and the one-writer lock.

Invariants:
- A versioned file (`<v>.<role>.json`) is written once and never replaced: a version number,
  once on disk, is never given to other content (even if a crash kept it from being
  published), so a client can never see two different files under one name.
  With the object store as the source of truth (`tuf_state = "s3"`, hub.signing.mirror) the
  rule holds for the bucket instead: the directory is a copy that a pull makes equal to the
  bucket, so a file written here whose publish failed is removed (by the failed operation, or
  by the next pull), and one the bucket holds with other bytes is replaced by the bucket's.
- `timestamp.json` is the commit point: it names the snapshot, the snapshot names every
  targets role's version. Anything newer on disk that the timestamp does not reach was
  never published.
- The newest root is the highest `<v>.root.json` on disk, because that is what clients walk
  to; `root.json` is a copy of it for provisioning.
- Every write is atomic and durable (temp file, fsync, rename, fsync of the directory).

Parsed versioned files are cached per role: they never change, so the cache cannot go stale
even with several hub processes sharing the directory; a pull that replaced files calls
`forget()`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

from tuf.api.serialization import DeserializationError

from agent.fsutil import write_atomic
from hub.errors import RepositoryStateError, SigningError
from hub.signing._tuf import Metadata, Root, Snapshot, Targets, Timestamp
from hub.signing.layout import ROOT, SNAPSHOT, TIMESTAMP, Layout
from hub.signing.lock import FileLock

_S = TypeVar("_S", Root, Timestamp, Snapshot, Targets)
_FILE_MODE = 0o644


class MetadataStore:
    """Reads and writes the metadata of one repository directory (see `layout`)."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self._cache: dict[str, tuple[int, Metadata[Any]]] = {}
        # (role, version, delegator version) found correctly signed; see Edit.is_trusted().
        self.trusted: set[tuple[str, int, int]] = set()
        # Set by every write and removal: the files changed since the last publish (hub.signing.publish).
        self.changed = False
        # Every path written since the caller last emptied it (an operation undone when its
        # publish fails: SignedRepository with a mirror).
        self.written: list[Path] = []

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the repository's exclusive lock (across threads and processes) for the block."""
        with FileLock(self.layout.lock_path).hold():
            yield

    def forget(self) -> None:
        """Drop what was read from files that a pull may have replaced (hub.signing.mirror)."""
        self._cache.clear()
        self.trusted.clear()

    def has_metadata(self) -> bool:
        d = self.layout.metadata_dir
        return d.is_dir() and any(d.iterdir())

    def require_published(self) -> None:
        if not self.layout.metadata_file(TIMESTAMP).is_file():
            raise RepositoryStateError(
                f"no signed repository in {self.layout.base}: run `outpost-hub init` (create()) first"
            )

    # -- reading ------------------------------------------------------------------------

    def root(self) -> Metadata[Root]:
        """The newest root version on disk."""
        cached = self._cache.get(ROOT)
        if cached is None:
            md = self._read(self.layout.root_json, Root)
            version = md.signed.version
        else:
            version, md = cached
        while self.layout.metadata_file(ROOT, version + 1).is_file():
            version += 1
            md = self._read(self.layout.metadata_file(ROOT, version), Root)
        self._remember(ROOT, md)
        return md

    def timestamp(self) -> Metadata[Timestamp]:
        return self._read(self.layout.metadata_file(TIMESTAMP), Timestamp)

    def snapshot(self, version: int) -> Metadata[Snapshot]:
        return self._versioned(SNAPSHOT, version, Snapshot)

    def targets(self, role: str, version: int) -> Metadata[Targets]:
        return self._versioned(role, version, Targets)

    def next_version(self, role: str, current: int) -> int:
        """The first version above `current` that no file on disk has used."""
        version = current + 1
        while self.layout.metadata_file(role, version).exists():
            version += 1
        return version

    def versions(self) -> dict[str, dict[int, Path]]:
        """Every versioned metadata file on disk: role -> version -> path."""
        found: dict[str, dict[int, Path]] = {}
        for path in self.layout.metadata_dir.glob("*.json"):
            version, _, rest = path.name.partition(".")
            if version.isdigit() and rest.endswith(".json"):
                found.setdefault(rest.removesuffix(".json"), {})[int(version)] = path
        return found

    def _versioned(self, role: str, version: int, kind: type[_S], *, remember: bool = True) -> Metadata[_S]:
        cached = self._cache.get(role)
        if cached is not None and cached[0] == version and isinstance(cached[1].signed, kind):
            return cast("Metadata[_S]", cached[1])
        md = self._read(self.layout.metadata_file(role, version), kind)
        if md.signed.version != version:
            raise SigningError(
                f"{self.layout.metadata_file(role, version)} holds version {md.signed.version}; "
                "the repository directory was altered"
            )
        if remember:
            self._remember(role, md)
        return md

    def old_snapshot(self, version: int) -> Metadata[Snapshot]:
        """A snapshot version, read without displacing the cached current one."""
        return self._versioned(SNAPSHOT, version, Snapshot, remember=False)

    def old_targets(self, role: str, version: int) -> Metadata[Targets]:
        return self._versioned(role, version, Targets, remember=False)

    def remove(self, path: Path) -> None:
        self.changed = True
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise SigningError(f"cannot remove {path}: {exc}") from exc

    def _read(self, path: Path, kind: type[_S]) -> Metadata[_S]:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise RepositoryStateError(f"{path} is missing: the repository is incomplete") from None
        except OSError as exc:
            raise SigningError(f"cannot read {path}: {exc}") from exc
        try:
            md: Metadata[Any] = Metadata.from_bytes(data)
        except DeserializationError as exc:
            raise SigningError(f"{path} is not TUF metadata: {exc}") from exc
        if not isinstance(md.signed, kind):
            raise SigningError(f"{path} holds {md.signed.type} metadata, not {kind.type}")
        return cast("Metadata[_S]", md)

    def _remember(self, role: str, md: Metadata[Any]) -> None:
        self._cache[role] = (md.signed.version, md)

    # -- writing ------------------------------------------------------------------------

    def write(self, role: str, md: Metadata[Any], data: bytes) -> None:
        """Write `data`, the serialised `md`, as a new version of `role` (timestamp: in place)."""
        if role == TIMESTAMP:
            self._write(self.layout.metadata_file(TIMESTAMP), data)
            return
        path = self.layout.metadata_file(role, md.signed.version)
        if path.exists():
            raise SigningError(f"refusing to overwrite {path}: metadata versions are never reused")
        self._write(path, data)
        if role == ROOT:
            self._write(self.layout.root_json, data)
        self._remember(role, md)

    def write_target(self, target_path: str, sha256: str, data: bytes) -> None:
        """Store target bytes under their hash-prefixed name, unless that file already holds them."""
        path = self.layout.target_file(target_path, sha256)
        try:
            if path.stat().st_size == len(data) and _sha256_file(path) == sha256:
                return
        except OSError:
            pass  # absent or unreadable: (re)write it
        self._write(path, data)

    def _write(self, path: Path, data: bytes) -> None:
        self.changed = True
        self.written.append(path)
        try:
            write_atomic(path, data, mode=_FILE_MODE)
        except OSError as exc:
            raise SigningError(f"cannot write {path}: {exc}") from exc


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
