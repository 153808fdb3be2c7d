"""One change to the repository: read the published state, edit roles, sign, publish.

An `Edit` is made while the repository lock is held. Callers edit role payloads; `commit()`
then gives each changed role its next version and expiry, signs everything (new root, the
changed targets roles, snapshot, timestamp) *before* writing anything — so a missing key
leaves the repository untouched — and writes target bytes first, then metadata in the order
clients read backwards from: root, targets roles, snapshot, and last the timestamp, which is
the commit point.

Every signature is checked against its delegator's new state before it is written, so a
key file that is not the trusted key can never produce metadata that clients would refuse.
"""

from __future__ import annotations

import copy
from datetime import datetime
from typing import Any

from tuf.api.exceptions import UnsignedMetadataError

from hub.errors import RepositoryStateError, SigningError
from hub.signing._tuf import (
    DelegatedRole,
    Delegations,
    Key,
    Metadata,
    MetaFile,
    Root,
    Signer,
    Snapshot,
    Targets,
    Timestamp,
)
from hub.signing.expiry import ExpiryPolicy
from hub.signing.keys import KeyStore
from hub.signing.layout import (
    DEPLOY,
    DEPLOY_PATHS,
    KEYED_ROLES,
    MODELS,
    MODELS_PATHS,
    ROOT,
    SNAPSHOT,
    TARGETS,
    TIMESTAMP,
    TOP_LEVEL_ROLES,
    is_group_role,
)
from hub.signing.store import MetadataStore

_HASHES = ["sha256"]
_TRUST_CACHE_SIZE = 10_000  # entries of (role, version, delegator version); cleared when full


