"""Hardware variants of a model version: checking an upload's variant files, naming their targets.

A version's generic package (manifest.json + its model) is what it always was. Its manifest may
list other variants (`variants`: name, the hardware tags it requires, the file names of its
manifest and model, their SHA-256s; see agent.package.manifest.VariantFile), in order of
preference. Each variant is a whole package of its own - manifest with its own self-test vectors
and a model - uploaded in the same archive under the listed file names, and signed as targets
beside the generic files:

    models/<name>/<version>/manifest.json, model.onnx          the generic variant
    models/<name>/<version>/manifest.int8.json, model.int8.onnx  a listed variant

The registry keeps no table of its own for variants: the generic manifest (stored as uploaded)
lists them and binds their bytes by hash, the blobs are stored like every other, and what is
referenced is read from the stored manifests (`variant_digests`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass

from agent.package.manifest import Manifest, VariantFile
from hub.errors import PackageRejected
from hub.registry.validate import Limits, check_model_runs, check_package


@dataclass(frozen=True)
class VariantUpload:
    """One listed variant with its checked bytes."""

    entry: VariantFile
    manifest: Manifest
    manifest_bytes: bytes
    model_bytes: bytes


def check_variants(generic: Manifest, files: Mapping[str, bytes], limits: Limits) -> list[VariantUpload]:
    """The variants `generic` lists, each checked like a package of its own (sizes, manifest,
    self-test vectors run by onnxruntime) and against the listing (hashes, name, requirements,
    same model name, version and inputs). PackageRejected names the first thing wrong."""
    out = []
    for entry in generic.variants:
        where = f"variant {entry.name!r}"
        missing = [f for f in (entry.manifest, entry.model) if f not in files]
        if missing:
            raise PackageRejected(
                f"{where}: the package archive has no {missing[0]!r}, which manifest.json lists"
            )
        manifest_bytes, model_bytes = files[entry.manifest], files[entry.model]
        if hashlib.sha256(manifest_bytes).hexdigest() != entry.manifest_sha256:
            raise PackageRejected(f"{where}: {entry.manifest} is not the file manifest.json lists (SHA-256)")
        try:
            manifest = check_package(manifest_bytes, model_bytes, limits)
        except PackageRejected as exc:
            raise PackageRejected(f"{where}: {exc}") from exc
        problem = _mismatch(generic, entry, manifest)
        if problem:
            raise PackageRejected(f"{where}: {problem}")
        try:
            check_model_runs(manifest, model_bytes)
        except PackageRejected as exc:
            raise PackageRejected(f"{where}: {exc}") from exc
        out.append(VariantUpload(entry, manifest, manifest_bytes, model_bytes))
    return out


def _mismatch(generic: Manifest, entry: VariantFile, manifest: Manifest) -> str | None:
    if (manifest.name, manifest.version) != (generic.name, generic.version):
        return f"its manifest is {manifest.name} v{manifest.version}, not {generic.name} v{generic.version}"
    if manifest.model.sha256 != entry.sha256:
        return f"{entry.model} is not the model manifest.json lists (SHA-256)"
    if manifest.model.file != entry.model:
        return (
            f"its manifest names the model file {manifest.model.file!r}, manifest.json lists {entry.model!r}"
        )
    if manifest.variant is None or manifest.variant.name != entry.name:
        return f"its manifest does not say it is variant {entry.name!r} (variant.name)"
    if manifest.variant.requires != entry.requires:
        return "its manifest's variant.requires differs from the one manifest.json lists"
    if manifest.variants:
        return "a variant's manifest cannot list variants of its own"
    if [s.name for s in manifest.inputs] != [s.name for s in generic.inputs]:
        return "its inputs are not the generic model's: apps send the same request to every variant"
    return None


def files_to_sign(manifest: Manifest, files: Mapping[str, bytes]) -> dict[str, bytes]:
    """The listed variants' files (target file name -> bytes) to sign beside manifest.json and
    model.onnx; `files` are the upload's (the registry checked them)."""
    return {name: files[name] for v in manifest.variants for name in (v.manifest, v.model)}


def variant_targets(model: str, version: int, manifest: Manifest) -> list[str]:
    """The TUF target paths of a version's variant files."""
    return [f"models/{model}/{version}/{n}" for v in manifest.variants for n in (v.manifest, v.model)]


def variant_digests(manifest_text: str) -> set[str]:
    """The SHA-256s of the variant files a stored generic manifest lists (blobs it references)."""
    try:
        doc = json.loads(manifest_text)
    except ValueError:
        return set()
    items = doc.get("variants") if isinstance(doc, dict) else None
    out: set[str] = set()
    for item in items if isinstance(items, list) else ():
        if isinstance(item, dict):
            out.update(v for k in ("sha256", "manifest_sha256") if isinstance(v := item.get(k), str))
    return out
