"""The hub's TUF repository: what devices may run, and what each group should run.

Roles and who signs them (one Ed25519 key per keyed role, threshold 1):

    root        offline   the keys of the four top-level roles; renewed by rotation
    targets     offline   delegates models/*/*/* to `models`, groups/*/* to `deploy` (terminating)
      models    online    the model files: models/<name>/<version>/<file>
      deploy    online    delegates groups/<g>/* to `group-<g>`, one role per device group
        group-<g> online  (deploy key) groups/<g>/assignment.json
    snapshot    online    the version of every targets role: no mix and match
    timestamp   online    the current snapshot: short-lived, so no freeze

The split is Uptane's: a group role can only speak for paths under its own group, and only
`models` can vouch for a model file, so a stolen deploy key can only choose among models the
models key signed. Creating a group needs only the deploy key, never an offline one.

Every mutating call holds an exclusive flock on `<repo>/.lock` (several hub processes may share
the directory), reads the published state from disk, and publishes through `Edit.commit()`;
metadata versions are never reused. `refresh()` is meant to be called periodically by the
running hub: it re-signs online roles before they expire and is a cheap no-op otherwise.

With a `publisher` (hub.signing.publish: `tuf_publish = "s3"`), every operation that wrote
files publishes them to the object store before it releases the lock, in an order that keeps
the published copy consistent. A failed publish is logged, not raised: the directory (and the
hub's own /tuf/) is already current, and the next edit or `refresh()` (which the running hub
calls periodically) catches the object store up; `publish()` does it at once, or raises.

With a `mirror` as well (hub.signing.mirror: `tuf_state = "s3"`), the bucket is the source of
truth and the directory a copy, so hub processes on different hosts can sign: every operation
holds `lock` (a PostgreSQL advisory lock, hub.signing.lock, when the database is PostgreSQL),
pulls the directory to the bucket's committed state before reading it, and publishes before it
releases the lock. A publish that fails *raises* (ObjectStoreError) and the operation's files
are removed from the directory again: otherwise another host, not seeing them, could sign the
same version numbers with other content. Just before publishing, the lock is checked to be
still held (a lost database connection frees it): SigningLockError, nothing published.
`join()` at start makes a new host's directory the bucket's repository (or publishes this
directory's to an empty bucket) and checks that this host holds the online keys it trusts;
`sync()` pulls without the signing lock, for the running hub's /tuf/ to follow other hosts.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from tuf.api.serialization import DeserializationError

from agent.fsutil import write_atomic
from hub.errors import (
    InvalidNameError,
    KeyMismatchError,
    MissingKeyError,
    ObjectStoreError,
    RepositoryStateError,
    SigningError,
    TargetConflictError,
    UnknownTargetError,
)
from hub.signing._tuf import DelegatedRole, Delegations, Key, Metadata, Root, TargetFile, Targets
from hub.signing.edit import Edit, genesis
from hub.signing.expiry import Clock, ExpiryPolicy, system_clock, utc_now
from hub.signing.keys import OFFLINE_ROLES, ONLINE_ROLES, KeyStore
from hub.signing.layout import (
    DEPLOY,
    KEYED_ROLES,
    MODELS,
    ROOT,
    SNAPSHOT,
    TARGETS,
    TIMESTAMP,
    TOP_LEVEL_ROLES,
    Layout,
    assignment_target,
    group_paths,
    group_role,
    is_group_role,
    model_prefix,
    model_target,
)
from hub.signing.lock import FileLock, SigningLock
from hub.signing.mirror import FIRST_ROOT, ROOT_NAME, TIMESTAMP_NAME, Mirror, PullReport
from hub.signing.publish import TUF, Publisher, PublishReport
from hub.signing.store import MetadataStore

_HASHES = ["sha256"]
log = logging.getLogger("outpost-hub")


@dataclass(frozen=True)
class RefreshReport:
    """What `refresh()` did, and what only an operator can do."""

    resigned: tuple[str, ...]
    """Roles signed anew, in publishing order (empty: nothing was due)."""
    published: Mapping[str, int]
    """role -> new version, for every file written."""
    offline_expiring: tuple[str, ...]
    """Offline roles (root, targets) within their refresh margin: rotate or re-sign them offline."""
    next_due: datetime
    """The earliest time an online role will be due again; call refresh() by then."""


@dataclass(frozen=True)
class KeyRotation:
    """The outcome of `rotate_key()`."""

    role: str
    old_keyids: tuple[str, ...]
    new_keyid: str
    retired_key: Path | None
    """Where the old private key was kept (None if there was no old key file)."""
    published: Mapping[str, int]
    """role -> new version, for every metadata file the rotation wrote."""


class SignedRepository:
    """The TUF repository under `repo_dir`, signing with the keys of `keystore`."""

    def __init__(
        self,
        repo_dir: str | os.PathLike[str],
        keystore: KeyStore,
        expiry: ExpiryPolicy | None = None,
        clock: Clock = system_clock,
        publisher: Publisher | None = None,
        mirror: Mirror | None = None,
        lock: SigningLock | None = None,
    ) -> None:
        if mirror is not None and publisher is None:
            raise ValueError("a repository kept in the object store (mirror) needs a publisher")
        self.layout = Layout(Path(repo_dir))
        self.keystore = keystore
        self.expiry = expiry if expiry is not None else ExpiryPolicy()
        self._clock = clock
        self._store = MetadataStore(self.layout)
        self.publisher = publisher
        self.mirror = mirror
        self._lock: SigningLock = lock if lock is not None else FileLock(self.layout.lock_path)
        # True until a publish succeeds: the object store may lag the directory (a new
        # process has not compared them yet, or a publish failed). Never with a mirror: there
        # the directory follows the bucket, not the other way round.
        self.publish_pending = publisher is not None and mirror is None
        # With a mirror: compare the whole directory with the bucket before the next edit
        # (at start, and after an operation was undone), not only timestamp.json and root.json.
        self._pull_needed = mirror is not None

    # -- life cycle ---------------------------------------------------------------------

    def create(self) -> dict[str, int]:
        """Sign and write version 1 of every role; keys missing from the key store are generated.

        Refuses (RepositoryStateError) if the metadata directory holds anything, or, with a
        mirror, if the bucket holds a repository (a second host joins it: `join()`).
        """
        with self._lock.hold():
            if self._store.has_metadata():
                raise RepositoryStateError(
                    f"{self.layout.metadata_dir} already holds metadata: the repository exists"
                )
            if self.mirror is not None and self.mirror.committed():
                raise RepositoryStateError(
                    "the bucket already holds a TUF repository: a second hub host joins it (serve "
                    'with tuf_state = "s3" and the online keys of the first), it never creates another root'
                )
            self._store.written = []
            try:
                versions = genesis(self._store, self.keystore, self.expiry, utc_now(self._clock))
                if self.mirror is not None:
                    self._publish_strict()
            except BaseException:
                if self.mirror is not None:
                    self._undo({})
                raise
            if self.mirror is not None:
                self.mirror.anchor = self.layout.base.joinpath(FIRST_ROOT).read_bytes()
            else:
                self._publish_changes()
            return versions

    def join(self) -> str:
        """With a mirror, at start: make the directory the bucket's repository ("joined"; an
        earlier local repository, e.g. one `outpost-hub init` made on this host, is replaced),
        or publish the directory's to a bucket that holds none ("published"). Then check that
        the online keys here are the ones the repository trusts (MissingKeyError,
        KeyMismatchError otherwise: copy them from the host that created it).

        One exception to "the bucket wins": the directory holds the bucket's repository (the
        same first root) at a newer timestamp version. Nobody committed since this directory
        was last the bucket's copy (every commit raises the timestamp version by one), so it
        is published: a hub that ran with `tuf_publish = "s3"` and a failed publish, or an
        `outpost-hub keys rotate` run on this host's directory while the hub was stopped."""
        if self.mirror is None:
            raise RepositoryStateError("join() needs a repository kept in the object store (a mirror)")
        assert self.publisher is not None  # for mypy: checked in __init__
        with self._lock.hold():
            if self.mirror.committed() and not self._ahead_of_bucket():
                self._pull(force=True)
                outcome = "joined"
            else:
                self._store.require_published()
                self.publisher.publish(self.layout)
                self.mirror.anchor = self.layout.base.joinpath(FIRST_ROOT).read_bytes()
                self._pull(force=True)  # a no-op but for the publisher's and the mirror's view
                outcome = "published"
            self._check_online_keys()
        return outcome

    def _ahead_of_bucket(self) -> bool:
        assert self.mirror is not None  # for mypy: join() checks
        try:
            local_root = self.layout.base.joinpath(FIRST_ROOT).read_bytes()
            local_ts = self._store.timestamp().signed.version
        except (OSError, SigningError):
            return False  # no usable repository here: the bucket's is taken
        source = self.mirror.source
        try:
            bucket_ts = Metadata.from_bytes(source.get(TUF + TIMESTAMP_NAME)).signed.version
        except DeserializationError:
            return False  # verify_committed() in the pull says what is wrong with it
        return local_ts > bucket_ts and source.get(TUF + FIRST_ROOT) == local_root

    def _check_online_keys(self) -> None:
        edit = Edit(self._store, self.keystore, self.expiry, utc_now(self._clock))
        for role in ONLINE_ROLES:
            trusted = edit.delegator(role).get_delegated_role(role).keyids
            try:
                self.keystore.signer(role, trusted)
            except (MissingKeyError, KeyMismatchError) as exc:
                raise type(exc)(
                    f"{exc}. The repository in the bucket trusts other online keys than this host "
                    f"holds: copy the online keys ({', '.join(ONLINE_ROLES)}) of a host of this hub "
                    f"into {self.keystore.online_dir} (mode 0600)"
                ) from exc

    def sync(self) -> PullReport | None:
        """With a mirror: bring the directory (what this hub's /tuf/ serves) to the bucket's
        committed state if the bucket changed; None if it had not (two HEAD requests) or there
        is no mirror. Takes only this directory's lock: reading needs no signing lock."""
        if self.mirror is None:
            return None
        with self._store.locked():
            return self._pull()

    def _pull(self, *, force: bool = False) -> PullReport | None:
        """The directory made the bucket's copy (lock held); None if it already was."""
        assert self.mirror is not None and self.publisher is not None  # for mypy: callers check
        if not (force or self._pull_needed) and self.mirror.current(self.layout):
            return None
        report = self.mirror.pull(self.layout)
        if report.replaced or report.removed:
            # Parsed files are cached by version, which holds while a name keeps its bytes.
            self._store.forget()
        self.publisher.assume(report.immutable, dict(report.mutable))
        self._pull_needed = False
        if report.fetched or report.removed:
            log.info(
                "TUF repository pulled from the bucket: %d files fetched (%d replaced), %d removed",
                len(report.fetched),
                len(report.replaced),
                len(report.removed),
            )
        return report

    def exists(self) -> bool:
        return self.layout.metadata_file(TIMESTAMP).is_file()

    def root_path(self) -> Path:
        """The newest root metadata: what devices are provisioned with (`trusted_root`)."""
        return self.layout.root_json

    @contextmanager
    def _edit(self, *, publish: bool = False) -> Iterator[Edit]:
        """An Edit under the lock; afterwards the object store gets what changed (everything
        that differs with `publish`, or when an earlier publish failed)."""
        if self.mirror is not None:
            with self._mirrored_edit() as edit:
                yield edit
            return
        with self._lock.hold():
            self._store.require_published()
            try:
                yield Edit(self._store, self.keystore, self.expiry, utc_now(self._clock))
            finally:  # also after a failure part way: what was written is published
                self._publish_changes(publish)

    @contextmanager
    def _mirrored_edit(self) -> Iterator[Edit]:
        """An Edit on the bucket's state: pulled first, published (or undone) before unlocking."""
        with self._lock.hold():
            # In full (a listing), not just timestamp.json and root.json: a file another host
            # uploaded before its publish failed is in no timestamp, and its version number must
            # not be given to other content here.
            self._pull(force=True)
            self._store.require_published()
            saved = {
                path: path.read_bytes()
                for path in (self.layout.base / TIMESTAMP_NAME, self.layout.base / ROOT_NAME)
                if path.is_file()
            }
            self._store.written, self._store.changed = [], False
            try:
                yield Edit(self._store, self.keystore, self.expiry, utc_now(self._clock))
                if self._store.changed:
                    self._publish_strict()
            except BaseException:
                self._undo(saved)
                raise

    def _publish_strict(self) -> None:
        """Publish what this operation wrote, or raise (lock held; the caller undoes it)."""
        assert self.publisher is not None  # for mypy: a mirror implies a publisher
        self._lock.check()
        try:
            self._publish()
        except (ObjectStoreError, OSError) as exc:
            timestamp = self.layout.base / TIMESTAMP_NAME
            if self.publisher.has_published(TIMESTAMP_NAME, timestamp.read_bytes()):
                # Committed: the new timestamp is in the bucket; only removing pruned files
                # failed. The next pull compares everything again.
                log.warning("the TUF repository was published, but cleaning the bucket failed: %s", exc)
                self._pull_needed = True
                return
            raise ObjectStoreError(
                f"publishing the signed change to the object store failed, so it was undone and "
                f"nothing was published; retry: {exc}"
            ) from exc

    def _undo(self, saved: Mapping[Path, bytes]) -> None:
        """Put the directory back as it was before an operation that did not publish: its new
        files removed, timestamp.json and root.json restored; the next edit pulls in full."""
        self._pull_needed = True
        written, self._store.written = self._store.written, []
        try:
            for path in reversed(written):
                if path in saved:
                    write_atomic(path, saved[path], mode=0o644)
                else:
                    path.unlink(missing_ok=True)
        except OSError as exc:
            log.error("undoing an unpublished change failed (the next pull repairs it): %s", exc)
        finally:
            self._store.forget()

    # -- publishing -------------------------------------------------------------------------

    def publish(self) -> PublishReport | None:
        """Bring the object store up to the directory (None without a publisher); raises
        ObjectStoreError if it cannot. Safe to repeat: only what is missing is uploaded."""
        if self.publisher is None or self.mirror is not None:
            return None  # with a mirror every operation has published before it returned
        with self._lock.hold():
            return self._publish()

    def _publish(self) -> PublishReport:
        assert self.publisher is not None  # for mypy: callers check
        self.publish_pending = True
        report = self.publisher.publish(self.layout)
        self._store.changed = False
        self.publish_pending = False
        return report

    def _publish_changes(self, always: bool = False) -> None:
        """Publish (lock held) if files changed; a failure is logged and retried by the next
        edit or refresh()."""
        if self.publisher is None or not (always or self._store.changed or self.publish_pending):
            return
        try:
            self._publish()
        except (ObjectStoreError, OSError) as exc:
            log.warning("publishing the TUF repository to the object store failed (retried later): %s", exc)

    # -- models ---------------------------------------------------------------------------

    def add_model_version(
        self,
        name: str,
        version: int,
        files: Mapping[str, bytes],
        custom: Mapping[str, Any] | None = None,
    ) -> int:
        """Sign `models/<name>/<version>/<file>` for each file; return the new `models` version.

        Each target's `custom` is {"model": name, "version": version} plus `custom`. Adding the
        same files again is a no-op (the current version is returned); other files or bytes
        under a version already signed raise TargetConflictError: versions are immutable.
        """
        prefix = model_prefix(name, version)
        if not files:
            raise InvalidNameError(f"model {name} version {version}: no files to sign")
        extra = dict(custom or {})
        clash = {"model", "version"} & extra.keys()
        if clash:
            raise InvalidNameError(f"custom fields {sorted(clash)} are set by the repository")
        meta = {"model": name, "version": version, **extra}
        try:
            json.dumps(meta, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidNameError(f"custom fields must be plain JSON: {exc}") from exc
        blobs = {model_target(name, version, filename): data for filename, data in files.items()}
        wanted = {path: _target_file(path, data, meta) for path, data in blobs.items()}  # hashing: unlocked

        with self._edit() as edit:
            models = edit.current(MODELS).signed
            signed = {p: t for p, t in models.targets.items() if p.startswith(prefix)}
            if signed == wanted:
                return models.version
            if signed:
                raise TargetConflictError(
                    f"model {name} version {version} is already signed with other files or bytes; "
                    "a version never changes: publish a new version"
                )
            for path, data in blobs.items():
                edit.add_target_bytes(path, wanted[path].hashes["sha256"], data)
            edit.edit(MODELS).targets.update(wanted)
            return edit.commit()[MODELS]

    def remove_model_version(self, name: str, version: int) -> int:
        """Withdraw a model version's targets; return the new `models` version.

        The files stay on disk (clients may be mid-download; `prune()` removes them later).
        """
        prefix = model_prefix(name, version)
        with self._edit() as edit:
            paths = [p for p in edit.current(MODELS).signed.targets if p.startswith(prefix)]
            if not paths:
                raise UnknownTargetError(f"model {name} version {version} is not signed")
            targets = edit.edit(MODELS).targets
            for path in paths:
                del targets[path]
            return edit.commit()[MODELS]

    def model_versions(self) -> dict[str, list[int]]:
        """The signed model versions, by name (what the `models` role currently lists)."""
        with self._edit() as edit:
            found: dict[str, set[int]] = {}
            for path in edit.current(MODELS).signed.targets:
                _, name, version, _ = path.split("/")
                found.setdefault(name, set()).add(int(version))
        return {name: sorted(versions) for name, versions in sorted(found.items())}

    # -- deployments --------------------------------------------------------------------

    def set_assignment(self, group: str, document: bytes) -> int:
        """Sign `document` as `groups/<group>/assignment.json`; return the group role's version.

        The first assignment of a group creates its role, delegated from `deploy` and signed
        with the deploy key. The same bytes again are a no-op (the current version is returned).
        """
        role, path = group_role(group), assignment_target(group)
        wanted = _target_file(path, document, None)
        with self._edit() as edit:
            if role in edit.group_roles():
                current = edit.current(role).signed
                if current.targets.get(path) == wanted:
                    return current.version
            else:
                self._delegate_group(edit, group)
            edit.add_target_bytes(path, wanted.hashes["sha256"], document)
            edit.edit(role).targets[path] = wanted
            return edit.commit()[role]

    def groups(self) -> list[str]:
        with self._edit() as edit:
            return [r.removeprefix("group-") for r in edit.group_roles()]

    @staticmethod
    def _delegate_group(edit: Edit, group: str) -> None:
        """Add `group-<group>` to deploy's delegations, trusting the key(s) targets trusts for deploy."""
        targets = edit.current(TARGETS).signed
        deploy_role = targets.get_delegated_role(DEPLOY)
        deploy = edit.edit(DEPLOY)
        if deploy.delegations is None or deploy.delegations.roles is None:
            deploy.delegations = Delegations({}, roles={})
        assert deploy.delegations.roles is not None  # for mypy: set just above
        role = group_role(group)
        deploy.delegations.roles[role] = DelegatedRole(
            role, [], deploy_role.threshold, True, group_paths(group)
        )
        for keyid in deploy_role.keyids:
            deploy.add_key(targets.get_key(keyid), role)

    # -- keeping it alive -----------------------------------------------------------------

    def refresh(self) -> RefreshReport:
        """Re-sign online roles within their refresh margin (and snapshot/timestamp after them).

        Also re-signs an online role whose published signature its delegator no longer trusts
        (a key rotation cut short after publishing the new root or targets), so the fleet
        recovers without an operator.

        With a publisher, it also publishes whatever the object store lacks, including files
        written by another process or `outpost-hub keys rotate` (cheap when nothing is new: the
        directory is compared with what this process uploaded, without a request).
        """
        with self._edit(publish=True) as edit:
            now, policy = edit.now, self.expiry
            expiries = edit.expiries()
            due = {role for role, expires in expiries.items() if policy.renew_at(role, expires) <= now}
            due |= {role for role in expiries if role not in OFFLINE_ROLES and not edit.is_trusted(role)}
            for role in (MODELS, DEPLOY, *edit.group_roles()):
                if role in due:
                    edit.edit(role)
            published = edit.commit(snapshot=SNAPSHOT in due, timestamp=TIMESTAMP in due)
            after = edit.expiries()
        online = [role for role in after if role not in OFFLINE_ROLES]
        return RefreshReport(
            resigned=tuple(published),
            published=published,
            offline_expiring=tuple(r for r in (ROOT, TARGETS) if r in due),
            next_due=min(policy.renew_at(role, after[role]) for role in online),
        )

    def prune(self, keep: int = 10) -> list[Path]:
        """Delete files no client can still need; return them.

        Kept: every root version (clients walk the chain), the newest `keep` published
        snapshots, every targets-role version they name and everything newer (version numbers
        on disk are never reused), and the target files those role versions list. A client that
        read a timestamp up to `keep` snapshots ago can still finish its update.
        """
        if keep < 1:
            raise ValueError("prune() must keep at least one snapshot")
        with self._edit() as edit:
            on_disk = self._store.versions()
            current = edit.snapshot.signed.version
            snapshots = sorted(v for v in on_disk.get(SNAPSHOT, {}) if v <= current)[-keep:]
            needed: dict[str, set[int]] = {}
            for version in snapshots:
                for name, meta in self._store.old_snapshot(version).signed.meta.items():
                    needed.setdefault(name.removesuffix(".json"), set()).add(meta.version)
            needed[SNAPSHOT] = set(snapshots)
            doomed = [
                path
                for role, versions in on_disk.items()
                if role != ROOT
                for version, path in versions.items()
                if version < min(needed.get(role, {version}))
            ]
            kept_targets = {
                self.layout.target_file(t.path, t.hashes["sha256"])
                for role, versions in needed.items()
                if role != SNAPSHOT
                for version in versions
                for t in self._store.old_targets(role, version).signed.targets.values()
            }
            if self.layout.targets_dir.is_dir():
                doomed += [
                    p for p in self.layout.targets_dir.rglob("*") if p.is_file() and p not in kept_targets
                ]
            for path in doomed:
                self._store.remove(path)
        return doomed

    def renew(self, role: str) -> dict[str, int]:
        """Re-sign `role` unchanged with a fresh expiry; return role -> new version.

        For the offline roles that `refresh()` reports in `offline_expiring` (root, targets),
        run where their keys are; works for the online roles too.
        """
        with self._edit() as edit:
            if role == ROOT:
                edit.edit_root()
            elif role in (SNAPSHOT, TIMESTAMP):
                pass
            elif role in (TARGETS, MODELS, DEPLOY) or role in edit.group_roles():
                edit.edit(role)
            else:
                raise InvalidNameError(f"no role {role!r} to renew")
            return edit.commit(snapshot=role == SNAPSHOT, timestamp=role == TIMESTAMP)

    # -- keys -----------------------------------------------------------------------------

    def rotate_key(self, role: str) -> KeyRotation:
        """Replace `role`'s key with a new one and publish metadata that trusts only the new key.

        root: a new root version signed by the old and the new root key (devices follow the
        chain). targets, snapshot, timestamp: a new root listing the new key, then the role
        re-signed with it. models, deploy: targets re-signed listing the new key (and, for
        deploy, every group role re-delegated and re-signed). The old private key is kept as
        `<role>.<keyid>.retired.pem`. Needs the delegating role's key: root for the top-level
        roles, targets for models and deploy — offline keys (MissingKeyError if absent).
        """
        if role not in KEYED_ROLES:
            hint = "; group roles sign with the deploy key: rotate deploy" if is_group_role(role) else ""
            raise InvalidNameError(f"cannot rotate a key for {role!r}{hint}")
        with self._edit() as edit:
            delegator = ROOT if role in TOP_LEVEL_ROLES else TARGETS
            self.keystore.load(delegator)  # fail before staging anything if it is not here
            new = self.keystore.stage(role)
            edit.signers[role] = new
            new_key: Key = new.public_key
            if role in TOP_LEVEL_ROLES:
                root = edit.edit_root()
                old = tuple(root.roles[role].keyids)
                _swap_key(root, role, old, new_key)
                if role == TARGETS:
                    edit.edit(TARGETS)
            else:
                targets = edit.edit(TARGETS)
                old = tuple(targets.get_delegated_role(role).keyids)
                _swap_key(targets, role, old, new_key)
                edit.edit(role)
                if role == DEPLOY:
                    deploy = edit.edit(DEPLOY)
                    for group in edit.group_roles():
                        _swap_key(deploy, group, tuple(deploy.get_delegated_role(group).keyids), new_key)
                        edit.edit(group)
            published = edit.commit(snapshot=role == SNAPSHOT, timestamp=role == TIMESTAMP)
            # The new key becomes current only once the metadata trusting it is published:
            # with a mirror a failed publish undoes the metadata, and the old key stays.
            if self.mirror is not None:
                self._publish_strict()
            retired = self.keystore.promote(role)
        return KeyRotation(role, old, new_key.keyid, retired, published)


def _swap_key(delegator: Root | Targets, role: str, old: tuple[str, ...], new: Key) -> None:
    """Make `new` the only key of `role` in `delegator` (a Root or Targets payload)."""
    for keyid in old:
        delegator.revoke_key(keyid, role)
    delegator.add_key(new, role)


def _target_file(path: str, data: bytes, custom: Mapping[str, Any] | None) -> TargetFile:
    target = TargetFile.from_data(path, data, _HASHES)
    if custom is not None:
        target.unrecognized_fields["custom"] = dict(custom)
    return target