class Edit:
    """The published state of the repository plus the changes of one locked operation."""

    def __init__(self, store: MetadataStore, keys: KeyStore, policy: ExpiryPolicy, now: datetime) -> None:
        self._store, self._keys, self._policy, self.now = store, keys, policy, now
        self.root = store.root()
        self.timestamp = store.timestamp()
        self.snapshot = store.snapshot(self.timestamp.signed.snapshot_meta.version)
        self._new_root: Metadata[Root] | None = None
        self._changed: dict[str, Metadata[Targets]] = {}
        # Keys that replace the key store's for this edit (a rotation's new keys).
        self.signers: dict[str, Signer] = {}
        self._blobs: list[tuple[str, str, bytes]] = []

    # -- reading ------------------------------------------------------------------------

    def has_role(self, role: str) -> bool:
        return role in self._changed or f"{role}.json" in self.snapshot.signed.meta

    def current(self, role: str) -> Metadata[Targets]:
        """The role as this edit sees it: edited if it was, else as published. Do not modify."""
        if role in self._changed:
            return self._changed[role]
        meta = self.snapshot.signed.meta.get(f"{role}.json")
        if meta is None:
            raise RepositoryStateError(f"the repository has no {role} role")
        return self._store.targets(role, meta.version)

    def trusted_root(self) -> Root:
        return (self._new_root or self.root).signed

    def group_roles(self) -> list[str]:
        delegations = self.current(DEPLOY).signed.delegations
        if delegations is None or delegations.roles is None:
            return []
        return list(delegations.roles)

    def expiries(self) -> dict[str, datetime]:
        """When each role's current metadata expires."""
        out = {ROOT: self.trusted_root().expires}
        for role in (TARGETS, MODELS, DEPLOY, *self.group_roles()):
            out[role] = self.current(role).signed.expires
        out[SNAPSHOT] = self.snapshot.signed.expires
        out[TIMESTAMP] = self.timestamp.signed.expires
        return out

    # -- editing ------------------------------------------------------------------------

    def edit(self, role: str) -> Targets:
        """The role's payload to modify; a role the repository does not have yet starts empty."""
        if role not in self._changed:
            if self.has_role(role):
                self._changed[role] = copy.deepcopy(self.current(role))
            else:
                self._changed[role] = Metadata(Targets(expires=self.now))
        return self._changed[role].signed

    def add_target_bytes(self, target_path: str, sha256: str, data: bytes) -> None:
        """Bytes to store for a target, written by commit() once everything is signed."""
        self._blobs.append((target_path, sha256, data))

    def edit_root(self) -> Root:
        if self._new_root is None:
            self._new_root = copy.deepcopy(self.root)
        return self._new_root.signed

    # -- publishing ---------------------------------------------------------------------

    def commit(self, *, snapshot: bool = False, timestamp: bool = False) -> dict[str, int]:
        """Sign and write what changed (and snapshot/timestamp if forced); role -> new version."""
        pending: list[tuple[str, Metadata[Any], bytes]] = []
        if self._new_root is not None:
            self._finish(ROOT, self._new_root, self.root.signed.version + 1)
            pending.append((ROOT, self._new_root, self._sign_root(self._new_root)))

        new_snapshot = copy.deepcopy(self.snapshot)
        for role, md in self._changed.items():
            published = self.snapshot.signed.meta.get(f"{role}.json")
            self._finish(role, md, self._store.next_version(role, published.version if published else 0))
            data = self._sign(role, md)
            pending.append((role, md, data))
            new_snapshot.signed.meta[f"{role}.json"] = MetaFile(md.signed.version, length=len(data))

        snapshot_meta = self.timestamp.signed.snapshot_meta
        snapshot = snapshot or bool(self._changed)
        if snapshot:
            version = self._store.next_version(SNAPSHOT, self.snapshot.signed.version)
            self._finish(SNAPSHOT, new_snapshot, version)
            snapshot_data = self._sign(SNAPSHOT, new_snapshot)
            pending.append((SNAPSHOT, new_snapshot, snapshot_data))
            snapshot_meta = MetaFile.from_data(new_snapshot.signed.version, snapshot_data, _HASHES)
            timestamp = True
        new_timestamp = self.timestamp
        if timestamp:
            new_timestamp = Metadata(Timestamp(version=1, snapshot_meta=copy.deepcopy(snapshot_meta)))
            self._finish(TIMESTAMP, new_timestamp, self.timestamp.signed.version + 1)
            pending.append((TIMESTAMP, new_timestamp, self._sign(TIMESTAMP, new_timestamp)))

        for target_path, sha256, blob in self._blobs:
            self._store.write_target(target_path, sha256, blob)
        for role, md, data in pending:
            self._store.write(role, md, data)
        # From here on the edit shows what was published (refresh() reports from it).
        if self._new_root is not None:
            self.root, self._new_root = self._new_root, None
        if snapshot:
            self.snapshot = new_snapshot
        self.timestamp = new_timestamp
        self._changed, self._blobs = {}, []
        return {role: md.signed.version for role, md, _ in pending}

    def _finish(self, role: str, md: Metadata[Any], version: int) -> None:
        md.signed.version = version
        md.signed.expires = self._policy.expires(role, self.now)

    def _signer(self, key_role: str, trusted_keyids: list[str]) -> Signer:
        if key_role in self.signers:
            return self.signers[key_role]
        return self._keys.signer(key_role, trusted_keyids)

    def delegator(self, role: str) -> Root | Targets:
        """The payload that lists the keys trusted for `role`, as this edit sees it."""
        if role in (ROOT, TARGETS, SNAPSHOT, TIMESTAMP):
            return self.trusted_root()
        if role in (MODELS, DEPLOY):
            return self.current(TARGETS).signed
        if is_group_role(role):
            return self.current(DEPLOY).signed
        raise SigningError(f"unknown role {role!r}")

    def is_trusted(self, role: str) -> bool:
        """Whether the published `role` is signed by the keys its delegator now trusts."""
        md: Metadata[Any]
        if role == SNAPSHOT:
            md = self.snapshot
        elif role == TIMESTAMP:
            md = self.timestamp
        else:
            md = self.current(role)
        delegator = self.delegator(role)
        # Published versions never change, so a positive answer holds until the delegator's
        # version does; re-verifying (canonical JSON of every role) would dominate refresh().
        key = (role, md.signed.version, delegator.version)
        if key in self._store.trusted:
            return True
        try:
            delegator.verify_delegate(role, md.signed_bytes, md.signatures)
        except UnsignedMetadataError:
            return False
        if len(self._store.trusted) >= _TRUST_CACHE_SIZE:
            self._store.trusted.clear()
        self._store.trusted.add(key)
        return True

    def _sign(self, role: str, md: Metadata[Any]) -> bytes:
        """Sign with the key the delegator trusts, verify that it does, serialise."""
        delegator = self.delegator(role)
        delegation = delegator.get_delegated_role(role)
        key_role = DEPLOY if is_group_role(role) else role
        md.sign(self._signer(key_role, delegation.keyids))
        delegator.verify_delegate(role, md.signed_bytes, md.signatures)
        return md.to_bytes()

    def _sign_root(self, md: Metadata[Root]) -> bytes:
        """A new root is signed by the current root keys and, if they changed, by the new ones."""
        old = self.root.signed
        md.sign(self._keys.signer(ROOT, old.roles[ROOT].keyids))
        new_signer = self.signers.get(ROOT)
        if new_signer is not None:
            md.sign(new_signer, append=True)
        result = md.signed.get_root_verification_result(old, md.signed_bytes, md.signatures)
        if not result.verified:
            raise SigningError("the new root is not signed by both the old and the new root keys")
        return md.to_bytes()


