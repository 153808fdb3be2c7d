"""Validation of an uploaded model package, before the hub stores or signs anything.

A package passes only if, in this order (cheap checks first, so a huge or malformed upload
costs little):

1. the manifest and the model are within `Limits`;
2. the manifest is UTF-8 JSON that the agent's own `parse_manifest` accepts;
3. it carries self-test vectors: devices run them before trusting a version, so the hub
   refuses packages without them;
4. the model's size and SHA-256 are the ones the manifest states;
5. onnxruntime loads the model, with the agent's own session adapter;
6. the model's inputs and outputs are the manifest's (names, datatypes, and shapes where
   both sides fix them);
7. the self-test inputs reproduce the expected outputs within the manifest's tolerance.

Every refusal is a `PackageRejected` (`PackageTooLarge` for step 1) whose message says what
is wrong and what to do; foreign exceptions never escape. `check_package` is steps 1-4 and
pure; `check_model_runs` is steps 5-7 and the only part that touches onnxruntime and the disk
(a temporary file, as the agent loads models from files).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from agent.errors import ModelLoadError, PackageError
from agent.package.manifest import Manifest, TensorSpec, parse_manifest
from agent.runtime.registry import check_signature, run_self_test
from agent.runtime.session import OrtSession, SessionOptions
from hub.errors import PackageRejected, PackageTooLarge

MiB = 1024 * 1024
# The largest version number the registry can store: versions are INTEGER columns, 32-bit on
# PostgreSQL (a larger one was a 500 from the database driver, found by fuzzing the API).
MAX_VERSION = 2**31 - 1
NO_SELF_TEST = (
    "manifest: self_test is missing or empty; the hub requires self-test vectors (inputs and "
    "expected outputs), because devices run them before trusting a version. `outpost package` "
    "writes them"
)


@dataclass(frozen=True)
class Limits:
    """Upper bounds on what the registry accepts."""

    max_model_bytes: int = 256 * MiB
    max_manifest_bytes: int = 4 * MiB


def _size(n: int) -> str:
    return f"{n / MiB:.1f} MiB" if n >= MiB else f"{n} bytes"


def check_sizes(manifest_size: int, model_size: int, limits: Limits) -> None:
    if manifest_size > limits.max_manifest_bytes:
        raise PackageTooLarge(
            f"the manifest is {_size(manifest_size)}; the hub accepts at most "
            f"{_size(limits.max_manifest_bytes)} (Limits.max_manifest_bytes)"
        )
    if model_size > limits.max_model_bytes:
        raise PackageTooLarge(
            f"the model is {_size(model_size)}; the hub accepts at most {_size(limits.max_model_bytes)} "
            "(Limits.max_model_bytes): quantize it, or raise the hub's limit"
        )


def parse_manifest_bytes(manifest_bytes: bytes) -> Manifest:
    try:
        text = manifest_bytes.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PackageRejected(f"manifest.json is not UTF-8 text (byte {exc.start})") from exc
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise PackageRejected(f"manifest.json is not valid JSON: {exc}") from exc
    try:
        return parse_manifest(doc)
    except PackageError as exc:
        raise PackageRejected(str(exc)) from exc


def check_package(manifest_bytes: bytes, model_bytes: bytes, limits: Limits) -> Manifest:
    """Steps 1-4: sizes, manifest, self-test presence, model identity. Pure."""
    check_sizes(len(manifest_bytes), len(model_bytes), limits)
    manifest = parse_manifest_bytes(manifest_bytes)
    if manifest.version > MAX_VERSION:
        raise PackageRejected(
            f"manifest: version {manifest.version} is over the largest the hub keeps, {MAX_VERSION}"
        )
    if manifest.self_test is None or not manifest.self_test.inputs or not manifest.self_test.outputs:
        raise PackageRejected(NO_SELF_TEST)
    if len(model_bytes) != manifest.model.size:
        raise PackageRejected(
            f"the model is {len(model_bytes)} bytes but the manifest says {manifest.model.size}: "
            "the upload is truncated, or the manifest belongs to another model"
        )
    actual = hashlib.sha256(model_bytes).hexdigest()
    if actual != manifest.model.sha256:
        raise PackageRejected(
            f"the model's SHA-256 is {actual} but the manifest says {manifest.model.sha256}: "
            "the model is corrupt, or the manifest belongs to another model"
        )
    return manifest


def shape_mismatch(kind: str, declared: TensorSpec, actual: TensorSpec) -> str | None:
    """What differs between a manifest shape and the model's, where both are known; else None."""
    if not actual.shape:  # the model leaves this tensor's rank open
        return None
    if len(declared.shape) != len(actual.shape) or any(
        d >= 0 and a >= 0 and d != a for d, a in zip(declared.shape, actual.shape, strict=True)
    ):
        return (
            f"{kind} {declared.name!r} has shape {list(actual.shape)} in the ONNX model, "
            f"{list(declared.shape)} in the manifest (-1 = any size)"
        )
    return None


def check_model_runs(manifest: Manifest, model_bytes: bytes) -> None:
    """Steps 5-7: onnxruntime loads the model, its signature and its self-test match."""
    if manifest.self_test is None:
        raise PackageRejected(NO_SELF_TEST)
    with tempfile.TemporaryDirectory(prefix="outpost-validate-") as tmp:
        path = Path(tmp) / "model.onnx"
        path.write_bytes(model_bytes)
        try:
            session = OrtSession(path, SessionOptions())
        except ModelLoadError as exc:
            reason = str(exc).replace(f"onnxruntime could not load {path}: ", "")
            raise PackageRejected(f"onnxruntime cannot load the model: {reason}") from exc
    try:
        check_signature(manifest, session)
    except ModelLoadError as exc:
        raise PackageRejected(f"the model does not match its manifest: {exc}") from exc
    actual = {s.name: s for s in (*session.inputs, *session.outputs)}
    for kind, specs in (("input", manifest.inputs), ("output", manifest.outputs)):
        for spec in specs:
            if problem := shape_mismatch(kind, spec, actual[spec.name]):
                raise PackageRejected(f"the model does not match its manifest: {problem}")
    try:
        run_self_test(session, manifest.self_test)
    except ModelLoadError as exc:
        raise PackageRejected(
            f"{exc}: the model does not reproduce the outputs its manifest expects; rebuild the "
            "package from this model (`outpost package`)"
        ) from exc
    except (ValueError, TypeError, OverflowError) as exc:  # vectors numpy cannot convert
        raise PackageRejected(f"the self-test vectors cannot be used as tensors: {exc}") from exc


def validate_package(manifest_bytes: bytes, model_bytes: bytes, limits: Limits) -> Manifest:
    """Check an uploaded package completely; the parsed manifest, or PackageRejected."""
    manifest = check_package(manifest_bytes, model_bytes, limits)
    check_model_runs(manifest, model_bytes)
    return manifest
