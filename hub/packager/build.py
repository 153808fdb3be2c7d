"""Build a model package: fitted scikit-learn model + sample -> DIR/NAME-N/ and DIR/NAME-N.tar.

Steps: load and inspect the model, read the sample, convert to ONNX, quantize to int8,
score both, keep int8 only within tolerance, profile the sample, pick self-test vectors,
write the manifest and model, check the result with the agent's own reader and pack it.

The package directory and archive appear by rename once complete and verified, so an
interrupted run leaves no half package under the final name. Versions are immutable:
an existing NAME-N is refused unless `replace` is set (the example uses it).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from agent.errors import PackageError
from agent.package.manifest import (
    MANIFEST_FILE,
    NAME_RE,
    Manifest,
    ModelFile,
    ProbationPolicy,
    parse_manifest,
)
from agent.package.store import verify_package_dir, write_package_tar
from hub.errors import PackagingError
from hub.packager import selftest
from hub.packager.convert import LABEL, PREDICTION, to_onnx
from hub.packager.estimator import (
    CLASSIFICATION,
    EstimatorInfo,
    inspect_estimator,
    load_estimator,
    sklearn_predictions,
)
from hub.packager.evaluate import (
    DEFAULT_TOLERANCE,
    INT8,
    Decision,
    Evaluation,
    decide,
    encode_classes,
    evaluate,
    regression_targets,
)
from hub.packager.profile import (
    classification_prediction,
    reference_profile,
    regression_prediction,
)
from hub.packager.quantize import METHOD, quantize_int8
from hub.packager.sample import Sample, default_feature_names, load_sample
from hub.packager.session import OrtModel

MODEL_FILE = "model.onnx"


@dataclass(frozen=True)
class PackageOptions:
    name: str
    version: int
    out_dir: Path
    target: str | None = None  # CSV column holding the true labels / values
    labels: Path | None = None  # or a .npy of them
    tolerance: float = DEFAULT_TOLERANCE  # largest accuracy (R²) loss int8 may cost
    quantize: bool = True
    replace: bool = False  # overwrite an existing NAME-N (examples and demos only)
    # Hardware variants to produce (hub.packager.variants), e.g. ("int8", "fp32"); empty: one
    # model, int8 or fp32 by the tolerance, as before.
    variants: tuple[str, ...] = ()


@dataclass(frozen=True)
class PackageReport:
    manifest: Manifest
    directory: Path
    archive: Path
    fp32: Evaluation
    int8: Evaluation | None
    decision: Decision
    with_labels: bool  # scored against true labels, or against the sklearn model
    # With variants: each one produced, generic first, and those left out with why.
    variants: tuple[VariantReport, ...] = ()
    skipped: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class VariantReport:
    name: str
    requires: tuple[str, ...]
    evaluation: Evaluation
    model_file: str
    size: int


def package_paths(options: PackageOptions) -> tuple[Path, Path]:
    stem = f"{options.name}-{options.version}"
    return options.out_dir / stem, options.out_dir / f"{stem}.tar"


def check_options(options: PackageOptions) -> None:
    if not NAME_RE.match(options.name):
        raise PackagingError(
            f"--name {options.name!r}: use 1-64 characters of a-z, 0-9, '_', '.', '-', "
            "starting with a letter or digit"
        )
    if options.version < 1:
        raise PackagingError(f"--version {options.version}: must be a positive integer")
    if not (math.isfinite(options.tolerance) and 0.0 <= options.tolerance <= 1.0):
        raise PackagingError(f"--tolerance {options.tolerance}: must be between 0 and 1")


def feature_names(
    sample: Sample, info: EstimatorInfo, source: str, n_features: int
) -> tuple[str, ...]:
    """Column names: the sample's header, else the names the model was fitted with, else f0..fN."""
    header, fitted = sample.features, info.feature_names
    if header is not None and fitted is not None and header != fitted:
        raise PackagingError(
            f"{source}: the columns ({', '.join(header)}) are not the ones the model "
            f"was fitted on, in order ({', '.join(fitted)})"
        )
    return sample.features or info.feature_names or default_feature_names(n_features)


