"""The registry's queries and the conversions from rows to records.

Each function takes an open session and returns rows or records; lookups by name raise
NotFoundError with the message the operator sees.
"""

from __future__ import annotations

import json

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from agent.package.manifest import Manifest
from hub.errors import NotFoundError
from hub.registry.db import DeploymentRow, GroupRow, ModelRow, VersionRow
from hub.registry.records import Capture, Deployment, Experiment, ModelInfo, VersionInfo
from hub.registry.validate import parse_manifest_bytes


def find_version(s: Session, model_id: int, version: int) -> VersionRow | None:
    return s.scalar(select(VersionRow).where(VersionRow.model_id == model_id, VersionRow.version == version))


def model_row(s: Session, name: str, *, lock: bool = False) -> ModelRow:
    query = select(ModelRow).where(ModelRow.name == name)
    model = s.scalar(query.with_for_update() if lock else query)
    if model is None:
        raise NotFoundError(f"there is no model named {name!r}")
    return model


def version_row(s: Session, model: ModelRow, version: int) -> VersionRow:
    row = find_version(s, model.id, version)
    if row is None:
        raise NotFoundError(f"model {model.name!r} has no version {version}")
    return row


def group_row(s: Session, name: str, *, lock: bool = False) -> GroupRow:
    query = select(GroupRow).where(GroupRow.name == name)
    group = s.scalar(query.with_for_update() if lock else query)
    if group is None:
        raise NotFoundError(f"there is no group named {name!r}")
    return group


def current_row(s: Session, group_id: int) -> DeploymentRow | None:
    return s.scalar(
        select(DeploymentRow)
        .where(DeploymentRow.group_id == group_id)
        .order_by(DeploymentRow.id.desc())
        .limit(1)
    )


def current_rows(s: Session, model_id: int | None = None) -> list[tuple[DeploymentRow, str]]:
    """Every group's current deployment row with the group's name (optionally of one model)."""
    latest = select(func.max(DeploymentRow.id)).group_by(DeploymentRow.group_id).scalar_subquery()
    query = (
        select(DeploymentRow, GroupRow.name)
        .join(GroupRow, GroupRow.id == DeploymentRow.group_id)
        .where(DeploymentRow.id.in_(latest))
        .order_by(GroupRow.name)
    )
    if model_id is not None:
        query = query.where(DeploymentRow.model_id == model_id)
    return [(d, name) for d, name in s.execute(query)]


def blob_referenced(s: Session, digest: str) -> bool:
    query = select(VersionRow.id).where(
        or_(
            VersionRow.model_sha256 == digest,
            VersionRow.manifest_sha256 == digest,
            # a hardware variant's file, listed (by hash) in a version's manifest
            VersionRow.manifest.contains(digest, autoescape=True),
        )
    )
    return s.scalar(query.limit(1)) is not None


def versions_by_model(s: Session, model_id: int | None = None) -> dict[int, tuple[int, ...]]:
    query = select(VersionRow.model_id, VersionRow.version).order_by(VersionRow.version)
    if model_id is not None:
        query = query.where(VersionRow.model_id == model_id)
    out: dict[int, list[int]] = {}
    for mid, version in s.execute(query):
        out.setdefault(mid, []).append(version)
    return {k: tuple(v) for k, v in out.items()}


def to_model_info(model: ModelRow, versions: tuple[int, ...]) -> ModelInfo:
    return ModelInfo(model.name, model.created, versions, model.last_version)


def to_version_info(model: str, row: VersionRow, manifest: Manifest | None = None) -> VersionInfo:
    if manifest is None:
        # Stored only after validation, so this parses; a failure means the database was edited.
        manifest = parse_manifest_bytes(row.manifest.encode("utf-8"))
    return VersionInfo(
        model=model,
        version=row.version,
        manifest=manifest,
        manifest_sha256=row.manifest_sha256,
        manifest_size=row.manifest_size,
        model_sha256=row.model_sha256,
        model_size=row.model_size,
        created=row.created,
    )


def to_deployment(s: Session, row: DeploymentRow, group: str, model: str | None = None) -> Deployment:
    if model is None:
        model = s.scalar(select(ModelRow.name).where(ModelRow.id == row.model_id)) or ""
    return Deployment(
        id=row.id,
        group=group,
        model=model,
        stable=row.stable_version,
        candidate=row.candidate_version,
        percent=row.percent,
        salt=row.salt,
        previous_stable=row.previous_stable,
        metadata_version=row.metadata_version,
        created=row.created,
        created_by=row.created_by,
        experiment=experiment_from_text(row.experiment),
        capture=capture_from_text(row.capture),
    )


def experiment_from_text(text: str | None) -> Experiment | None:
    """The stored experiment column (written by the service from a checked Experiment)."""
    if not text:
        return None
    doc = json.loads(text)
    mode = str(doc["mode"])
    return Experiment(mode, int(doc["weight" if mode == "ab" else "sample"]))


def capture_from_text(text: str | None) -> Capture | None:
    """The stored capture column (written by the service from a checked Capture)."""
    if not text:
        return None
    doc = json.loads(text)
    return Capture(int(doc["sample_bp"]), int(doc["max_rows_per_min"]))
