"""The two workload packages of the benchmark, built in code (no downloads).

- `bench-tabular`: 32 FP32 features -> StandardScaler + MLPClassifier(64, 32), converted with
  skl2onnx (no ZipMap, so the outputs are tensors `label` and `probabilities`) and quantized
  to int8 (static, QDQ, S8S8) on its training data -- the model Outpost exists to serve. Its
  manifest carries self-test vectors and a reference profile, as `outpost package` makes them.
  Version 2 is the same recipe with another seed: the version-switch scenario swaps between them.
- `bench-conv`: a small convolutional net on FP32 [N, 3, 224, 224] written with onnx.helper and
  seeded random weights -> `logits` [N, 10]; its input is big enough that the request codec
  (JSON vs binary tensors) dominates.

Packages are Outpost package directories (manifest.json + model.onnx) made with the agent's own
manifest dataclasses and checked with `verify_package_dir`, so the agent installs exactly what a
user would hand it. They are cached under bench-results/packages/<key>: the key changes with this
module's recipe version and the library versions that shape the ONNX file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.package.manifest import (
    MANIFEST_FILE,
    Manifest,
    ModelFile,
    SelfTest,
    Tensor,
    TensorSpec,
)
from agent.package.store import verify_package_dir

# Bump when anything below changes what gets built, so a stale cache is never reused.
RECIPE_VERSION = "6"

TABULAR = "bench-tabular"
CONV = "bench-conv"
N_FEATURES = 32
N_CLASSES_CONV = 10
IMAGE_SHAPE = (3, 224, 224)
MODEL_FILE = "model.onnx"
CREATED = "2024-01-01T00:00:00Z"  # fixed, so rebuilt packages hash the same


@dataclass(frozen=True)
class Packages:
    tabular: Path  # version 1
    tabular_v2: Path
    conv: Path


def cache_key() -> str:
    import onnx
    import onnxruntime
    import skl2onnx
    import sklearn

    return (
        f"r{RECIPE_VERSION}-ort{onnxruntime.__version__}-onnx{onnx.__version__}"
        f"-skl2onnx{skl2onnx.__version__}-sklearn{sklearn.__version__}-np{np.__version__}"
    )


def build_packages(cache_root: Path, log: Any = print) -> Packages:
    """Return the workload packages, building the ones missing from the cache."""
    root = cache_root / cache_key()
    wanted = {
        "tabular-v1": lambda d: _build_tabular(d, version=1, seed=1),
        "tabular-v2": lambda d: _build_tabular(d, version=2, seed=2),
        "conv-v1": lambda d: _build_conv(d, version=1, seed=7),
    }
    for name, build in wanted.items():
        final = root / name
        if final.is_dir():
            try:
                verify_package_dir(final)
                continue
            except Exception as exc:
                log(f"  cached package {final} is unusable ({exc}); rebuilding")
                shutil.rmtree(final)
        log(f"  building {name} package ...")
        root.mkdir(parents=True, exist_ok=True)
        # Build beside the final place and rename: an interrupted build never looks cached.
        work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
        try:
            build(work)
            verify_package_dir(work)
            work.rename(final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    for stale in cache_root.iterdir():
        if stale.is_dir() and stale != root:  # packages of an older recipe or library set
            shutil.rmtree(stale, ignore_errors=True)
    return Packages(root / "tabular-v1", root / "tabular-v2", root / "conv-v1")


def _write_package(directory: Path, model_bytes: bytes, **fields: Any) -> None:
    (directory / MODEL_FILE).write_bytes(model_bytes)
    manifest = Manifest(
        model=ModelFile(MODEL_FILE, hashlib.sha256(model_bytes).hexdigest(), len(model_bytes)),
        created=CREATED,
        **fields,
    )
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest.to_json()) + "\n")


def _tensor(name: str, datatype: str, array: np.ndarray) -> Tensor:
    return Tensor(name, datatype, tuple(array.shape), array.ravel().tolist())


# --- tabular ---------------------------------------------------------------------------------


def tabular_data(seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=4000, n_features=N_FEATURES, n_informative=16, n_redundant=4,
        random_state=seed,
    )
    return x.astype(np.float32), y


def _build_tabular(directory: Path, version: int, seed: int) -> None:
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from skl2onnx import to_onnx
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from hub.packager.profile import classification_prediction, reference_profile

    x, y = tabular_data(seed)
    x_train, y_train, x_test, y_test = x[:3000], y[:3000], x[3000:], y[3000:]
    clf = MLPClassifier(hidden_layer_sizes=(64, 32), max_iter=300, random_state=seed)
    pipe = make_pipeline(StandardScaler(), clf)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        pipe.fit(x_train, y_train)
    onx = to_onnx(
        pipe, x_train[:1], options={id(clf): {"zipmap": False}},
        initial_types=_float_input(N_FEATURES), target_opset={"": 17, "ai.onnx.ml": 3},
    )
    fp32_path = directory / "fp32.onnx"
    fp32_path.write_bytes(onx.SerializeToString())

    class Calibration(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._rows = iter(np.array_split(x_train, 30))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._rows, None)
            return None if batch is None else {"input": batch}

    int8_path = directory / "int8.onnx"
    # No quant_pre_process: on this graph its shape inference loses the MLP's tensor types and
    # then nothing gets quantized; without it all three MatMuls are (and the Relus fold into
    # their QuantizeLinear). Its "consider pre-processing" advice goes to the root logger.
    root_logger = logging.getLogger()
    level = root_logger.level
    root_logger.setLevel(logging.ERROR)
    try:
        quantize_static(
            str(fp32_path), str(int8_path), Calibration(), quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
        )
    finally:
        root_logger.setLevel(level)
    model_bytes = int8_path.read_bytes()
    for path in (fp32_path, int8_path):
        path.unlink()

    def accuracy(path_or_bytes: Any) -> float:
        sess = ort.InferenceSession(path_or_bytes, providers=["CPUExecutionProvider"])
        label = sess.run(["label"], {"input": x_test})[0]
        return float(np.mean(label == y_test))

    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    sample = x_test[:4]
    label, proba = sess.run(["label", "probabilities"], {"input": sample})
    features = tuple(f"f{i}" for i in range(N_FEATURES))
    # The reference profile a package made by `outpost package` ships (same schema, same
    # code), so whatever the agent does per request with it is in the measurement too.
    profile_rows = x_train[:1000]
    (predicted,) = sess.run(["label"], {"input": profile_rows})
    profile = reference_profile(
        profile_rows, features,
        classification_prediction(predicted.astype(np.int64), ("0", "1")),
    )
    _write_package(
        directory,
        model_bytes,
        name=TABULAR,
        version=version,
        inputs=(TensorSpec("input", "FP32", (-1, N_FEATURES)),),
        outputs=(
            TensorSpec("label", "INT64", (-1,)),
            TensorSpec("probabilities", "FP32", (-1, 2)),
        ),
        task="classification",
        labels=("0", "1"),
        features=features,
        reference_profile=profile,
        self_test=SelfTest(
            inputs=(_tensor("input", "FP32", sample),),
            outputs=(
                _tensor("label", "INT64", label.astype(np.int64)),
                _tensor("probabilities", "FP32", proba),
            ),
        ),
        quantization={
            "method": "static", "format": "QDQ", "activations": "int8", "weights": "int8",
            "calibration_rows": len(x_train),
            "accuracy_before": accuracy(onx.SerializeToString()),
            "accuracy_after": accuracy(model_bytes),
        },
    )


def _float_input(n: int) -> list[Any]:
    from skl2onnx.common.data_types import FloatTensorType

    return [("input", FloatTensorType([None, n]))]


# --- conv ------------------------------------------------------------------------------------


def conv_model_bytes(seed: int) -> bytes:
    """Three Conv+Relu stages with pooling, global average pool, Gemm to 10 logits."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    initializers = []
    nodes = []

    def weight(name: str, shape: tuple[int, ...], fan_in: int) -> str:
        # He-scaled, so activations (and the logits compared at atol 1e-4) stay of order 1.
        w = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        initializers.append(numpy_helper.from_array(w, name))
        return name

    x = "input"
    channels = IMAGE_SHAPE[0]
    for i, (out_ch, stride) in enumerate(((16, 2), (32, 1), (64, 1))):
        w = weight(f"conv{i}.w", (out_ch, channels, 3, 3), channels * 9)
        b = weight(f"conv{i}.b", (out_ch,), channels * 9)
        nodes.append(helper.make_node(
            "Conv", [x, w, b], [f"conv{i}"], kernel_shape=[3, 3], strides=[stride, stride],
            pads=[1, 1, 1, 1],
        ))
        nodes.append(helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"]))
        x = f"relu{i}"
        if i < 2:
            nodes.append(helper.make_node(
                "MaxPool", [x], [f"pool{i}"], kernel_shape=[2, 2], strides=[2, 2],
            ))
            x = f"pool{i}"
        channels = out_ch
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"]))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], axis=1))
    fc_w = weight("fc.w", (N_CLASSES_CONV, channels), channels)
    fc_b = weight("fc.b", (N_CLASSES_CONV,), channels)
    nodes.append(helper.make_node("Gemm", ["flat", fc_w, fc_b], ["logits"], transB=1))
    graph = helper.make_graph(
        nodes, "bench_conv",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *IMAGE_SHAPE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", N_CLASSES_CONV])],
        initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="outpost-bench",
    )
    # IR 8 (ONNX 1.10+) is read by every onnxruntime the agent supports.
    model.ir_version = 8
    return bytes(model.SerializeToString())


def conv_input(batch: int = 1, seed: int = 11) -> np.ndarray:
    """A normalised-image-like tensor (standard normal), the same for every contender."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, *IMAGE_SHAPE)).astype(np.float32)


def _build_conv(directory: Path, version: int, seed: int) -> None:
    import onnxruntime as ort

    model_bytes = conv_model_bytes(seed)
    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    sample = conv_input(1, seed=5)
    (logits,) = sess.run(["logits"], {"input": sample})
    _write_package(
        directory,
        model_bytes,
        name=CONV,
        version=version,
        inputs=(TensorSpec("input", "FP32", (-1, *IMAGE_SHAPE)),),
        outputs=(TensorSpec("logits", "FP32", (-1, N_CLASSES_CONV)),),
        task="classification",
        labels=tuple(f"class{i}" for i in range(N_CLASSES_CONV)),
        self_test=SelfTest(
            inputs=(_tensor("input", "FP32", sample),),
            outputs=(_tensor("logits", "FP32", logits),),
        ),
        quantization={"method": "none", "reason": "benchmark of the FP32 tensor path"},
    )
