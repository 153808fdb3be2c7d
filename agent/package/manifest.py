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

    def to_json(self) -> dict[str, Any]:
        """The manifest as JSON values (lists, not tuples), ready for json.dumps or parse_manifest."""
        doc: dict[str, Any] = _lists(asdict(self))
        if self.self_test is None:
            doc.pop("self_test")
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
    )
