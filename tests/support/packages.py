"""Builders of small, real model packages for tests (ONNX graphs made with onnx.helper)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from agent.package.manifest import (
    Manifest,
    ModelFile,
    SelfTest,
    Tensor,
    TensorSpec,
)

OPSET = [helper.make_opsetid("", 17)]


def write_package(
    out: Path,
    model: onnx.ModelProto | bytes,
    *,
    name: str,
    version: int,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    self_test: SelfTest | None = None,
    **extra: Any,
) -> Path:
    """Write model.onnx + manifest.json into `out` and return it."""
    out.mkdir(parents=True, exist_ok=True)
    raw = model if isinstance(model, bytes) else model.SerializeToString()
    (out / "model.onnx").write_bytes(raw)
    manifest = Manifest(
        name=name,
        version=version,
        model=ModelFile("model.onnx", hashlib.sha256(raw).hexdigest(), len(raw)),
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        self_test=self_test,
        **extra,
    )
    (out / "manifest.json").write_text(json.dumps(manifest.to_json()))
    return out


def affine_model(scale: float = 2.0, features: int = 4) -> onnx.ModelProto:
    """y = x * scale + 1 (FP32 [-1, features]) and argmax label: exact under batching."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, features])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, features])
    label = helper.make_tensor_value_info("label", TensorProto.INT64, [None])
    nodes = [
        helper.make_node("Mul", ["x", "scale"], ["scaled"]),
        helper.make_node("Add", ["scaled", "one"], ["y"]),
        helper.make_node("ArgMax", ["y"], ["label"], axis=1, keepdims=0),
    ]
    inits = [
        numpy_helper.from_array(np.array(scale, dtype=np.float32), "scale"),
        numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one"),
    ]
    graph = helper.make_graph(nodes, "affine", [x], [y, label], inits)
    return helper.make_model(graph, opset_imports=OPSET)


def affine_package(out: Path, version: int = 1, scale: float = 2.0, name: str = "affine") -> Path:
    rows = np.arange(8, dtype=np.float32).reshape(2, 4)
    y = rows * scale + 1
    test = SelfTest(
        inputs=(Tensor("x", "FP32", (2, 4), rows.ravel().tolist()),),
        outputs=(
            Tensor("y", "FP32", (2, 4), y.ravel().tolist()),
            Tensor("label", "INT64", (2,), y.argmax(axis=1).tolist()),
        ),
    )
    return write_package(
        out,
        affine_model(scale),
        name=name,
        version=version,
        inputs=[TensorSpec("x", "FP32", (-1, 4))],
        outputs=[TensorSpec("y", "FP32", (-1, 4)), TensorSpec("label", "INT64", (-1,))],
        self_test=test,
    )


def slow_model(width: int = 1024, depth: int = 8) -> onnx.ModelProto:
    """A chain of MatMuls: slow enough per request that requests are really in flight."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, width])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, width])
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    nodes = []
    prev = "x"
    for i in range(depth):
        out = "y" if i == depth - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, "w"], [out]))
        prev = out
    graph = helper.make_graph(nodes, "slow", [x], [y], [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=OPSET)


def slow_package(out: Path, width: int = 1024, depth: int = 8) -> Path:
    return write_package(
        out,
        slow_model(width, depth),
        name="slow",
        version=1,
        inputs=[TensorSpec("x", "FP32", (-1, width))],
        outputs=[TensorSpec("y", "FP32", (-1, width))],
    )


def typed_model() -> onnx.ModelProto:
    """Identity over several datatypes at once: INT32, FP16, UINT8, BOOL, FP64, BYTES (string)."""
    specs = [
        ("i32", TensorProto.INT32),
        ("f16", TensorProto.FLOAT16),
        ("u8", TensorProto.UINT8),
        ("b", TensorProto.BOOL),
        ("f64", TensorProto.DOUBLE),
        ("s", TensorProto.STRING),
    ]
    inputs = [helper.make_tensor_value_info(n, t, [None, 2]) for n, t in specs]
    outputs = [helper.make_tensor_value_info(f"{n}_out", t, [None, 2]) for n, t in specs]
    nodes = [helper.make_node("Identity", [n], [f"{n}_out"]) for n, _ in specs]
    graph = helper.make_graph(nodes, "typed", inputs, outputs)
    return helper.make_model(graph, opset_imports=OPSET)


TYPED_DATATYPES = {"i32": "INT32", "f16": "FP16", "u8": "UINT8", "b": "BOOL", "f64": "FP64", "s": "BYTES"}


def typed_package(out: Path) -> Path:
    return write_package(
        out,
        typed_model(),
        name="typed",
        version=1,
        inputs=[TensorSpec(n, dt, (-1, 2)) for n, dt in TYPED_DATATYPES.items()],
        outputs=[TensorSpec(f"{n}_out", dt, (-1, 2)) for n, dt in TYPED_DATATYPES.items()],
    )


def wine_versions(out: Path, versions: tuple[int, ...] = (1, 2, 3)) -> dict[int, Path]:
    """The example model (examples/train_example.py) packaged as each of `versions`: tar archives.

    Version 1 is the example's own package; the others package the same pipeline again under
    a new number, as a retrained model would be.
    """
    from examples.train_example import build_example
    from hub.packager import PackageOptions, build_package

    packages = {1: build_example(out).with_suffix(".tar")}
    for version in versions:
        if version == 1:
            continue
        report = build_package(
            out / "wine.joblib",
            out / "wine-sample.csv",
            PackageOptions(name="wine", version=version, out_dir=out, target="class", replace=True),
        )
        packages[version] = report.archive
    return {v: packages[v] for v in versions}


# A probation a test can wait for: 20 answers and a second (the default is 50 and 30 s).
FAST_PROBATION = {"min_requests": 20, "min_seconds": 1.0, "max_error_rate": 0.05, "max_latency_ratio": 50.0}


def with_probation(directory: Path, archive: Path, probation: dict[str, float] | None = None) -> Path:
    """The package in `directory` with `probation` in its manifest, written again as `archive`."""
    import json

    from agent.package.store import write_package_tar

    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["probation"] = probation or FAST_PROBATION
    (directory / "manifest.json").write_text(json.dumps(manifest))
    archive.unlink(missing_ok=True)
    write_package_tar(directory, archive)
    return archive


def fast_wine_versions(out: Path, versions: tuple[int, ...] = (1, 2, 3)) -> dict[int, Path]:
    """`wine_versions`, each with FAST_PROBATION."""
    return {
        v: with_probation(archive.with_suffix(""), out / f"fast-wine-{v}.tar")
        for v, archive in wine_versions(out, versions).items()
    }