def genesis(store: MetadataStore, keys: KeyStore, policy: ExpiryPolicy, now: datetime) -> dict[str, int]:
    """Write version 1 of every role: root, targets (delegating to models and deploy), models,
    deploy, snapshot, timestamp. Uses the key store's keys, generating those it lacks."""
    signers = {role: keys.load(role) if keys.has(role) else keys.generate(role) for role in KEYED_ROLES}
    root = Metadata(Root(expires=policy.expires(ROOT, now), consistent_snapshot=True))
    for role in TOP_LEVEL_ROLES:
        root.signed.add_key(signers[role].public_key, role)
    # Terminating: a path under models/ or groups/ is answered by that role or by nobody.
    delegated = {
        role: DelegatedRole(role, [signers[role].public_key.keyid], 1, True, list(paths))
        for role, paths in ((MODELS, MODELS_PATHS), (DEPLOY, DEPLOY_PATHS))
    }
    delegated_keys: dict[str, Key] = {signers[r].public_key.keyid: signers[r].public_key for r in delegated}
    delegations = Delegations(delegated_keys, roles=delegated)
    targets = Metadata(Targets(expires=policy.expires(TARGETS, now), delegations=delegations))
    models = Metadata(Targets(expires=policy.expires(MODELS, now)))
    deploy = Metadata(Targets(expires=policy.expires(DEPLOY, now), delegations=Delegations({}, roles={})))

    written: list[tuple[str, Metadata[Any], bytes]] = []
    for role, md in ((ROOT, root), (TARGETS, targets), (MODELS, models), (DEPLOY, deploy)):
        md.sign(signers[role])
        written.append((role, md, md.to_bytes()))
    snapshot = Metadata(Snapshot(expires=policy.expires(SNAPSHOT, now)))
    for role, _, data in written[1:]:
        snapshot.signed.meta[f"{role}.json"] = MetaFile(1, length=len(data))
    snapshot.sign(signers[SNAPSHOT])
    written.append((SNAPSHOT, snapshot, snapshot.to_bytes()))
    timestamp = Metadata(
        Timestamp(
            expires=policy.expires(TIMESTAMP, now),
            snapshot_meta=MetaFile.from_data(1, written[-1][2], _HASHES),
        )
    )
    timestamp.sign(signers[TIMESTAMP])
    written.append((TIMESTAMP, timestamp, timestamp.to_bytes()))
    for role, md, data in written:
        store.write(role, md, data)
    return {role: 1 for role, _, _ in written}
