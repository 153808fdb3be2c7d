"""One model version as several hardware variants: `outpost package --variants int8,fp32`.

The package directory holds the generic variant as every package does (manifest.json +
model.onnx: fp32, which runs anywhere) and each other variant beside it as a package of its own
(manifest.<name>.json + model.<name>.onnx, with its own self-test vectors and quantization
record). The generic manifest lists the others under `variants`, in the order given, with the
hardware they require and the SHA-256 of their files; the hub signs every file, and a device
installs the first variant its hardware meets, else the generic one (agent.update.canary).

What each variant requires (tags of agent.runtime.hardware):

    int8   cpu:vnni|cpu:dotprod   an int8 dot-product instruction (x86 VNNI, ARM asimddp): int8
                                  without it is often no faster than fp32 (onnxruntime's advice)
    fp16   ep:cuda|ep:tensorrt|   a GPU provider: fp16 pays on GPUs, and on a CPU onnxruntime
           ep:dml|ep:coreml|...   mostly casts back to fp32 (its latency here shows it)
    fp32   (nothing)              the generic variant; always produced

int8 and fp16 are included only when they score within `--tolerance` of fp32 on the sample.
fp16 is converted with onnxruntime's own float16 converter (onnxruntime.transformers.float16,
part of the onnxruntime wheel: nothing downloaded), inputs and outputs kept fp32 so apps send
the same requests to every variant; operators it cannot convert (the ai.onnx.ml ones that
skl2onnx emits, such as Scaler or tree ensembles) stay fp32 behind casts. Its latency and
accuracy are measured on this machine's CPU: what a GPU does with it is not measured here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray

from agent.package.manifest import Variant, VariantFile
from hub.errors import PackagingError
from hub.packager.build import (
    PackageOptions,
    PackageReport,
    VariantReport,
    make_manifest,
    manifest_text,
    package_paths,
    write_package,
)
from hub.packager.estimator import EstimatorInfo
from hub.packager.evaluate import FP32, INT8, Decision, Evaluation, evaluate
from hub.packager.sample import Sample
from hub.packager.session import OrtModel

FP16 = "fp16"
GENERIC = FP32
_GPUS = ("ep:cuda", "ep:tensorrt", "ep:rocm", "ep:migraphx", "ep:dml", "ep:coreml")
REQUIRES: dict[str, tuple[str, ...]] = {
    INT8: ("cpu:vnni|cpu:dotprod",),
    FP16: ("|".join(_GPUS),),
    FP32: (),
}
KINDS = tuple(REQUIRES)


@dataclass(frozen=True)
class VariantModel:
    model: bytes
    runner: OrtModel
    evaluation: Evaluation


def parse_variants(text: str) -> tuple[str, ...]:
    """`--variants int8,fp32` -> ("int8", "fp32"); the generic fp32 must be one of them."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in REQUIRES]
    if unknown:
        raise PackagingError(f"--variants: {unknown[0]!r} is not one of {', '.join(KINDS)}")
    if len(set(names)) != len(names):
        raise PackagingError("--variants: a variant is named twice")
    if GENERIC not in names:
        raise PackagingError(
            f"--variants: {GENERIC} must be one of them: it is the generic variant every device can run"
        )
    return names


def package_variants(
    options: PackageOptions,
    info: EstimatorInfo,
    sample: Sample,
    features: tuple[str, ...],
    truth: NDArray[Any],
    fp32: tuple[bytes, OrtModel, Evaluation],
    int8: tuple[bytes, OrtModel, Evaluation] | None,
    decision: Decision,
    quantization: dict[str, Any],
    why_no_int8: str,
) -> PackageReport:
    """build_package's end when variants are asked for: make fp16 if asked, then write them all."""
    models = {FP32: VariantModel(*fp32)}
    if int8 is not None:
        models[INT8] = VariantModel(*int8)
    reasons = {INT8: why_no_int8}
    if FP16 in options.variants:
        half = fp16_model(fp32[0], sample.x, truth, info)
        if isinstance(half, str):
            reasons[FP16] = half
        else:
            models[FP16] = half
    return build_variants(options, info, sample, features, models, decision, quantization, fp32[0], reasons)


