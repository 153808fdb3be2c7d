"""What the registry hands out: frozen dataclasses, never ORM objects.

Callers (the HTTP API, the signer, the CLI) keep these after the database session that read
them has closed; nothing here can lazily touch the database.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from agent.package.manifest import MANIFEST_FILE, Manifest

# The model file's name in every signed target path, whatever the uploader called it.
MODEL_TARGET_FILE = "model.onnx"


def manifest_target(model: str, version: int) -> str:
    """The TUF target path of a version's manifest."""
    return f"models/{model}/{version}/{MANIFEST_FILE}"


def model_target(model: str, version: int) -> str:
    """The TUF target path of a version's ONNX model."""
    return f"models/{model}/{version}/{MODEL_TARGET_FILE}"


def assignment_target(group: str) -> str:
    """The TUF target path of a group's assignment."""
    return f"groups/{group}/assignment.json"


@dataclass(frozen=True)
class ModelInfo:
    name: str
    created: datetime
    versions: tuple[int, ...]  # the stored versions, ascending
    last_version: int  # the highest ever accepted (deleted or not); the next push must exceed it

    @property
    def latest_version(self) -> int | None:
        return self.versions[-1] if self.versions else None


@dataclass(frozen=True)
class VersionInfo:
    model: str
    version: int
    manifest: Manifest
    manifest_sha256: str  # of the manifest bytes as uploaded, which are what gets signed
    manifest_size: int
    model_sha256: str
    model_size: int
    created: datetime

    @property
    def manifest_target(self) -> str:
        return manifest_target(self.model, self.version)

    @property
    def model_target(self) -> str:
        return model_target(self.model, self.version)


EXPERIMENT_MODES = ("ab", "shadow")


@dataclass(frozen=True)
class Experiment:
    """An on-device experiment between a deployment's stable version and its candidate.

    mode "ab": the candidate answers `value` percent (1..99) of the requests (its "weight");
    mode "shadow": `value` percent (1..100) of the requests are copied to the candidate after
    the stable version answered (its "sample"). Devices in the canary bucket run it.
    """

    mode: str
    value: int

    @property
    def key(self) -> str:
        return "weight" if self.mode == "ab" else "sample"

    def to_json(self) -> dict[str, str | int]:
        """The assignment's `experiment` object: {"mode": "ab", "weight": W} or
        {"mode": "shadow", "sample": S}."""
        return {"mode": self.mode, self.key: self.value}


CAPTURE_DEFAULT_MAX_ROWS_PER_MIN = 60


@dataclass(frozen=True)
class Capture:
    """Data capture a deployment asks its devices for (hub.capture): `sample_bp` requests in
    10,000 (basis points, 1..10000) are captured with their predictions, at most
    `max_rows_per_min` (1..6000) a minute per device, for every version of the model."""

    sample_bp: int
    max_rows_per_min: int = CAPTURE_DEFAULT_MAX_ROWS_PER_MIN

    def to_json(self) -> dict[str, int]:
        """The assignment's `capture` object: {"sample_bp": S, "max_rows_per_min": R}."""
        return {"sample_bp": self.sample_bp, "max_rows_per_min": self.max_rows_per_min}


@dataclass(frozen=True)
class Deployment:
    """One row of a group's deployment history; the newest row is the current deployment."""

    id: int  # increasing across all groups; the assignment's serial
    group: str
    model: str
    stable: int
    candidate: int | None
    percent: int  # share of the group's devices (0..100) that run the candidate
    salt: str
    previous_stable: int | None  # where a rollback goes; None: nowhere
    metadata_version: int | None  # of the signed metadata publishing this row, once known
    created: datetime
    created_by: str
    experiment: Experiment | None = None  # devices in the canary run it instead of the candidate
    capture: Capture | None = None  # data capture for retraining; None: off

    @property
    def serial(self) -> int:
        return self.id


@dataclass(frozen=True)
class GroupInfo:
    name: str
    created: datetime
    deployment: Deployment | None


@dataclass(frozen=True)
class TokenInfo:
    name: str
    created: datetime
    revoked: datetime | None

    @property
    def active(self) -> bool:
        return self.revoked is None
