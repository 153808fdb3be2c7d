"""Deployment rules, pure: what a new deployment row holds, and the assignment document.

A group's deployment names one model, a stable version and optionally a candidate that a
share (`percent`) of the group's devices runs instead: a device is in the canary when
`int(sha256(salt + device_id)[:8], 16) % 100 < percent` (`in_canary`).

Rules:
- percent is an integer in 0..100; without a candidate it must be 0; a candidate differs
  from the stable version.
- previous_stable is where a rollback goes. It is the prior row's stable version when the
  stable version changes, the prior row's previous_stable when it does not (changing only
  the canary keeps the rollback target), and None when the group switches models.
- A rollback makes stable = previous_stable, drops the candidate, and takes the
  previous_stable the group had when that version was last its stable one; so repeated
  rollbacks walk back through the stable versions (v3 -> v2 -> v1), and a rollback never
  re-deploys the version it just left.
- An experiment ({"mode": "ab", "weight": 1..99} or {"mode": "shadow", "sample": 1..100})
  needs a candidate and a percent of at least 1: the devices in the canary bucket run it
  (stable stays their default, the candidate is loaded beside it) instead of switching to
  the candidate. Any new deployment without one (a rollback too) ends it.
- Data capture ({"sample_bp": 1..10000, "max_rows_per_min": 1..6000}, or null: off) applies
  to every version of the model the devices serve. A new deployment of the same model keeps
  the prior capture unless the request names one (KEEP_CAPTURE: not named); a rollback keeps
  it; a deployment of another model starts without (unless the request names one).
- Without a salt given, a deployment keeps the prior salt while the candidate stays the
  same (ramping 10% -> 50% keeps the first 10% in the canary) and draws a new one otherwise.

The assignment document is canonical JSON: keys sorted, no whitespace, ASCII only, integers
and strings only, so the same deployment always gives the same bytes (and the same hash).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC
from typing import Any, Literal

from hub.errors import ConflictError, InvalidRequestError
from hub.registry.records import (
    CAPTURE_DEFAULT_MAX_ROWS_PER_MIN,
    EXPERIMENT_MODES,
    Capture,
    Deployment,
    Experiment,
    VersionInfo,
)

ASSIGNMENT_FORMAT = "outpost-assignment/1"
SALT_RE = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII, no spaces
MAX_ACTOR_CHARS = 128


def new_salt() -> str:
    return secrets.token_hex(16)


def in_canary(salt: str, device_id: str, percent: int) -> bool:
    """Whether a device runs the candidate: the rule devices apply to the assignment."""
    bucket = int(hashlib.sha256((salt + device_id).encode("utf-8")).hexdigest()[:8], 16) % 100
    return bucket < percent


@dataclass(frozen=True)
class Plan:
    """The values of the deployment row to insert."""

    model: str
    stable: int
    candidate: int | None
    percent: int
    salt: str
    previous_stable: int | None
    experiment: Experiment | None = None
    capture: Capture | None = None


# The range of an experiment's value, by mode: the candidate's weight, the shadow sample.
EXPERIMENT_RANGES = {"ab": (1, 99), "shadow": (1, 100)}


def parse_experiment(doc: Any) -> Experiment | None:
    """An experiment from its JSON object ({"mode": "ab", "weight": W} or {"mode": "shadow",
    "sample": S}), or None for null; InvalidRequestError when it is neither."""
    if doc is None:
        return None
    if not isinstance(doc, dict):
        raise InvalidRequestError(
            'an experiment is {"mode": "ab", "weight": W} or {"mode": "shadow", "sample": S}'
        )
    mode = doc.get("mode")
    if mode not in EXPERIMENT_MODES:
        raise InvalidRequestError(f'the experiment mode must be "ab" or "shadow", not {mode!r}')
    key = "weight" if mode == "ab" else "sample"
    extra = sorted(set(doc) - {"mode", key})
    if extra:
        raise InvalidRequestError(f"a {mode} experiment takes mode and {key} only, not {', '.join(extra)}")
    value = doc.get(key)
    low, high = EXPERIMENT_RANGES[mode]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidRequestError(
            f"the {mode} experiment's {key} must be an integer from {low} to {high} (percent), not {value!r}"
        )
    return Experiment(mode, value)


def check_experiment(experiment: Experiment | None, candidate: int | None, percent: int) -> None:
    """An experiment compares the candidate with the stable version on the canary's devices."""
    if experiment is None:
        return
    parse_experiment(experiment.to_json())  # mode and range
    if candidate is None:
        raise InvalidRequestError(f"a {experiment.mode} experiment needs a candidate version")
    if percent < 1:
        raise InvalidRequestError(
            "an experiment runs on the devices in the canary: give a percent of at least 1 "
            "(100: every device)"
        )


