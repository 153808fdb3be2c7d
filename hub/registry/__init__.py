"""The hub's model registry: model versions, deployments and operator tokens.

    db = Database("sqlite:///var/lib/outpost-hub/registry.db"); db.create_all()
    registry = Registry(db, BlobStore(Path("/var/lib/outpost-hub/blobs")))
    info = registry.push_version(manifest_bytes, model_bytes)     # validated, stored
    d = registry.set_deployment("default", "wine", stable=info.version, actor="ops")
    document = registry.assignment_document(d)                    # to sign

Modules: `db` (tables, engine), `blobs` (content-addressed files; `s3blobs`: in a bucket),
`validate` (package checks), `deployments` (pure deployment rules and the assignment
document), `tokens` (pure token helpers), `records` (the dataclasses handed out), `service`
(the `Registry`).
Errors are the `RegistryError` branch of `hub.errors`.
"""

from hub.registry.blobs import Blobs, BlobStore
from hub.registry.db import Database
from hub.registry.deployments import assignment_document, canonical_json, in_canary
from hub.registry.records import (
    Deployment,
    Experiment,
    GroupInfo,
    ModelInfo,
    TokenInfo,
    VersionInfo,
    assignment_target,
    manifest_target,
    model_target,
)
from hub.registry.service import Registry
from hub.registry.validate import Limits, validate_package

__all__ = [
    "BlobStore",
    "Blobs",
    "Database",
    "Deployment",
    "Experiment",
    "GroupInfo",
    "Limits",
    "ModelInfo",
    "Registry",
    "TokenInfo",
    "VersionInfo",
    "assignment_document",
    "assignment_target",
    "canonical_json",
    "in_canary",
    "manifest_target",
    "model_target",
    "validate_package",
]
