"""Which version this device runs: the group's signed assignment, and the device's canary bucket.

The hub signs one assignment per group (`hub.registry.deployments.assignment_document`):

    {"format": "outpost-assignment/1", "group": ..., "model": ..., "serial": ...,
     "stable": {"version", "manifest", "model", "sha256", "manifest_sha256"},
     "candidate": {...} or null, "percent": 0..100, "salt": ..., "created": ...}

An assignment may also name an experiment (`"experiment"`, null when there is none): `{"mode": "ab",
"weight": W}` or `{"mode": "shadow", "sample": S}`. A device in the canary bucket then keeps the stable
version as its committed default and loads the candidate beside it: in A/B, W% of the requests are
answered by the candidate (sticky by the request's `parameters.key`); in shadow, S% of the requests
are copied to the candidate after the stable version answered, and its answers are only compared.

An assignment may ask for data capture (`"capture"`, null when off): `{"sample_bp": S,
"max_rows_per_min": R}` - S requests in 10,000 (basis points, 1..10000) of every version of the
model this device serves are kept with their predictions and sent to the hub for retraining, at
most R a minute (agent.monitor.capture; the device's `[capture]` settings cap it further).

A version may name hardware variants (`"variants"`, absent or [] when there are none): `[{"name":
"int8", "requires": ["cpu:vnni"], "manifest", "model", "sha256", "manifest_sha256"}, ...]` in order
of preference, each its own signed files of the same version. The version's own `manifest`/`model`
are the generic variant (`"variant"` names it), so an agent that knows no variants installs that.
This agent takes the first variant whose `requires` its hardware meets (each requirement a tag, or
alternatives joined by "|"; agent.runtime.hardware.meets), else the generic one (`pick_variant`).

A device runs the candidate when `bucket(salt, device_id) < percent`, with
`bucket = int(sha256(salt + device_id)[:8], 16) % 100`: the contract in architecture.md, the same
computation as the hub's `in_canary`. Keeping the salt while ramping 10% -> 50% keeps the first
10% inside; a new salt draws a new, independent canary.

Pure: parses and decides, no I/O. A malformed document raises AssignmentError naming the field;
keys this agent does not know are ignored, so a newer hub can add some without breaking devices.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from agent.errors import AssignmentError
from agent.runtime.hardware import meets
from agent.update.lifecycle import VersionRef

ASSIGNMENT_FORMAT = "outpost-assignment/1"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # hub.signing.layout's names
_SALT = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII, no spaces (the hub's rule)
_SHA256 = re.compile(r"[0-9a-f]{64}")

Role = Literal["stable", "candidate"]


def bucket(salt: str, device_id: str) -> int:
    """The device's bucket, 0..99, for this salt."""
    return int(hashlib.sha256((salt + device_id).encode("utf-8")).hexdigest()[:8], 16) % 100


def in_canary(salt: str, device_id: str, percent: int) -> bool:
    """Whether the device runs the candidate of an assignment with this salt and percent."""
    return bucket(salt, device_id) < percent


@dataclass(frozen=True)
class AssignedVersion:
    """One version as the assignment names it: TUF target paths and the hashes that bind them."""

    version: int
    manifest: str  # target path of the manifest
    model: str  # target path of the ONNX file
    sha256: str  # of the ONNX file
    manifest_sha256: str  # of the manifest bytes
    # The hardware variant these files are ("" when the hub names none), and the other variants
    # of the version, in order of preference (empty once a variant was picked).
    variant: str = ""
    variants: tuple[AssignedVariant, ...] = ()


@dataclass(frozen=True)
class AssignedVariant:
    """One hardware variant of a version: the tags it requires and its files."""

    name: str
    requires: tuple[str, ...]
    manifest: str
    model: str
    sha256: str
    manifest_sha256: str


def pick_variant(version: AssignedVersion, tags: frozenset[str] | None) -> AssignedVersion:
    """The first variant whose requirements `tags` meets, as the version to fetch; else the
    generic files. `tags` None: no hardware known, the generic files."""
    if tags is not None:
        for v in version.variants:
            if meets(tags, v.requires):
                return AssignedVersion(
                    version=version.version,
                    manifest=v.manifest,
                    model=v.model,
                    sha256=v.sha256,
                    manifest_sha256=v.manifest_sha256,
                    variant=v.name,
                )
    return dataclasses.replace(version, variants=())


@dataclass(frozen=True)
class Experiment:
    """An on-device experiment: "ab" (weight: % of requests the candidate answers) or "shadow"
    (sample: % of requests copied to the candidate)."""

    mode: Literal["ab", "shadow"]
    weight: int = 0
    sample: int = 0


@dataclass(frozen=True)
class CapturePolicy:
    """Data capture the deployment asks for: `sample_bp` requests in 10,000, at most
    `max_rows_per_min` a minute."""

    sample_bp: int
    max_rows_per_min: int

    @property
    def rate(self) -> float:
        """The share of requests sampled, 0..1."""
        return self.sample_bp / 10_000