def reference_truth(
    model: object, info: EstimatorInfo, sample: Sample, source: str
) -> NDArray[Any]:
    """What the ONNX outputs are scored against: class indices, or numbers."""
    raw = sample.y if sample.y is not None else sklearn_predictions(model, sample.x, source)
    what = f"{source}: target" if sample.y is not None else "the model's own prediction"
    if info.task == CLASSIFICATION:
        return encode_classes(np.asarray(raw), info.classes, what)
    return regression_targets(np.asarray(raw), what)


def _finite(value: float | None) -> float | None:
    # Manifests are strict JSON: NaN (e.g. R² of NaN predictions) becomes null.
    return value if value is not None and math.isfinite(value) else None


def quantization_record(
    task: str,
    fp32: Evaluation,
    int8: Evaluation | None,
    decision: Decision,
    options: PackageOptions,
    with_labels: bool,
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "method": METHOD if options.quantize else "none",
        "kept": decision.kept,
        "metric": "accuracy" if task == CLASSIFICATION else "r2",
        "reference": "labels" if with_labels else "sklearn",
        "accuracy_fp32": _finite(fp32.accuracy),
        "accuracy_int8": _finite(int8.accuracy) if int8 else None,
        "latency_fp32_us": _finite(fp32.latency_us),
        "latency_int8_us": _finite(int8.latency_us) if int8 else None,
        "tolerance": options.tolerance,
        "reason": decision.reason,
    }
    if task != CLASSIFICATION:
        record["mae_fp32"] = _finite(fp32.mae)
        record["mae_int8"] = _finite(int8.mae) if int8 else None
    return record


def refuse_existing(directory: Path, archive: Path, replace: bool) -> None:
    if not replace and (directory.exists() or archive.exists()):
        raise PackagingError(
            f"{directory} already exists; package versions are immutable: "
            "give a new --version or remove the old package"
        )


def manifest_text(manifest: Manifest) -> str:
    return json.dumps(manifest.to_json(), indent=2, allow_nan=False) + "\n"


def write_package(
    model: bytes,
    manifest: Manifest,
    directory: Path,
    archive: Path,
    replace: bool,
    extra: dict[str, bytes] | None = None,
) -> None:
    """Write, verify and pack; the final names appear only when everything is done. `extra`:
    more files of the package (the variants the manifest lists), by name."""
    refuse_existing(directory, archive, replace)
    work: Path | None = None
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        (work / MODEL_FILE).write_bytes(model)
        for name, data in (extra or {}).items():
            (work / name).write_bytes(data)
        text = manifest_text(manifest)
        (work / MANIFEST_FILE).write_text(text, encoding="utf-8")
        try:
            parse_manifest(json.loads(text))
            verify_package_dir(work)
        except PackageError as exc:
            raise PackagingError(
                f"the package failed the agent's own check (a bug): {exc}"
            ) from exc
        tmp_archive = work / f".{archive.name}"
        write_package_tar(work, tmp_archive)
        if replace:
            shutil.rmtree(directory, ignore_errors=True)
            archive.unlink(missing_ok=True)
        tmp_archive.rename(archive)
        work.rename(directory)
        work = None
    except OSError as exc:
        raise PackagingError(
            f"cannot write the package under {directory.parent}: {exc.strerror or exc}"
        ) from exc
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)


