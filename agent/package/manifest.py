"""The model package manifest: its format, parsing and validation.

A package is a directory (or a tar archive of one) holding `manifest.json` and
the ONNX file the manifest names. The manifest binds the model by SHA-256, so a
manifest and a model from different packages never pass as one.

Pure: parses and checks values, touches no files. `agent.package.store` does the I/O.
The packager (`hub.packager`) builds manifests with the same dataclasses.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from agent.errors import PackageError
from agent.serving.datatypes import DATATYPES

FORMAT = "outpost-package/1"
MANIFEST_FILE = "manifest.json"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
TASKS = ("classification", "regression", "other")


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: name, OIP datatype and shape (-1 for a variable dimension)."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Tensor:
    """A concrete tensor in OIP JSON form (flat row-major data), used for self-test vectors."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: list[Any]


@dataclass(frozen=True)
class SelfTest:
    """Inputs with the outputs the model must reproduce at load, within tolerance."""

    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    atol: float = 1e-4
    rtol: float = 1e-3


@dataclass(frozen=True)
class ProbationPolicy:
    """What a new version must show before it is committed (used by the updater)."""

    min_requests: int = 50
    min_seconds: float = 30.0
    max_error_rate: float = 0.02
    max_latency_ratio: float = 2.0


@dataclass(frozen=True)
class ModelFile:
    file: str
    sha256: str
    size: int


VARIANT_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
# A requirement: a hardware tag (agent.runtime.hardware), or alternatives joined by "|".
_TAG_RE = re.compile(r"^[a-z0-9_]+:[a-z0-9_.+-]+(\|[a-z0-9_]+:[a-z0-9_.+-]+)*$")


@dataclass(frozen=True)
class Variant:
    """What a variant's own manifest says it is: its name ("int8", "fp32", "fp16") and the
    hardware tags (agent.runtime.hardware) a device needs to run it; no tags: runs anywhere."""

    name: str
    requires: tuple[str, ...] = ()


@dataclass(frozen=True)
class VariantFile:
    """A variant listed in the generic manifest: its name, requirements and the files that hold
    it, beside manifest.json in the same version (each its own signed target), bound by SHA-256."""

    name: str
    requires: tuple[str, ...]
    manifest: str  # file name, e.g. "manifest.int8.json"
    manifest_sha256: str
    model: str  # file name, e.g. "model.int8.onnx"
    sha256: str


