"""The registry: model versions, deployments and operator tokens over the database and blobs.

Invariants it keeps:
- A stored version passed `validate_package`; its manifest and model are in the blob store
  under their SHA-256 before its row is committed.
- Versions of a model only increase and are never reused, even after a delete
  (`models.last_version`); only undoing a push that was never published frees its number.
  The check and the insert run in one write transaction, with the model row locked, so
  concurrent pushes never both win.
- A version that a group's current deployment uses (stable or candidate) cannot be deleted.
  A delete removes the blobs no other version references, and only once its database change
  is committed (the blobs wait in the trash until then and come back if it fails).
- Deployments are append-only history; see `hub.registry.deployments` for the rules.
- Tokens are stored as SHA-256 only.

Concurrency: every change is one write transaction that first locks the rows it decides on
(model row, then group row; always in that order, so PostgreSQL never deadlocks). SQLite
serializes write transactions across processes (`BEGIN IMMEDIATE`); on PostgreSQL the row
locks do, and a unique violation from two requests creating the same model, group or token
name at once is retried once, so the loser gets the answer it would have got a moment later.
Blob writes and deletes also hold a lock of this process. The tests run the same suite on
SQLite and on a real PostgreSQL (tests/conftest.py).

Known gap: pushes and deletes of one model serialize on its row, but with several hub
processes on PostgreSQL, deleting a version of one model while another process pushes the
very same ONNX bytes under another model name can remove that shared blob (the delete does
not see the uncommitted push). Run deletes from one process, or keep blobs in an object store
with its own lifecycle rules.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TypeVar

from sqlalchemy import exc as sa_exc
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from agent.package.manifest import NAME_RE
from hub.errors import ConflictError, InvalidRequestError, NotFoundError
from hub.registry import deployments as rules
from hub.registry import queries as q
from hub.registry import tokens
from hub.registry.blobs import Blobs, sha256_hex
from hub.registry.db import Database, DeploymentRow, GroupRow, ModelRow, TokenRow, VersionRow
from hub.registry.records import Deployment, Experiment, GroupInfo, ModelInfo, TokenInfo, VersionInfo
from hub.registry.validate import Limits, check_model_runs, check_package
from hub.registry.variants import check_variants, variant_digests

T = TypeVar("T")


def utc_now() -> datetime:
    return datetime.now(UTC)


def check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidRequestError(
            f"{kind} name {name!r}: use 1-64 characters of a-z, 0-9, '_', '.', '-', "
            "starting with a letter or digit"
        )
    return name


class Registry:
    def __init__(
        self,
        db: Database,
        blobs: Blobs,
        limits: Limits | None = None,
        *,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.db = db
        self.blobs = blobs
        self.limits = limits or Limits()
        self._now = clock
        # Serializes this process's blob writes and deletes with the database changes that
        # reference them (the database serializes other processes on SQLite).
        self._blob_lock = threading.Lock()

    # -- models and versions -----------------------------------------------------------------

    def push_version(
        self, manifest_bytes: bytes, model_bytes: bytes, variant_files: Mapping[str, bytes] | None = None
    ) -> VersionInfo:
        """Validate and store a package; PackageRejected or ConflictError change nothing.

        `variant_files`: the package's other files by name, where the hardware variants its
        manifest lists are (hub.registry.variants); each is checked like a package and stored."""
        manifest = check_package(manifest_bytes, model_bytes, self.limits)
        with self.db.session() as s:  # early answer, before the costly onnxruntime checks
            model = s.scalar(select(ModelRow).where(ModelRow.name == manifest.name))
            if model is not None:
                self._check_new_version(s, model, manifest.version)
        check_model_runs(manifest, model_bytes)
        variants = check_variants(manifest, variant_files or {}, self.limits)
        fresh: list[str] = []  # blobs this push added, to remove if it fails

        def store(s: Session) -> VersionInfo:
            model = self._lock_model(s, manifest.name)
            if model is None:
                model = ModelRow(name=manifest.name, last_version=0, created=self._now())
                s.add(model)
                s.flush()
            self._check_new_version(s, model, manifest.version)
            model.last_version = manifest.version
            row = VersionRow(
                model_id=model.id,
                version=manifest.version,
                manifest=manifest_bytes.decode("utf-8"),
                manifest_sha256=sha256_hex(manifest_bytes),
                manifest_size=len(manifest_bytes),
                model_sha256=manifest.model.sha256,
                model_size=len(model_bytes),
                created=self._now(),
            )
            s.add(row)
            s.flush()
            # Inside the transaction: on SQLite no other process can delete these blobs
            # between this write and the commit that references them.
            blobs = [(model_bytes, row.model_sha256), (manifest_bytes, row.manifest_sha256)]
            for v in variants:
                blobs += [(v.model_bytes, v.entry.sha256), (v.manifest_bytes, v.entry.manifest_sha256)]
            for data, digest in blobs:
                if digest not in fresh and not self.blobs.exists(digest):
                    fresh.append(digest)
                    self.blobs.put(data)
            return q.to_version_info(model.name, row, manifest)

        with self._blob_lock:
            try:
                return self._transact(f"pushing {manifest.name} version {manifest.version}", store)
            except BaseException:
                for digest in fresh:
                    self.blobs.delete(digest)
                raise

    def list_models(self) -> list[ModelInfo]:
        with self.db.session() as s:
            models = s.scalars(select(ModelRow).order_by(ModelRow.name)).all()
            versions = q.versions_by_model(s)
            return [q.to_model_info(m, versions.get(m.id, ())) for m in models]

    def get_model(self, name: str) -> ModelInfo:
        with self.db.session() as s:
            model = q.model_row(s, name)
            versions = q.versions_by_model(s, model.id)
            return q.to_model_info(model, versions.get(model.id, ()))

    def list_versions(self, name: str) -> list[VersionInfo]:
        with self.db.session() as s:
            model = q.model_row(s, name)
            rows = s.scalars(
                select(VersionRow).where(VersionRow.model_id == model.id).order_by(VersionRow.version)
            ).all()
            return [q.to_version_info(name, r) for r in rows]

    def get_version(self, name: str, version: int) -> VersionInfo:
        with self.db.session() as s:
            model = q.model_row(s, name)
            return q.to_version_info(name, q.version_row(s, model, version))

    def delete_version(self, name: str, version: int, *, unpublished: bool = False) -> None:
        """Delete a version no group currently deploys, and the blobs only it used.

        Its number stays used, unless `unpublished` says that no signed metadata ever named
        it (the push is being undone because signing failed): then, if it was the latest,
        the same number may be pushed again.
        """
        held: list[tuple[str, object]] = []
        with self._blob_lock:
            try:
                with self._writing(f"deleting {name} version {version}") as s:
                    model = self._lock_model(s, name)
                    if model is None:
                        raise NotFoundError(f"there is no model named {name!r}")
                    row = q.version_row(s, model, version)
                    users = [
                        f"{group} (as {'stable' if d.stable_version == version else 'candidate'})"
                        for d, group in q.current_rows(s, model_id=model.id)
                        if version in (d.stable_version, d.candidate_version)
                    ]
                    if users:
                        raise ConflictError(
                            f"{name} version {version} is deployed to group{'s' * (len(users) > 1)} "
                            f"{', '.join(users)}; "
                            "deploy another version there first"
                        )
                    s.delete(row)
                    s.flush()
                    if unpublished and model.last_version == version:
                        remaining = s.scalar(
                            select(func.max(VersionRow.version)).where(VersionRow.model_id == model.id)
                        )
                        model.last_version = remaining or 0
                    for digest in sorted(
                        {row.model_sha256, row.manifest_sha256} | variant_digests(row.manifest)
                    ):
                        if not q.blob_referenced(s, digest) and (path := self.blobs.take(digest)):
                            held.append((digest, path))
            except BaseException:
                for digest, path in held:
                    self.blobs.restore(digest, path)
                raise
            for _, path in held:
                self.blobs.purge(path)

    def collect_garbage(self) -> list[str]:
        """Delete blobs no version references (left by a crash); their hashes."""
        held: list[tuple[str, object]] = []
        with self._blob_lock:
            try:
                with self._writing("collecting unused blobs") as s:
                    used = set(s.scalars(select(VersionRow.model_sha256)))
                    used |= set(s.scalars(select(VersionRow.manifest_sha256)))
                    for text in s.scalars(select(VersionRow.manifest)):
                        used |= variant_digests(text)  # hardware variants the manifests list
                    for digest in self.blobs.hashes():
                        if digest not in used and (path := self.blobs.take(digest)):
                            held.append((digest, path))
            except BaseException:
                for digest, path in held:
                    self.blobs.restore(digest, path)
                raise
            for _, path in held:
                self.blobs.purge(path)
        return [digest for digest, _ in held]

    # -- deployments -------------------------------------------------------------------------

    def set_deployment(
        self,
        group: str,
        model: str,
        stable: int,
        candidate: int | None = None,
        percent: int = 0,
        salt: str | None = None,
        actor: str = "",
        experiment: Experiment | None = None,
        capture: rules.CaptureChoice = rules.KEEP_CAPTURE,
    ) -> Deployment:
        """Make `stable` (and `candidate` for `percent` of devices) the group's deployment.

        With `experiment`, the devices in the canary run it (the candidate beside the stable
        version) instead of switching to the candidate. `capture` (data capture, None: off)
        is kept from the group's deployment of the same model when not given. Creates the
        group on first use.
        Repeating the current deployment changes nothing and returns the current row.
        """
        check_name("group", group)
        rules.check_request(stable, candidate, percent, salt, actor)
        rules.check_experiment(experiment, candidate, percent)
        rules.check_capture(capture)

        def deploy(s: Session) -> Deployment:
            model_row = q.model_row(s, model, lock=True)
            for version in (stable, candidate):
                if version is not None:
                    q.version_row(s, model_row, version)
            group_row = s.scalar(select(GroupRow).where(GroupRow.name == group).with_for_update())
            if group_row is None:
                group_row = GroupRow(name=group, created=self._now())
                s.add(group_row)
                s.flush()
            prior_row = q.current_row(s, group_row.id)
            prior = q.to_deployment(s, prior_row, group) if prior_row is not None else None
            plan = rules.plan_deployment(
                prior, model, stable, candidate, percent, salt, experiment=experiment, capture=capture
            )
            if prior is not None and rules.same_as(prior, plan):
                return prior
            return self._insert_deployment(s, group_row, model_row, plan, actor)

        return self._transact(f"deploying {model} to group {group}", deploy)

    def rollback(self, group: str, *, model: str | None = None, actor: str = "") -> Deployment:
        """Publish the group's previous stable version, without a candidate.

        With `model`, refuses when the group currently deploys another model.
        """
        rules.check_actor(actor)
        with self._writing(f"rolling back group {group}") as s:
            # Lock the model row before the group row, in the order set_deployment does, so
            # that the two never deadlock on PostgreSQL.
            current = q.current_row(s, q.group_row(s, group).id)
            if current is not None:
                s.scalar(select(ModelRow).where(ModelRow.id == current.model_id).with_for_update())
            group_row = q.group_row(s, group, lock=True)
            rows = s.scalars(
                select(DeploymentRow)
                .where(DeploymentRow.group_id == group_row.id)
                .order_by(DeploymentRow.id.desc())
            ).all()
            history = [q.to_deployment(s, r, group) for r in rows]
            if model is not None and history and history[0].model != model:
                raise ConflictError(
                    f"group {group!r} deploys {history[0].model!r}, not {model!r}; nothing was rolled back"
                )
            plan = rules.plan_rollback(history)
            if current is None or rows[0].model_id != current.model_id:
                raise ConflictError(f"group {group!r} changed while rolling back; look again and retry")
            model_row = q.model_row(s, plan.model)
            if q.find_version(s, model_row.id, plan.stable) is None:
                raise ConflictError(
                    f"{plan.model} version {plan.stable}, the previous stable version of group {group!r}, "
                    "has been deleted; deploy a version explicitly"
                )
            return self._insert_deployment(s, group_row, model_row, plan, actor)

    def current_deployment(self, group: str) -> Deployment:
        with self.db.session() as s:
            group_row = q.group_row(s, group)
            row = q.current_row(s, group_row.id)
            if row is None:
                raise NotFoundError(f"group {group!r} has no deployment")
            return q.to_deployment(s, row, group)

    def list_groups(self) -> list[GroupInfo]:
        with self.db.session() as s:
            groups = s.scalars(select(GroupRow).order_by(GroupRow.name)).all()
            current = {d.group_id: q.to_deployment(s, d, name) for d, name in q.current_rows(s)}
            return [GroupInfo(g.name, g.created, current.get(g.id)) for g in groups]

    def deployment_history(self, group: str) -> list[Deployment]:
        """The group's deployments, newest (current) first."""
        with self.db.session() as s:
            group_row = q.group_row(s, group)
            rows = s.scalars(
                select(DeploymentRow)
                .where(DeploymentRow.group_id == group_row.id)
                .order_by(DeploymentRow.id.desc())
            ).all()
            return [q.to_deployment(s, r, group) for r in rows]

    def assignment_document(self, deployment: Deployment) -> bytes:
        """The canonical JSON to sign as `groups/<group>/assignment.json` for this deployment."""
        stable = self.get_version(deployment.model, deployment.stable)
        candidate = (
            self.get_version(deployment.model, deployment.candidate)
            if deployment.candidate is not None
            else None
        )
        return rules.assignment_document(deployment, stable, candidate)

    def record_metadata_version(self, deployment: Deployment, version: int) -> Deployment:
        """Note the version of the signed metadata that published this deployment."""
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise InvalidRequestError(f"a metadata version is a positive integer, not {version!r}")
        with self._writing("recording a metadata version") as s:
            row = s.get(DeploymentRow, deployment.id, with_for_update=True)
            if row is None:
                raise NotFoundError(f"there is no deployment {deployment.id}")
            row.metadata_version = version
            s.flush()
            return q.to_deployment(s, row, deployment.group)

    # -- tokens ------------------------------------------------------------------------------

    def create_token(self, name: str) -> str:
        """Make an operator token; returns the plaintext, which is not stored and not shown again."""
        check_name("token", name)
        plaintext = tokens.new_token()

        def create(s: Session) -> None:
            if s.scalar(select(TokenRow).where(TokenRow.name == name, TokenRow.revoked.is_(None))):
                raise ConflictError(f"a token named {name!r} exists; revoke it first or choose another name")
            s.add(TokenRow(name=name, sha256=tokens.token_hash(plaintext), created=self._now(), revoked=None))

        self._transact(f"creating token {name!r}", create)
        return plaintext

    def verify_token(self, plaintext: str) -> str | None:
        """The name of the live token `plaintext` is, or None.

        Looked up by hash: timing can only tell an attacker about the hash of their own guess.
        """
        if not isinstance(plaintext, str) or not tokens.plausible(plaintext):
            return None
        digest = tokens.token_hash(plaintext)
        with self.db.session() as s:
            row = s.scalar(select(TokenRow).where(TokenRow.sha256 == digest))
            if row is None or row.revoked is not None or not tokens.same_hash(row.sha256, digest):
                return None
            return row.name

    def revoke_token(self, name: str) -> None:
        with self._writing(f"revoking token {name!r}") as s:
            row = s.scalar(
                select(TokenRow).where(TokenRow.name == name, TokenRow.revoked.is_(None)).with_for_update()
            )
            if row is None:
                raise NotFoundError(f"there is no live token named {name!r}")
            row.revoked = self._now()

    def list_tokens(self) -> list[TokenInfo]:
        with self.db.session() as s:
            rows = s.scalars(select(TokenRow).order_by(TokenRow.id)).all()
            return [TokenInfo(r.name, r.created, r.revoked) for r in rows]

    # -- helpers -----------------------------------------------------------------------------

    @contextmanager
    def _writing(self, what: str) -> Iterator[Session]:
        """A write transaction; a constraint the database enforces maps to ConflictError."""
        try:
            with self.db.session(write=True) as s:
                yield s
        except sa_exc.IntegrityError as exc:
            raise ConflictError(
                f"{what} conflicted with a concurrent change ({exc.orig}); look again and retry"
            ) from exc

    def _transact(self, what: str, work: Callable[[Session], T]) -> T:
        """`work` in a write transaction, run again once if a concurrent insert beat it.

        On PostgreSQL two requests can both find no row for a new model, group or token
        name and both insert it; the loser's unique violation is not the caller's mistake.
        Run again, it sees the winner's row and answers as if they had not overlapped.
        """
        try:
            with self.db.session(write=True) as s:
                return work(s)
        except sa_exc.IntegrityError:
            pass
        with self._writing(what) as s:
            return work(s)

    @staticmethod
    def _lock_model(s: Session, name: str) -> ModelRow | None:
        return s.scalar(select(ModelRow).where(ModelRow.name == name).with_for_update())

    @staticmethod
    def _check_new_version(s: Session, model: ModelRow, version: int) -> None:
        if version > model.last_version:
            return
        next_version = model.last_version + 1
        if q.find_version(s, model.id, version) is not None:
            raise ConflictError(
                f"{model.name} version {version} exists; versions are immutable: "
                f"push this package as version {next_version}"
            )
        if version < model.last_version:
            raise ConflictError(
                f"{model.name} version {version} must be greater than {model.last_version}, "
                f"the latest pushed; push version {next_version} or higher"
            )
        raise ConflictError(
            f"{model.name} version {version} was pushed before and deleted; versions are never "
            f"reused: push version {next_version} or higher"
        )

    def _insert_deployment(
        self, s: Session, group: GroupRow, model: ModelRow, plan: rules.Plan, actor: str
    ) -> Deployment:
        row = DeploymentRow(
            group_id=group.id,
            model_id=model.id,
            stable_version=plan.stable,
            candidate_version=plan.candidate,
            percent=plan.percent,
            salt=plan.salt,
            previous_stable=plan.previous_stable,
            metadata_version=None,
            created=self._now(),
            created_by=actor,
            experiment=rules.experiment_text(plan.experiment),
            capture=rules.capture_text(plan.capture),
        )
        s.add(row)
        s.flush()
        return q.to_deployment(s, row, group.name, model.name)