def build_package(model_path: Path, sample_path: Path, options: PackageOptions) -> PackageReport:
    """Package the model at `model_path` with the sample at `sample_path`."""
    check_options(options)
    directory, archive = package_paths(options)
    refuse_existing(directory, archive, options.replace)  # before the slow work, and again after
    model = load_estimator(model_path)
    info = inspect_estimator(model, str(model_path))
    sample = load_sample(sample_path, options.target, options.labels)
    n_features = info.n_features if info.n_features is not None else int(sample.x.shape[1])
    if sample.x.shape[1] != n_features:
        if options.target:
            hint = f" (after taking out the target {options.target!r})"
        elif sample.x.shape[1] == n_features + 1 and sample.features is not None:
            hint = "; if one column is the true label or value, name it with --target"
        else:
            hint = ""
        raise PackagingError(
            f"{sample_path}: {sample.x.shape[1]} feature columns, "
            f"but the model takes {n_features}{hint}"
        )
    features = feature_names(sample, info, str(sample_path), n_features)
    truth = reference_truth(model, info, sample, str(sample_path))

    fp32_model = to_onnx(model, info, n_features)
    fp32_runner = OrtModel(fp32_model, "fp32")
    fp32 = evaluate(fp32_runner, sample.x, truth, info.task, info.classes)
    int8: Evaluation | None = None
    int8_model: tuple[bytes, OrtModel] | None = None
    why_none = "quantization turned off"
    if options.quantize:
        outcome = quantize_int8(fp32_model, sample.x)
        why_none = outcome.reason
        if outcome.model is not None:
            try:
                int8_runner = OrtModel(outcome.model, "int8")
                int8 = evaluate(int8_runner, sample.x, truth, info.task, info.classes)
                int8_model = (outcome.model, int8_runner)
            except PackagingError as exc:
                why_none = f"the int8 model does not run: {exc}"
    decision = decide(fp32, int8, options.tolerance, why_none)
    kept_model, runner = (
        int8_model if decision.kept == INT8 and int8_model else (fp32_model, fp32_runner)
    )

    quantization = quantization_record(
        info.task, fp32, int8, decision, options, sample.y is not None
    )
    if options.variants:
        from hub.packager.variants import package_variants

        int8_pair = (int8_model[0], int8_model[1], int8) if int8_model and int8 else None
        return package_variants(
            options, info, sample, features, truth, (fp32_model, fp32_runner, fp32), int8_pair,
            decision, quantization, why_none,
        )  # fmt: skip
    manifest = make_manifest(
        options, info, sample, features, runner, kept_model, decision.kept == INT8, quantization
    )
    write_package(kept_model, manifest, directory, archive, options.replace)
    return PackageReport(
        manifest=manifest,
        directory=directory,
        archive=archive,
        fp32=fp32,
        int8=int8,
        decision=decision,
        with_labels=sample.y is not None,
    )


def make_manifest(
    options: PackageOptions,
    info: EstimatorInfo,
    sample: Sample,
    features: tuple[str, ...],
    runner: OrtModel,
    model: bytes,
    quantized: bool,
    quantization: dict[str, Any],
    model_file: str = MODEL_FILE,
) -> Manifest:
    """The manifest of `model` (run by `runner`): signature, profile and self-test from the sample."""
    labels = tuple(str(c) for c in info.classes)
    outputs = runner.run(sample.x)
    if info.task == CLASSIFICATION:
        predicted = encode_classes(outputs[LABEL], info.classes, "predicted label")
        prediction = classification_prediction(predicted, labels)
    else:
        prediction = regression_prediction(outputs[PREDICTION])
    rows = sample.x[selftest.pick_rows(sample.x, outputs, info.task)]
    atol, rtol = selftest.tolerance(quantized, outputs)
    return Manifest(
        name=options.name,
        version=options.version,
        model=ModelFile(file=model_file, sha256=hashlib.sha256(model).hexdigest(), size=len(model)),
        inputs=runner.inputs,
        outputs=runner.outputs,
        task=info.task,
        labels=labels,
        features=features,
        self_test=selftest.self_test(rows, runner.run(rows), atol, rtol),
        probation=ProbationPolicy(),
        reference_profile=reference_profile(sample.x, features, prediction),
        quantization=quantization,
        created=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
