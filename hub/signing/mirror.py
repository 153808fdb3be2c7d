"""The object store as the repository's source of truth (`tuf_state = "s3"`): bringing a
repository directory to the bucket's committed state.

Hub processes on different hosts each keep a directory (which their /tuf/ serves and their
signing reads), and one bucket that a `Publisher` (hub.signing.publish) writes in an order that
keeps it consistent, `timestamp.json` last. Under the signing lock, before reading any state,
a signer `pull()`s: afterwards its directory holds exactly the bucket's files, so what it signs
next follows what any host published last, and a version number in the bucket is never given
to other content here. The running hub also pulls every `tuf_sync_interval_s` (without the
signing lock: reading needs none), so its /tuf/ follows deployments made through other hosts.

    mirror.current(layout)   two HEAD requests: do the bucket's timestamp.json and root.json
                             (ETag, the MD5 of a single-part object) match the directory's?
    mirror.pull(layout)      make the directory the bucket's copy (see below)

How a pull stays consistent for readers of the directory (devices on this hub's /tuf/):
`timestamp.json` and `root.json` are read from the bucket *first*, then the bucket is listed;
a publisher uploads every file a timestamp names before that timestamp, so the listing holds
all of them. The metadata to fetch is read into memory and the chain the timestamp commits is
verified (each root by the one before, from the first, then timestamp, snapshot and every
targets role by the keys that delegate to them) before anything is written; then the files are
written in publish order, `root.json` and `timestamp.json` last; files the bucket no longer
holds (pruned, or written here by an edit whose publish failed) are removed after that. A
file the directory holds under a name the bucket holds with other bytes is replaced: the
bucket's copy wins (hub.signing.store's write-once rule holds for the bucket).

Errors: ObjectStoreError when the bucket cannot be read, RepositoryStateError when it holds no
repository, SigningError when what it holds does not verify (nothing is then made current).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tuf.api.exceptions import LengthOrHashMismatchError, UnsignedMetadataError
from tuf.api.serialization import DeserializationError

from agent.fsutil import fsync_dir, write_atomic
from hub.errors import NotFoundError, RepositoryStateError, SigningError
from hub.signing._tuf import Metadata, Root, Snapshot, Targets, Timestamp
from hub.signing.layout import ROOT, SNAPSHOT, TARGETS, TIMESTAMP, Layout
from hub.signing.publish import MUTABLE, TUF, local_files, publish_order

TIMESTAMP_NAME = f"metadata/{TIMESTAMP}.json"
ROOT_NAME = "metadata/root.json"
FIRST_ROOT = "metadata/1.root.json"
_FILE_MODE = 0o644


class ObjectSource(Protocol):
    """Where the committed repository is read from (hub.objectstore.s3.S3Bucket)."""

    def get(self, name: str) -> bytes: ...

    def stream(self, name: str, chunk_size: int = ...) -> Iterator[bytes]: ...

    def etag(self, name: str) -> str | None:
        """The object's ETag without quotes, None if there is no such object."""
        ...

    def listing(self, under: str = "") -> Iterator[tuple[str, str]]: ...


@dataclass(frozen=True)
class SyncPlan:
    fetch: tuple[str, ...]
    """Names to download, in publish order (never the two mutable files)."""
    remove: tuple[str, ...]
    """Names the directory holds and the bucket does not."""


def plan_sync(local: Mapping[str, str | None], remote: Mapping[str, str]) -> SyncPlan:
    """What makes the directory `local` (name -> MD5 of metadata files, None for targets) the
    bucket `remote` (name -> ETag). Hash-named targets are the same file by construction; a
    metadata file is the same only if its MD5 is the bucket's ETag."""
    fetch = [
        name
        for name, etag in remote.items()
        if name not in MUTABLE
        and (name not in local or (name.startswith("metadata/") and local[name] != etag))
    ]
    remove = sorted(name for name in local if name not in remote and name not in MUTABLE)
    return SyncPlan(tuple(publish_order(set(fetch))), tuple(remove))


@dataclass(frozen=True)
class PullReport:
    fetched: tuple[str, ...]
    removed: tuple[str, ...]
    replaced: tuple[str, ...]
    """Names the directory held with other bytes (a signer's caches of them are stale)."""
    immutable: frozenset[str]
    """Every immutable name the bucket holds (for the publisher: nothing to upload)."""
    mutable: Mapping[str, bytes]
    """The bytes of root.json and timestamp.json as read from the bucket."""


