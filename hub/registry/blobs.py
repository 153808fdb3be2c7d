"""Content-addressed blob store on the filesystem.

Layout under `root`:

    ab/abcdef...                  the blob whose SHA-256 (64 lowercase hex digits) is abcdef...
    .tmp/                         uploads being written by put_stream
    .trash/                       blobs taken out by `take`, until the caller purges or restores them

`Blobs` is the interface the registry uses; `BlobStore` here is the filesystem's (the default),
`hub.registry.s3blobs.S3BlobStore` an S3-compatible bucket's (`blob_store = "s3"`).

Invariants: a file under its final name is complete, fsynced, and hashes to that name (it
appears by one rename); blobs are immutable, so writing an existing one is a no-op. Nothing
here knows which blobs are in use: the registry decides what to delete, and uses `take` /
`restore` so that a delete it cannot commit to the database can be undone.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

from agent.fsutil import fsync_dir, write_atomic
from hub.errors import BlobCorruptError, NotFoundError

HASH_RE = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_hash(digest: str) -> str:
    """`digest` if it is 64 lowercase hex digits; ValueError otherwise (a caller's bug)."""
    if not HASH_RE.fullmatch(digest):
        raise ValueError(f"not a SHA-256 hex digest: {digest!r}")
    return digest


class Blobs(Protocol):
    """Content-addressed, immutable blobs: what the registry needs from a store.

    `take` makes a delete undoable: it returns a handle (None if the blob is absent) that the
    caller passes to `purge` once its database change is committed, or to `restore` if not.
    """

    def exists(self, digest: str) -> bool: ...
    def put(self, data: bytes) -> str: ...
    def put_stream(self, chunks: Iterable[bytes]) -> tuple[str, int]: ...
    def stream(self, digest: str) -> Iterator[bytes]: ...
    def read(self, digest: str, *, verify: bool = True) -> bytes: ...
    def delete(self, digest: str) -> bool: ...
    def take(self, digest: str) -> Any: ...
    def restore(self, digest: str, held: Any) -> None: ...
    def purge(self, held: Any) -> None: ...
    def hashes(self) -> list[str]: ...
    def sweep(self) -> int: ...


class BlobStore:
    """Blobs as files under `root` (see the module's docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._tmp = root / ".tmp"
        self._trash = root / ".trash"

    def path(self, digest: str) -> Path:
        check_hash(digest)
        return self.root / digest[:2] / digest

    def exists(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def put(self, data: bytes) -> str:
        """Store `data`; returns its SHA-256. Atomic and durable; a no-op if already stored."""
        digest = sha256_hex(data)
        target = self.path(digest)
        if not target.is_file():
            write_atomic(target, data, mode=0o444)
        return digest

    def put_stream(self, chunks: Iterable[bytes]) -> tuple[str, int]:
        """Store the concatenation of `chunks` without holding it in memory; (sha256, size).

        The caller enforces size limits (e.g. by stopping its iterator with an error).
        """
        self._tmp.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="put-", dir=self._tmp)
        tmp = Path(name)
        try:
            digest = hashlib.sha256()
            size = 0
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    digest.update(chunk)
                    size += len(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            hexdigest = digest.hexdigest()
            target = self.path(hexdigest)
            if target.is_file():
                tmp.unlink()
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp.chmod(0o444)
                tmp.replace(target)
                fsync_dir(target.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return hexdigest, size

    def stream(self, digest: str) -> Iterator[bytes]:
        """The blob's bytes in chunks, unverified; NotFoundError (at once) if absent."""
        try:
            f = self.path(digest).open("rb")
        except FileNotFoundError:
            raise NotFoundError(f"blob {digest} is not in the blob store") from None
        return _chunks(f)

    def read(self, digest: str, *, verify: bool = True) -> bytes:
        """The blob's bytes; NotFoundError if absent, BlobCorruptError if it no longer matches."""
        try:
            data = self.path(digest).read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"blob {digest} is not in the blob store") from None
        if verify and (actual := sha256_hex(data)) != digest:
            raise BlobCorruptError(
                f"blob {digest} is corrupt: its content hashes to {actual}; restore it from a backup "
                "or push the version again"
            )
        return data

    def delete(self, digest: str) -> bool:
        """Remove a blob; True if it was there."""
        target = self.path(digest)
        try:
            target.unlink()
        except FileNotFoundError:
            return False
        fsync_dir(target.parent)
        return True

    def take(self, digest: str) -> Path | None:
        """Move a blob out of the store into the trash; the trash path, or None if absent.

        The blob is gone from `path(digest)` at once; `purge` deletes it for good, `restore`
        puts it back (when the change that removed it could not be committed).
        """
        self._trash.mkdir(parents=True, exist_ok=True)
        held = self._trash / f"{check_hash(digest)}.{secrets.token_hex(4)}"
        try:
            self.path(digest).rename(held)
        except FileNotFoundError:
            return None
        return held

    def restore(self, digest: str, held: Path) -> None:
        target = self.path(digest)
        if target.is_file():  # stored again meanwhile: same bytes by construction
            held.unlink(missing_ok=True)
        else:
            held.rename(target)

    @staticmethod
    def purge(held: Path) -> None:
        held.unlink(missing_ok=True)

    def hashes(self) -> list[str]:
        """Every stored blob's SHA-256, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(
            f.name
            for d in self.root.iterdir()
            if len(d.name) == 2 and d.is_dir()
            for f in d.iterdir()
            if HASH_RE.fullmatch(f.name) and f.name.startswith(d.name)
        )

    def sweep(self) -> int:
        """Tidy up after a crash; call at start-up, before serving. Returns how many entries.

        Half-written uploads are removed. Blobs still in the trash are put back: whether the
        delete that took them was committed is unknown here, and a blob kept too long costs
        space (the registry's garbage collection finds it) while one lost too early costs a
        version.
        """
        count = 0
        if self._tmp.is_dir():
            for leftover in self._tmp.iterdir():
                leftover.unlink(missing_ok=True)
                count += 1
        if self._trash.is_dir():
            for held in self._trash.iterdir():
                digest = held.name.partition(".")[0]
                if HASH_RE.fullmatch(digest):
                    self.path(digest).parent.mkdir(parents=True, exist_ok=True)
                    self.restore(digest, held)
                else:
                    held.unlink(missing_ok=True)
                count += 1
        return count


def _chunks(f: Any) -> Iterator[bytes]:
    with f:
        yield from iter(lambda: f.read(_CHUNK), b"")