def experiment_text(experiment: Experiment | None) -> str | None:
    """How the deployments table stores an experiment."""
    return None if experiment is None else canonical_json(experiment.to_json()).decode("ascii")


# Data capture's ranges: requests in 10,000 (basis points), requests a minute per device.
CAPTURE_SAMPLE_BP = (1, 10_000)
CAPTURE_MAX_ROWS_PER_MIN = (1, 6000)
# What a deployment request that does not name `capture` means: keep the group's (same model).
KEEP_CAPTURE: Literal["keep"] = "keep"
CaptureChoice = Capture | None | Literal["keep"]


def parse_capture(doc: Any) -> Capture | None:
    """Data capture from its JSON object ({"sample_bp": S, "max_rows_per_min": R}; R defaults
    to 60), or None for null; InvalidRequestError otherwise."""
    if doc is None:
        return None
    if not isinstance(doc, dict):
        raise InvalidRequestError('capture is {"sample_bp": S, "max_rows_per_min": R} or null')
    extra = sorted(set(doc) - {"sample_bp", "max_rows_per_min"})
    if extra:
        raise InvalidRequestError(
            f"capture takes sample_bp and max_rows_per_min only, not {', '.join(extra)}"
        )
    if "sample_bp" not in doc:
        raise InvalidRequestError("capture needs sample_bp: the requests captured in 10,000 (1..10000)")
    sample = doc["sample_bp"]
    rate = doc.get("max_rows_per_min", CAPTURE_DEFAULT_MAX_ROWS_PER_MIN)
    for key, value, (low, high), unit in (
        ("sample_bp", sample, CAPTURE_SAMPLE_BP, "requests in 10,000; 100 is 1%"),
        ("max_rows_per_min", rate, CAPTURE_MAX_ROWS_PER_MIN, "requests a minute per device"),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise InvalidRequestError(
                f"capture {key} must be an integer from {low} to {high} ({unit}), not {value!r}"
            )
    return Capture(sample, rate)


def check_capture(capture: CaptureChoice) -> None:
    if isinstance(capture, Capture):
        parse_capture(capture.to_json())


def capture_text(capture: Capture | None) -> str | None:
    """How the deployments table stores data capture."""
    return None if capture is None else canonical_json(capture.to_json()).decode("ascii")


def check_request(stable: int, candidate: int | None, percent: int, salt: str | None, actor: str) -> None:
    """Refuse values out of range, before looking at the database."""
    for what, value in (("stable version", stable), ("candidate version", candidate)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InvalidRequestError(f"the {what} must be a positive integer, not {value!r}")
    if isinstance(percent, bool) or not isinstance(percent, int) or not 0 <= percent <= 100:
        raise InvalidRequestError(f"percent must be an integer from 0 to 100, not {percent!r}")
    if candidate is None and percent != 0:
        raise InvalidRequestError(f"percent is {percent} but there is no candidate; give a candidate version")
    if candidate is not None and candidate == stable:
        raise InvalidRequestError(f"the candidate is the stable version ({stable}); give a different one")
    if salt is not None and not SALT_RE.fullmatch(salt):
        raise InvalidRequestError("the salt must be 1-128 printable ASCII characters without spaces")
    check_actor(actor)


def check_actor(actor: str) -> None:
    if not isinstance(actor, str) or len(actor) > MAX_ACTOR_CHARS:
        raise InvalidRequestError(f"the actor must be a string of at most {MAX_ACTOR_CHARS} characters")


def plan_deployment(
    prior: Deployment | None,
    model: str,
    stable: int,
    candidate: int | None,
    percent: int,
    salt: str | None,
    make_salt: Callable[[], str] = new_salt,
    experiment: Experiment | None = None,
    capture: CaptureChoice = KEEP_CAPTURE,
) -> Plan:
    """The row a deployment request makes, given the group's current row (if any)."""
    same_model = prior is not None and prior.model == model
    kept = capture if not isinstance(capture, str) else prior.capture if same_model and prior else None
    if prior is None or not same_model:
        previous = None
    elif prior.stable != stable:
        previous = prior.stable
    else:
        previous = prior.previous_stable
    if salt is None:
        keep = same_model and prior is not None and candidate is not None and prior.candidate == candidate
        salt = prior.salt if keep and prior is not None else make_salt()
    return Plan(model, stable, candidate, percent, salt, previous, experiment, kept)


def same_as(prior: Deployment | None, plan: Plan) -> bool:
    """Whether `plan` would publish exactly what `prior` does (a repeated request)."""
    return prior is not None and (
        prior.model,
        prior.stable,
        prior.candidate,
        prior.percent,
        prior.salt,
        prior.previous_stable,
        prior.experiment,
        prior.capture,
    ) == (
        plan.model,
        plan.stable,
        plan.candidate,
        plan.percent,
        plan.salt,
        plan.previous_stable,
        plan.experiment,
        plan.capture,
    )


def plan_rollback(history: Sequence[Deployment]) -> Plan:
    """The row a rollback makes, given the group's history, newest first."""
    if not history:
        raise ConflictError("the group has no deployment to roll back")
    current = history[0]
    target = current.previous_stable
    if target is None:
        raise ConflictError(
            f"group {current.group!r} has no earlier stable version of {current.model!r} to roll back "
            f"to (it runs version {current.stable}); deploy a version explicitly"
        )
    earlier = next(
        (d for d in history[1:] if d.model == current.model and d.stable == target),
        None,
    )
    previous = earlier.previous_stable if earlier is not None else None
    return Plan(current.model, target, None, 0, current.salt, previous, capture=current.capture)


def _version_doc(info: VersionInfo) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "version": info.version,
        "manifest": info.manifest_target,
        "manifest_sha256": info.manifest_sha256,
        "model": info.model_target,
        "sha256": info.model_sha256,
    }
    # Hardware variants (hub.registry.variants): manifest/model above stay the generic files,
    # which agents that know no variants install; the others are listed in order of preference.
    m = info.manifest
    if m is not None and (m.variant is not None or m.variants):  # tests build infos without one
        prefix = f"models/{info.model}/{info.version}/"
        doc["variant"] = m.variant.name if m.variant is not None else ""
        doc["variants"] = [
            {
                "name": v.name,
                "requires": list(v.requires),
                "manifest": prefix + v.manifest,
                "manifest_sha256": v.manifest_sha256,
                "model": prefix + v.model,
                "sha256": v.sha256,
            }
            for v in m.variants
        ]
    return doc


def canonical_json(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode(
        "ascii"
    )


def assignment_document(deployment: Deployment, stable: VersionInfo, candidate: VersionInfo | None) -> bytes:
    """The canonical JSON signed as `groups/<group>/assignment.json`."""
    if stable.model != deployment.model or stable.version != deployment.stable:
        raise ValueError("assignment_document: the stable version does not belong to the deployment")
    if (candidate.version if candidate is not None else None) != deployment.candidate:
        raise ValueError("assignment_document: the candidate version does not belong to the deployment")
    return canonical_json(
        {
            "format": ASSIGNMENT_FORMAT,
            "group": deployment.group,
            "model": deployment.model,
            "serial": deployment.serial,
            "stable": _version_doc(stable),
            "candidate": _version_doc(candidate) if candidate is not None else None,
            "percent": deployment.percent,
            "salt": deployment.salt,
            "experiment": deployment.experiment.to_json() if deployment.experiment is not None else None,
            "capture": deployment.capture.to_json() if deployment.capture is not None else None,
            "created": deployment.created.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
    )