class Mirror:
    """Pulls the repository under `<source>/tuf/` into a directory (see the module docstring)."""

    def __init__(self, source: ObjectSource) -> None:
        self.source = source
        # The first root this process pulled (or published): every later pull must start the
        # chain from it, so a bucket whose repository was replaced wholesale is refused
        # rather than followed. None until then: joining trusts the bucket's repository, and
        # the hub then checks that its own keys are the ones that repository trusts.
        self.anchor: bytes | None = None

    def committed(self) -> bool:
        """Whether the bucket holds a repository (a timestamp.json)."""
        return self.source.etag(TUF + TIMESTAMP_NAME) is not None

    def current(self, layout: Layout) -> bool:
        """Whether the directory already has the bucket's timestamp.json and root.json."""
        for name in (TIMESTAMP_NAME, ROOT_NAME):
            etag = self.source.etag(TUF + name)
            if etag is None or etag != _md5_or_none(layout.base / name):
                return False
        return True

    def pull(self, layout: Layout) -> PullReport:
        try:
            mutable = {name: self.source.get(TUF + name) for name in (TIMESTAMP_NAME, ROOT_NAME)}
        except NotFoundError:
            raise RepositoryStateError(
                f"the bucket holds no TUF repository under {TUF} (no {TIMESTAMP_NAME} and root.json)"
            ) from None
        remote = {name.removeprefix(TUF): etag for name, etag in self.source.listing(TUF)}
        if self.anchor is not None and remote.get(FIRST_ROOT) != _md5_bytes(self.anchor):
            raise SigningError(
                f"the bucket's {FIRST_ROOT} is not the root this hub started from: another "
                "repository replaced it there; restore the bucket (or restart the hub to join it)"
            )
        local = {
            name: (_md5(path) if name.startswith("metadata/") else None) for name, path in local_files(layout)
        }
        plan = plan_sync(local, remote)
        replaced = tuple(n for n in plan.fetch if n in local)
        # Metadata is small: held in memory and verified before any of it is written, so a
        # bucket that does not verify leaves the directory (and this hub's /tuf/) as it was.
        # Targets are new names only (hash-named), checked against their names as they stream.
        fetched = {n: self.source.get(TUF + n) for n in plan.fetch if n.startswith("metadata/")}

        def read(name: str) -> bytes | None:
            if name in fetched:
                return fetched[name]
            return _read(layout.base / name) if name in remote else None

        verify_committed(read, mutable[TIMESTAMP_NAME])
        for name in plan.fetch:
            if name in fetched:
                _write(layout.base / name, fetched[name])
            else:
                self._download(layout, name)
        for name in (ROOT_NAME, TIMESTAMP_NAME):  # the commit point last, as a publisher does
            path = layout.base / name
            if _md5_or_none(path) != _md5_bytes(mutable[name]):
                _write(path, mutable[name])
        for name in plan.remove:
            try:
                (layout.base / name).unlink(missing_ok=True)
            except OSError as exc:
                raise SigningError(f"cannot remove {layout.base / name}: {exc}") from exc
        if self.anchor is None:
            self.anchor = _read(layout.base / FIRST_ROOT)
        immutable = frozenset(n for n in remote if n not in MUTABLE)
        return PullReport(plan.fetch, plan.remove, replaced, immutable, mutable)

    def _download(self, layout: Layout, name: str) -> None:
        path = layout.base / name
        digest = hashlib.sha256()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, name_tmp = tempfile.mkstemp(dir=path.parent, prefix=".pull-")
        except OSError as exc:
            raise SigningError(f"cannot write {path}: {exc}") from exc
        tmp = Path(name_tmp)
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in self.source.stream(TUF + name):
                    digest.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            if name.startswith("targets/"):
                # Named by the SHA-256 of its bytes: anything else was altered in the bucket.
                expected = path.name.partition(".")[0]
                if digest.hexdigest() != expected:
                    raise SigningError(
                        f"{TUF}{name} in the bucket does not hash to its name (sha256 "
                        f"{digest.hexdigest()[:16]}…): it was altered there; restore it or publish again"
                    )
            tmp.chmod(_FILE_MODE)
            tmp.replace(path)
            fsync_dir(path.parent)
        except OSError as exc:
            raise SigningError(f"cannot write {path}: {exc}") from exc
        finally:
            tmp.unlink(missing_ok=True)