@dataclass(frozen=True)
class Choice:
    """What this device should run under an assignment, and why."""

    version: AssignedVersion
    role: Role
    bucket: int
    model: str  # the model's name
    # The experiment this device takes part in, and its candidate arm (loaded beside `version`).
    experiment: Experiment | None = None
    arm: AssignedVersion | None = None

    @property
    def arm_ref(self) -> VersionRef | None:
        return VersionRef(self.model, self.arm.version, self.arm.sha256) if self.arm is not None else None

    @property
    def ref(self) -> VersionRef:
        """The version as the life cycle knows it (Event.assignment's target)."""
        return VersionRef(self.model, self.version.version, self.version.sha256)


@dataclass(frozen=True)
class Assignment:
    """A group's assignment, validated. Build it with `Assignment.parse`."""

    group: str
    model: str
    serial: int
    stable: AssignedVersion
    candidate: AssignedVersion | None
    percent: int
    salt: str
    created: str
    format: str = ASSIGNMENT_FORMAT
    experiment: Experiment | None = None
    capture: CapturePolicy | None = None

    @classmethod
    def parse(cls, doc: bytes | str | Mapping[str, Any], group: str | None = None) -> Assignment:
        """Validate an assignment (its JSON bytes, or the decoded object).

        `group`, when given, must be the document's group. Raises AssignmentError.
        """
        if isinstance(doc, bytes | str):
            try:
                doc = json.loads(doc, parse_constant=_no_constant)
            except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
                raise AssignmentError(f"assignment: not valid JSON ({exc})") from exc
        if not isinstance(doc, Mapping):
            raise AssignmentError("assignment: the document must be a JSON object")
        fmt = doc.get("format")
        if fmt != ASSIGNMENT_FORMAT:
            raise AssignmentError(
                f"assignment: format {fmt!r} is not supported (this agent reads {ASSIGNMENT_FORMAT})"
            )
        doc_group = _name(doc, "group", "")
        if group is not None and doc_group != group:
            raise AssignmentError(f"assignment: it is for group {doc_group!r}, this device is in {group!r}")
        model = _name(doc, "model", "")
        stable = _version(_get(doc, "stable", Mapping, ""), model, "stable.")
        if "candidate" not in doc:
            raise AssignmentError("assignment: candidate is missing (null when there is none)")
        candidate = None
        if doc["candidate"] is not None:
            candidate = _version(_get(doc, "candidate", Mapping, ""), model, "candidate.")
            if candidate.version == stable.version:
                raise AssignmentError("assignment: the candidate is the stable version")
        percent = _int(doc, "percent", "", 0)
        if percent > 100:
            raise AssignmentError(f"assignment: percent must be 0..100, not {percent}")
        if candidate is None and percent != 0:
            raise AssignmentError(f"assignment: percent is {percent} but there is no candidate")
        salt = _get(doc, "salt", str, "")
        if not _SALT.fullmatch(salt):
            raise AssignmentError("assignment: salt must be 1-128 printable ASCII characters without spaces")
        experiment = _experiment(doc.get("experiment"))
        if experiment is not None and candidate is None:
            raise AssignmentError("assignment: an experiment needs a candidate")
        return cls(
            group=doc_group,
            model=model,
            serial=_int(doc, "serial", "", 0),
            stable=stable,
            candidate=candidate,
            percent=percent,
            salt=salt,
            created=_get(doc, "created", str, ""),
            experiment=experiment,
            capture=_capture(doc.get("capture")),
        )


def variant_by_hash(version: AssignedVersion, sha256: str) -> AssignedVersion | None:
    """The variant of `version` (the generic files included) whose model has this SHA-256."""
    if version.sha256 == sha256:
        return dataclasses.replace(version, variants=())
    for v in version.variants:
        if v.sha256 == sha256:
            return AssignedVersion(version.version, v.manifest, v.model, v.sha256, v.manifest_sha256, v.name)
    return None


def choose(
    assignment: Assignment,
    device_id: str,
    hardware: frozenset[str] | None = None,
    keep: VersionRef | None = None,
) -> Choice:
    """Stable or candidate for this device: the candidate when its bucket is under `percent`.

    With an experiment, a device in the bucket keeps the stable version (the update life cycle's
    target) and takes the candidate as the experiment's arm instead. Each version is the variant
    that fits `hardware` (the device's tags; None: the generic files), except `keep` (the version
    this device runs): a version is installed once, so a device whose tags changed keeps the
    variant of it that it has, and picks afresh from the next version on."""
    if not isinstance(device_id, str) or not device_id:
        raise ValueError("choose: device_id must be a non-empty string")

    def pick(version: AssignedVersion) -> AssignedVersion:
        if keep is not None and (keep.model, keep.version) == (assignment.model, version.version):
            kept = variant_by_hash(version, keep.sha256)
            if kept is not None:
                return kept
        return pick_variant(version, hardware)

    b = bucket(assignment.salt, device_id)
    stable = pick(assignment.stable)
    if assignment.candidate is not None and b < assignment.percent:
        candidate = pick(assignment.candidate)
        if assignment.experiment is not None:
            return Choice(stable, "stable", b, assignment.model, assignment.experiment, candidate)
        return Choice(candidate, "candidate", b, assignment.model)
    return Choice(stable, "stable", b, assignment.model)


