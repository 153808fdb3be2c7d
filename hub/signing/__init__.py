"""The hub's signed distribution: a TUF repository of model versions and group assignments.

    from hub.signing import ExpiryPolicy, KeyStore, SignedRepository

    repo = SignedRepository(data / "tuf", KeyStore.under(data / "keys"))
    repo.create()                                    # once: root v1 ... timestamp v1
    repo.add_model_version("wine", 3, {"manifest.json": m, "model.onnx": onnx})
    repo.set_assignment("default", assignment_json)  # creates the group's role on first use
    repo.refresh()                                   # periodically: re-sign before expiry

Errors are `hub.errors.SigningError` and its subclasses. See `repository` for the roles and
`layout` for the files on disk; `mirror` and `lock` for the repository kept in an object store
and signed from several hosts in turn (`tuf_state = "s3"`, built by hub.objectstore).
"""

from hub.signing.expiry import Clock, ExpiryPolicy, system_clock
from hub.signing.keys import OFFLINE_ROLES, ONLINE_ROLES, KeyStore
from hub.signing.layout import (
    ASSIGNMENT_FILE,
    DEPLOY,
    MODELS,
    ROOT,
    SNAPSHOT,
    TARGETS,
    TIMESTAMP,
    Layout,
    assignment_target,
    group_role,
    model_target,
)
from hub.signing.repository import KeyRotation, RefreshReport, SignedRepository

__all__ = [
    "ASSIGNMENT_FILE",
    "DEPLOY",
    "MODELS",
    "OFFLINE_ROLES",
    "ONLINE_ROLES",
    "ROOT",
    "SNAPSHOT",
    "TARGETS",
    "TIMESTAMP",
    "Clock",
    "ExpiryPolicy",
    "KeyRotation",
    "KeyStore",
    "Layout",
    "RefreshReport",
    "SignedRepository",
    "assignment_target",
    "group_role",
    "model_target",
    "system_clock",
]