@dataclass(frozen=True)
class Manifest:
    name: str
    version: int
    model: ModelFile
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    task: str = "other"
    labels: tuple[str, ...] = ()
    features: tuple[str, ...] = ()
    self_test: SelfTest | None = None
    probation: ProbationPolicy = field(default_factory=ProbationPolicy)
    # Free-form but recorded: how the model was produced and quantized, the
    # reference profile for drift. Kept as plain JSON values so the agent's
    # serving path does not depend on their detailed schema.
    reference_profile: dict[str, Any] = field(default_factory=dict)
    quantization: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    format: str = FORMAT
    # Hardware variants (absent from the JSON when unset, so a manifest without variants reads
    # as before): `variant` names what this package is; the generic package's manifest also
    # lists the others under `variants`, in order of preference. Agents that know no variants
    # ignore both keys.
    variant: Variant | None = None
    variants: tuple[VariantFile, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The manifest as JSON values (lists, not tuples), ready for json.dumps or parse_manifest."""
        doc: dict[str, Any] = _lists(asdict(self))
        for key in ("self_test", "variant", "variants"):
            if not getattr(self, key):
                doc.pop(key)
        return doc


def _lists(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_lists(v) for v in value]
    return value


def _number(doc: dict[str, Any], key: str, default: float, where: str) -> float:
    value = doc.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise PackageError(f"manifest: {where}{key} must be a non-negative number")
    return float(value)


def _require(doc: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in doc:
        raise PackageError(f"manifest: {where}{key} is missing")
    value = doc[key]
    # bool is an int in Python; a manifest that says `"version": true` is wrong.
    if (
        isinstance(value, bool)
        and kind is not bool
        and bool not in (kind if isinstance(kind, tuple) else (kind,))
    ):
        raise PackageError(f"manifest: {where}{key} must be {_kind_name(kind)}, not a boolean")
    if not isinstance(value, kind):
        raise PackageError(f"manifest: {where}{key} must be {_kind_name(kind)}, got {type(value).__name__}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= -1 for d in value
    ):
        raise PackageError(f"manifest: {where}shape must be a list of integers >= -1")
    return tuple(value)


def _spec(doc: Any, where: str) -> TensorSpec:
    if not isinstance(doc, dict):
        raise PackageError(f"manifest: {where} must be an object")
    datatype = _require(doc, "datatype", str, where + ".")
    if datatype not in DATATYPES:
        raise PackageError(f"manifest: {where}.datatype {datatype!r} is not an OIP datatype")
    return TensorSpec(
        name=_require(doc, "name", str, where + "."),
        datatype=datatype,
        shape=_shape(_require(doc, "shape", list, where + "."), where + "."),
    )


def _tensor(doc: Any, where: str) -> Tensor:
    spec = _spec(doc, where)
    data = _require(doc, "data", list, where + ".")
    if any(d < 0 for d in spec.shape):
        raise PackageError(f"manifest: {where}.shape must be concrete in a self-test vector")
    count = math.prod(spec.shape)
    if len(data) != count or any(isinstance(v, list | dict) for v in data):
        raise PackageError(f"manifest: {where}.data must be {count} flat values for shape {list(spec.shape)}")
    return Tensor(spec.name, spec.datatype, spec.shape, data)


def _specs(doc: dict[str, Any], key: str) -> tuple[TensorSpec, ...]:
    items = _require(doc, key, list, "")
    if not items:
        raise PackageError(f"manifest: {key} must name at least one tensor")
    specs = tuple(_spec(item, f"{key}[{i}]") for i, item in enumerate(items))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise PackageError(f"manifest: {key} has duplicate names")
    return specs


def parse_manifest(doc: Any) -> Manifest:
    """Validate a decoded manifest.json and return it as a Manifest.

    Raises PackageError naming the first field that is wrong.
    """
    if not isinstance(doc, dict):
        raise PackageError("manifest: the document must be a JSON object")
    fmt = doc.get("format", FORMAT)
    if fmt != FORMAT:
        raise PackageError(f"manifest: format {fmt!r} is not supported (this agent reads {FORMAT})")
    name = _require(doc, "name", str, "")
    if not NAME_RE.match(name):
        raise PackageError(f"manifest: name {name!r} must be 1-64 characters of a-z, 0-9, '_', '.', '-'")
    version = _require(doc, "version", int, "")
    if version < 1:
        raise PackageError("manifest: version must be a positive integer")
    model_doc = _require(doc, "model", dict, "")
    model = ModelFile(
        file=_require(model_doc, "file", str, "model."),
        sha256=_require(model_doc, "sha256", str, "model."),
        size=_require(model_doc, "size", int, "model."),
    )
    if model.size < 0:
        raise PackageError("manifest: model.size must not be negative")
    if "/" in model.file or model.file in ("", ".", "..", MANIFEST_FILE):
        raise PackageError(f"manifest: model.file {model.file!r} must be a plain file name")
    if not re.fullmatch(r"[0-9a-f]{64}", model.sha256):
        raise PackageError("manifest: model.sha256 must be 64 lowercase hex digits")
    task = doc.get("task", "other")
    if task not in TASKS:
        raise PackageError(f"manifest: task must be one of {', '.join(TASKS)}")
    self_test = None
    if (st := doc.get("self_test")) is not None:
        if not isinstance(st, dict):
            raise PackageError("manifest: self_test must be an object")
        st_inputs = _require(st, "inputs", list, "self_test.")
        st_outputs = _require(st, "outputs", list, "self_test.")
        self_test = SelfTest(
            inputs=tuple(_tensor(t, f"self_test.inputs[{i}]") for i, t in enumerate(st_inputs)),
            outputs=tuple(_tensor(t, f"self_test.outputs[{i}]") for i, t in enumerate(st_outputs)),
            atol=_number(st, "atol", 1e-4, "self_test."),
            rtol=_number(st, "rtol", 1e-3, "self_test."),
        )
    probation_doc = doc.get("probation", {})
    if not isinstance(probation_doc, dict):
        raise PackageError("manifest: probation must be an object")
    known = {f.name for f in fields(ProbationPolicy)}
    unknown = sorted(set(probation_doc) - known)
    if unknown:
        raise PackageError(f"manifest: probation.{unknown[0]} is not a known key")
    defaults = ProbationPolicy()
    probation = ProbationPolicy(
        min_requests=int(_number(probation_doc, "min_requests", defaults.min_requests, "probation.")),
        min_seconds=_number(probation_doc, "min_seconds", defaults.min_seconds, "probation."),
        max_error_rate=_number(probation_doc, "max_error_rate", defaults.max_error_rate, "probation."),
        max_latency_ratio=_number(
            probation_doc, "max_latency_ratio", defaults.max_latency_ratio, "probation."
        ),
    )
    if isinstance(probation_doc.get("min_requests", 0), float):
        raise PackageError("manifest: probation.min_requests must be an integer")
    labels = doc.get("labels", [])
    features = doc.get("features", [])
    for key, value in (("labels", labels), ("features", features)):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise PackageError(f"manifest: {key} must be a list of strings")
    profile = doc.get("reference_profile", {})
    quant = doc.get("quantization", {})
    if not isinstance(profile, dict) or not isinstance(quant, dict):
        raise PackageError("manifest: reference_profile and quantization must be objects")
    variant, variants = _variant_keys(doc, model.file)
    return Manifest(
        name=name,
        version=version,
        model=model,
        inputs=_specs(doc, "inputs"),
        outputs=_specs(doc, "outputs"),
        task=task,
        labels=tuple(labels),
        features=tuple(features),
        self_test=self_test,
        probation=probation,
        reference_profile=profile,
        quantization=quant,
        created=str(doc.get("created", "")),
        variant=variant,
        variants=variants,
    )


def _variant_keys(doc: dict[str, Any], generic_file: str) -> tuple[Variant | None, tuple[VariantFile, ...]]:
    """`variant` (what this package is) and `variants` (the others, in the generic manifest only:
    the hub refuses a listed variant whose own manifest lists variants)."""
    return _variant(doc.get("variant")), _variants(doc.get("variants", []), generic_file)


def _requires(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(t, str) and _TAG_RE.match(t) for t in value):
        raise PackageError(f'manifest: {where}requires must be a list of tags such as "cpu:vnni"')
    return tuple(value)


def _variant(doc: Any) -> Variant | None:
    if doc is None:
        return None
    if not isinstance(doc, dict):
        raise PackageError("manifest: variant must be an object")
    name = _require(doc, "name", str, "variant.")
    if not VARIANT_RE.match(name):
        raise PackageError(f"manifest: variant.name {name!r} must be 1-32 characters of a-z, 0-9, '_', '-'")
    return Variant(name, _requires(doc.get("requires", []), "variant."))


def _variants(items: Any, generic_file: str) -> tuple[VariantFile, ...]:
    if not isinstance(items, list):
        raise PackageError("manifest: variants must be a list")
    out: list[VariantFile] = []
    files = {MANIFEST_FILE, generic_file}
    for i, doc in enumerate(items):
        where = f"variants[{i}]."
        if not isinstance(doc, dict):
            raise PackageError(f"manifest: variants[{i}] must be an object")
        name = _require(doc, "name", str, where)
        if not VARIANT_RE.match(name):
            raise PackageError(
                f"manifest: {where}name {name!r} must be 1-32 characters of a-z, 0-9, '_', '-'"
            )
        if any(v.name == name for v in out):
            raise PackageError(f"manifest: {where}name {name!r} is listed twice")
        entry = VariantFile(
            name=name,
            requires=_requires(doc.get("requires", []), where),
            manifest=_require(doc, "manifest", str, where),
            manifest_sha256=_require(doc, "manifest_sha256", str, where),
            model=_require(doc, "model", str, where),
            sha256=_require(doc, "sha256", str, where),
        )
        for key in ("manifest", "model"):
            file = getattr(entry, key)
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", file) or file in files:
                raise PackageError(f"manifest: {where}{key} {file!r} must be a plain file name of its own")
            files.add(file)
        for key in ("manifest_sha256", "sha256"):
            if not re.fullmatch(r"[0-9a-f]{64}", getattr(entry, key)):
                raise PackageError(f"manifest: {where}{key} must be 64 lowercase hex digits")
        out.append(entry)
    return tuple(out)