def verify_committed(read: Callable[[str], bytes | None], timestamp: bytes) -> None:
    """Raise SigningError unless the repository that `timestamp` commits verifies from its first
    root: the root chain, then timestamp, snapshot and every targets role the snapshot names (a
    hub must never sign on top of metadata its own keys did not sign). `read(name)` gives the
    bytes of `metadata/...` names, None for a file that is not there."""

    def load(name: str, kind: type[Any]) -> Metadata[Any]:
        data = read(name)
        if data is None:
            raise SigningError(f"{name} is missing from the bucket: the repository is incomplete")
        return _parse(data, kind, name)

    root = load(FIRST_ROOT, Root)
    while (data := read(f"metadata/{root.signed.version + 1}.{ROOT}.json")) is not None:
        new = _parse(data, Root, f"{root.signed.version + 1}.root.json")
        result = new.signed.get_root_verification_result(root.signed, new.signed_bytes, new.signatures)
        if not result.verified or new.signed.version != root.signed.version + 1:
            raise SigningError(
                f"{root.signed.version + 1}.root.json is not signed by the root before it: "
                "the bucket was altered"
            )
        root = new
    ts = _parse(timestamp, Timestamp, TIMESTAMP_NAME)
    _verify(root.signed, TIMESTAMP, ts, TIMESTAMP_NAME)
    meta = ts.signed.snapshot_meta
    snapshot_name = f"metadata/{meta.version}.{SNAPSHOT}.json"
    snapshot_data = read(snapshot_name)
    if snapshot_data is None:
        raise SigningError(f"{snapshot_name}, which the timestamp names, is missing from the bucket")
    try:
        meta.verify_length_and_hashes(snapshot_data)
    except LengthOrHashMismatchError as exc:
        raise SigningError(f"{snapshot_name} is not the snapshot the timestamp names: {exc}") from exc
    snapshot = _parse(snapshot_data, Snapshot, snapshot_name)
    _verify(root.signed, SNAPSHOT, snapshot, snapshot_name)
    roles: dict[str, Metadata[Targets]] = {}
    for name, role_meta in snapshot.signed.meta.items():
        role = name.removesuffix(".json")
        path = f"metadata/{role_meta.version}.{name}"
        roles[role] = load(path, Targets)
        if roles[role].signed.version != role_meta.version:
            raise SigningError(f"{path} holds version {roles[role].signed.version}: the bucket was altered")
    if TARGETS not in roles:
        raise SigningError("the bucket's snapshot names no targets role")
    _verify(root.signed, TARGETS, roles[TARGETS], TARGETS)
    # Delegations are verified from the top: each role by the one that delegates to it.
    pending = [TARGETS]
    seen = {TARGETS}
    while pending:
        delegator = roles[pending.pop()].signed
        if delegator.delegations is None or delegator.delegations.roles is None:
            continue
        for child in delegator.delegations.roles:
            if child in roles and child not in seen:
                _verify(delegator, child, roles[child], child)
                seen.add(child)
                pending.append(child)


def _verify(delegator: Root | Targets, role: str, md: Metadata[Any], what: str) -> None:
    try:
        delegator.verify_delegate(role, md.signed_bytes, md.signatures)
    except UnsignedMetadataError as exc:
        raise SigningError(
            f"{what} in the bucket is not signed by the keys trusted for {role}: the bucket was "
            f"altered, or holds another repository ({exc})"
        ) from exc


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise SigningError(f"{path.name} is missing from the bucket: the repository is incomplete") from None
    except OSError as exc:
        raise SigningError(f"cannot read {path}: {exc}") from exc


def _parse(data: bytes, kind: type[Any], what: str) -> Metadata[Any]:
    try:
        md: Metadata[Any] = Metadata.from_bytes(data)
    except DeserializationError as exc:
        raise SigningError(f"{what} in the bucket is not TUF metadata: {exc}") from exc
    if not isinstance(md.signed, kind):
        raise SigningError(f"{what} in the bucket holds {md.signed.type} metadata")
    return md


def _write(path: Path, data: bytes) -> None:
    try:
        write_atomic(path, data, mode=_FILE_MODE)
    except OSError as exc:
        raise SigningError(f"cannot write {path}: {exc}") from exc


def _md5(path: Path) -> str:
    return _md5_bytes(path.read_bytes())


def _md5_bytes(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _md5_or_none(path: Path) -> str | None:
    try:
        return _md5(path)
    except OSError:
        return None