def ab_arm(salt: str, key: str | None, weight: int, draw: float) -> bool:
    """Whether the candidate answers this request of an A/B experiment: sticky by `key` (the same
    key always gets the same answer under one salt), else by `draw` (uniform in [0, 1))."""
    if key is not None:
        return bucket(salt, "key:" + key) < weight
    return draw * 100.0 < weight


def _experiment(doc: Any) -> Experiment | None:
    if doc is None:
        return None
    if not isinstance(doc, Mapping):
        raise AssignmentError("assignment: experiment must be an object or null")
    mode = doc.get("mode")
    if mode == "ab":
        weight = _int(doc, "weight", "experiment.", 1)
        if weight > 99:
            raise AssignmentError(f"assignment: experiment.weight must be 1..99, not {weight}")
        return Experiment("ab", weight=weight)
    if mode == "shadow":
        sample = _int(doc, "sample", "experiment.", 1)
        if sample > 100:
            raise AssignmentError(f"assignment: experiment.sample must be 1..100, not {sample}")
        return Experiment("shadow", sample=sample)
    raise AssignmentError(f"assignment: experiment.mode must be 'ab' or 'shadow', not {mode!r}")


def _capture(doc: Any) -> CapturePolicy | None:
    if doc is None:
        return None
    if not isinstance(doc, Mapping):
        raise AssignmentError("assignment: capture must be an object or null")
    sample = _int(doc, "sample_bp", "capture.", 1)
    if sample > 10_000:
        raise AssignmentError(f"assignment: capture.sample_bp must be 1..10000, not {sample}")
    rate = _int(doc, "max_rows_per_min", "capture.", 1)
    return CapturePolicy(sample, rate)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _get(doc: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in doc:
        raise AssignmentError(f"assignment: {where}{key} is missing")
    value = doc[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise AssignmentError(f"assignment: {where}{key} must be {_KIND_NAMES.get(kind, kind.__name__)}")
    return value


_KIND_NAMES: dict[type, str] = {Mapping: "an object", str: "a string", int: "an integer"}


def _int(doc: Mapping[str, Any], key: str, where: str, minimum: int) -> int:
    value: int = _get(doc, key, int, where)
    if value < minimum:
        raise AssignmentError(f"assignment: {where}{key} must be at least {minimum}, not {value}")
    return value


def _name(doc: Mapping[str, Any], key: str, where: str) -> str:
    value: str = _get(doc, key, str, where)
    if not _NAME.fullmatch(value):
        raise AssignmentError(f"assignment: {where}{key} {value!r} is not a valid name")
    return value


def _version(doc: Mapping[str, Any], model: str, where: str) -> AssignedVersion:
    version = _int(doc, "version", where, 1)
    prefix = f"models/{model}/{version}/"
    paths, hashes = _files(doc, prefix, where)
    variant = doc.get("variant", "")
    if not isinstance(variant, str):
        raise AssignmentError(f"assignment: {where}variant must be a string")
    return AssignedVersion(
        version=version,
        manifest=paths["manifest"],
        model=paths["model"],
        sha256=hashes["sha256"],
        manifest_sha256=hashes["manifest_sha256"],
        variant=variant,
        variants=_variants(doc.get("variants", []), prefix, where),
    )


def _files(doc: Mapping[str, Any], prefix: str, where: str) -> tuple[dict[str, str], dict[str, str]]:
    paths = {}
    for key in ("manifest", "model"):
        path: str = _get(doc, key, str, where)
        # The files must be this version's: a path elsewhere would install other bytes under
        # this version's name. (TUF checks who signed them; this checks what they claim to be.)
        if not path.startswith(prefix) or "/" in path[len(prefix) :] or path == prefix:
            raise AssignmentError(f"assignment: {where}{key} {path!r} is not a file under {prefix}")
        paths[key] = path
    hashes = {}
    for key in ("sha256", "manifest_sha256"):
        digest: str = _get(doc, key, str, where)
        if not _SHA256.fullmatch(digest):
            raise AssignmentError(f"assignment: {where}{key} must be 64 lowercase hex digits")
        hashes[key] = digest
    return paths, hashes


def _variants(items: Any, prefix: str, where: str) -> tuple[AssignedVariant, ...]:
    if not isinstance(items, list):
        raise AssignmentError(f"assignment: {where}variants must be a list")
    out = []
    for i, doc in enumerate(items):
        at = f"{where}variants[{i}]."
        if not isinstance(doc, Mapping):
            raise AssignmentError(f"assignment: {where}variants[{i}] must be an object")
        name = _get(doc, "name", str, at)
        requires = doc.get("requires", [])
        if not isinstance(requires, list) or not all(isinstance(t, str) for t in requires):
            raise AssignmentError(f"assignment: {at}requires must be a list of strings")
        paths, hashes = _files(doc, prefix, at)
        out.append(AssignedVariant(name, tuple(requires), paths["manifest"], paths["model"], **hashes))
    return tuple(out)