def fp16_model(
    fp32_model: bytes, x: NDArray[np.float32], truth: NDArray[Any], info: EstimatorInfo
) -> VariantModel | str:
    """The fp16 conversion of `fp32_model`, run and scored; or why there is none."""
    import onnx

    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError as exc:  # an onnxruntime build without its transformers tools
        return f"onnxruntime's float16 converter is not installed ({exc})"
    try:
        converted = convert_float_to_float16(onnx.load_from_string(fp32_model), keep_io_types=True)
        model = converted.SerializeToString()
        runner = OrtModel(model, "fp16")
        return VariantModel(model, runner, evaluate(runner, x, truth, info.task, info.classes))
    except PackagingError as exc:
        return f"the fp16 model does not run: {exc}"
    except Exception as exc:  # the converter raises what onnx and its own checks raise
        return f"the fp16 conversion failed: {exc.__class__.__name__}: {exc}"


def build_variants(
    options: PackageOptions,
    info: EstimatorInfo,
    sample: Sample,
    features: tuple[str, ...],
    models: dict[str, VariantModel],
    decision: Decision,
    quantization: dict[str, Any],
    fp32_model: bytes,
    reasons: dict[str, str] | None = None,
) -> PackageReport:
    """Write the variants of one version as one package; the report lists them side by side.
    `reasons`: why a variant asked for is not in `models`."""
    reasons = reasons or {}
    directory, archive = package_paths(options)
    extra: dict[str, bytes] = {}
    listed: list[VariantFile] = []
    reports: list[VariantReport] = []
    skipped: list[tuple[str, str]] = []
    for name in options.variants:
        if name == GENERIC:
            continue
        vm = models.get(name)
        if vm is None:
            skipped.append((name, reasons.get(name, decision.reason)))
            continue
        loss = models[GENERIC].evaluation.accuracy - vm.evaluation.accuracy
        if not loss <= options.tolerance + 1e-12:  # not worth shipping (NaN fails too)
            skipped.append(
                (
                    name,
                    f"{name} scores {vm.evaluation.accuracy:.4f}, more than {options.tolerance} "
                    f"below fp32 {models[GENERIC].evaluation.accuracy:.4f}",
                )
            )
            continue
        manifest_file, model_file = f"manifest.{name}.json", f"model.{name}.onnx"
        manifest = make_manifest(
            options,
            info,
            sample,
            features,
            vm.runner,
            vm.model,
            name != FP32,  # a reduced-precision model's self-test gets the looser tolerance
            {**quantization, "variant": name, "kept": name},
            model_file=model_file,
        )
        manifest = replace(manifest, variant=Variant(name, REQUIRES[name]))
        text = manifest_text(manifest).encode("utf-8")
        extra[manifest_file] = text
        extra[model_file] = vm.model
        listed.append(
            VariantFile(
                name=name,
                requires=REQUIRES[name],
                manifest=manifest_file,
                manifest_sha256=hashlib.sha256(text).hexdigest(),
                model=model_file,
                sha256=manifest.model.sha256,
            )
        )
        reports.append(VariantReport(name, REQUIRES[name], vm.evaluation, model_file, len(vm.model)))
    generic = models[GENERIC]
    manifest = make_manifest(
        options,
        info,
        sample,
        features,
        generic.runner,
        fp32_model,
        False,
        {**quantization, "variant": GENERIC, "kept": GENERIC, "method": "none"},
    )
    manifest = replace(manifest, variant=Variant(GENERIC), variants=tuple(listed))
    write_package(fp32_model, manifest, directory, archive, options.replace, extra)
    generic_report = VariantReport(GENERIC, (), generic.evaluation, manifest.model.file, len(fp32_model))
    int8 = models.get(INT8)
    return PackageReport(
        manifest=manifest,
        directory=directory,
        archive=archive,
        fp32=generic.evaluation,
        int8=int8.evaluation if int8 is not None else None,
        decision=decision,
        with_labels=sample.y is not None,
        variants=(generic_report, *reports),
        skipped=tuple(skipped),
    )
