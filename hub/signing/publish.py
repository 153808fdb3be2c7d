"""Publishing the repository's files to an object store, for any static host or CDN to serve.

The hub signs into its TUF directory (hub.signing.layout) as always; a publisher then makes
`<prefix>tuf/metadata/...` and `<prefix>tuf/targets/...` in a bucket the same tree as the
directory, so devices can update from the bucket (or a CDN in front of it) with the hub
down: they verify everything against their provisioned root, not against who served it.

Order, so that a reader of the bucket never sees metadata naming a file that is not there:
target files first, then root versions, then the other versioned metadata (targets roles,
then snapshots, oldest first), then `root.json`, and `timestamp.json` last: the timestamp is
the commit point, as on disk. Files that left the directory (`prune()`) are deleted from the
bucket after that. A publish that fails part way leaves the bucket at an older consistent state
(its timestamp still names what was there); the next publish uploads what is missing.

Cache headers: versioned metadata and hash-named targets never change (cached forever,
`immutable`); `timestamp.json` and `root.json` are cached for MUTABLE_MAX_AGE_S only, so a CDN
shows a new deployment or a rollback within that time.

Immutable names once uploaded are remembered per process, so a publish after an edit uploads
only that edit's files; the first publish of a process lists the bucket once. A hash-named
target found there is the same file by construction; a versioned metadata file is trusted only
if the listing's ETag is the MD5 of the local file (otherwise, e.g. the files of an earlier
repository under the same prefix, it is uploaded again). Objects under `tuf/` that the
directory does not hold are deleted: the bucket's `tuf/` is the directory's mirror.

With `tuf_state = "s3"` the direction is reversed between edits: the bucket is the source of
truth and hub.signing.mirror pulls the directory to it before each edit, then `assume()` tells
the publisher what the bucket holds, so the edit's publish uploads only the edit's files (and a
host never deletes what another host published: its directory holds all of it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

from hub.signing.layout import ROOT, SNAPSHOT, TIMESTAMP, Layout

TUF = "tuf/"
MUTABLE_MAX_AGE_S = 60
IMMUTABLE_CACHE = "public, max-age=31536000, immutable"
MUTABLE_CACHE = f"public, max-age={MUTABLE_MAX_AGE_S}"
MUTABLE = ("metadata/root.json", f"metadata/{TIMESTAMP}.json")


class ObjectSink(Protocol):
    """Where files are published (hub.objectstore.s3.S3Bucket); names are relative keys."""

    def put(
        self,
        name: str,
        body: bytes | IO[bytes],
        *,
        content_type: str = ...,
        cache_control: str = ...,
    ) -> None: ...

    def delete(self, name: str) -> None: ...

    def listing(self, under: str = "") -> Iterator[tuple[str, str]]:
        """(name, ETag) of every object whose name starts with `under`."""
        ...


@dataclass(frozen=True)
class PublishReport:
    uploaded: tuple[str, ...]
    """Names under tuf/, in upload order."""
    deleted: tuple[str, ...]


class Publisher:
    """Mirrors one repository directory to `<sink>/tuf/`. Call `publish` with the repository
    lock held (SignedRepository does), so two publishes never interleave."""

    def __init__(self, sink: ObjectSink) -> None:
        self.sink = sink
        self._published: set[str] | None = None  # immutable names known to be in the sink
        self._mutable: dict[str, str] = {}  # name -> sha256 of the bytes last uploaded

    def publish(self, layout: Layout) -> PublishReport:
        local = dict(local_files(layout))
        if self._published is None:
            self._published = self._already_there(local)
        uploaded: list[str] = []
        for name in publish_order(local):
            path = local[name]
            if name in MUTABLE:
                data = path.read_bytes()
                digest = hashlib.sha256(data).hexdigest()
                if self._mutable.get(name) == digest:
                    continue
                self.sink.put(TUF + name, data, content_type="application/json", cache_control=MUTABLE_CACHE)
                self._mutable[name] = digest
            elif name not in self._published:
                with path.open("rb") as f:
                    self.sink.put(
                        TUF + name, f, content_type=_content_type(name), cache_control=IMMUTABLE_CACHE
                    )
                self._published.add(name)
            else:
                continue
            uploaded.append(name)
        deleted = sorted(self._published - local.keys())
        for name in deleted:
            self.sink.delete(TUF + name)
            self._published.discard(name)
        return PublishReport(tuple(uploaded), tuple(deleted))

    def assume(self, immutable: frozenset[str], mutable: dict[str, bytes]) -> None:
        """Take the bucket's contents as known (after hub.signing.mirror pulled the directory to
        them): the next publish uploads only what is signed after this, without a listing."""
        self._published = set(immutable)
        self._mutable = {name: hashlib.sha256(data).hexdigest() for name, data in mutable.items()}

    def has_published(self, name: str, data: bytes) -> bool:
        """Whether this process last uploaded `data` as the mutable file `name`."""
        return self._mutable.get(name) == hashlib.sha256(data).hexdigest()

    def _already_there(self, local: dict[str, Path]) -> set[str]:
        """The immutable names in the sink that need no upload (see the module's docstring)."""
        found = set()
        for key, etag in self.sink.listing(TUF):
            name = key.removeprefix(TUF)
            if name in MUTABLE:
                continue  # compared by content in publish()
            path = local.get(name)
            if name.startswith("metadata/") and path is not None and etag != _md5(path):
                continue
            found.add(name)
        return found


def publish_order(names: Iterator[str] | dict[str, Path] | set[str]) -> list[str]:
    """`names` (relative to the repository directory) in the order they must become visible."""

    def rank(name: str) -> tuple[int, int, str]:
        if name.startswith("targets/"):
            return (0, 0, name)
        base = name.removeprefix("metadata/")
        if name == f"metadata/{TIMESTAMP}.json":
            return (5, 0, name)
        if name == "metadata/root.json":
            return (4, 0, name)
        version, _, role = base.partition(".")
        role = role.removesuffix(".json")
        number = int(version) if version.isdigit() else 0
        if role == ROOT:
            return (1, number, name)
        if role == SNAPSHOT:
            return (3, number, name)
        return (2, number, name)

    return sorted(names, key=rank)


def local_files(layout: Layout) -> Iterator[tuple[str, Path]]:
    for top in (layout.metadata_dir, layout.targets_dir):
        if not top.is_dir():
            continue
        for path in top.rglob("*"):
            # write_atomic's temp files start with '.'; they are never part of the repository.
            if path.is_file() and not path.name.startswith("."):
                yield path.relative_to(layout.base).as_posix(), path


def _content_type(name: str) -> str:
    return "application/json" if name.endswith(".json") else "application/octet-stream"


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()
