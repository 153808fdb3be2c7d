"""scikit-learn -> ONNX, with the tensor names and types every Outpost package uses.

Invariants of the converted graph:
- one input `input`, FP32, shape [-1, n_features];
- classifiers: `label` (INT64, or BYTES for string classes), shape [-1], and
  `probabilities`, FP32 [-1, n_classes], a plain tensor (no ZipMap: the agent serves
  tensors, and a sequence of maps cannot be micro-batched or quantized);
- regressors: `prediction`, FP32 [-1] or [-1, 1].

The opset is pinned to what the oldest supported onnxruntime on the devices (1.17,
the floor in pyproject) runs, not to whatever the hub's newest skl2onnx would emit.
"""

from __future__ import annotations

import re
from typing import Any

from hub.errors import PackagingError
from hub.packager.estimator import CLASSIFICATION, EstimatorInfo

INPUT = "input"
LABEL = "label"
PROBABILITIES = "probabilities"
PREDICTION = "prediction"

# onnxruntime 1.17 implements ONNX opsets up to 20 and ai.onnx.ml up to 4.
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}

_MISSING_TYPE = re.compile(r"type '<class '(?:[\w.]+\.)?(\w+)'>'")

# onnx.TensorProto element types, as numbers so this module needs no onnx import at load.
_FLOAT, _INT64, _STRING = 1, 7, 8


def rename_outputs(graph: Any, names: dict[str, str]) -> None:
    """Rename graph outputs in place, with every node and value_info that refers to them."""
    taken = {out for node in graph.node for out in node.output} | {i.name for i in graph.input}
    for old, new in names.items():
        if new != old and new in taken:
            raise PackagingError(
                f"the converted graph already has a tensor named {new!r}; cannot rename {old!r}"
            )
    for node in graph.node:
        for seq in (node.input, node.output):
            for i, name in enumerate(seq):
                if name in names:
                    seq[i] = names[name]
    for info in (*graph.output, *graph.value_info):
        if info.name in names:
            info.name = names[info.name]


def dedupe_opsets(model: Any) -> None:
    """Keep one opset_import per domain (the highest).

    skl2onnx can list the default domain twice; onnxruntime tolerates it but its
    quantizer then fails with "Failed to find proper ai.onnx domain".
    """
    best: dict[str, int] = {}
    for opset in model.opset_import:
        domain = "" if opset.domain == "ai.onnx" else opset.domain
        best[domain] = max(best.get(domain, 0), opset.version)
    del model.opset_import[:]
    for domain, version in sorted(best.items()):
        entry = model.opset_import.add()
        entry.domain = domain
        entry.version = version


def _elem_type_and_rank(value_info: Any) -> tuple[int | None, list[int | None]]:
    if not value_info.type.HasField("tensor_type"):
        return None, []
    tensor = value_info.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
    return tensor.elem_type, dims


def stable_output_names(graph: Any, info: EstimatorInfo) -> dict[str, str]:
    """Map skl2onnx's output names to ours, checking their types; pure."""
    outputs = list(graph.output)
    if info.task == CLASSIFICATION:
        if len(outputs) != 2:
            raise PackagingError(
                f"unsupported estimator {info.description}: its ONNX form has "
                f"{len(outputs)} outputs, expected a label and class probabilities"
            )
        label_type, _ = _elem_type_and_rank(outputs[0])
        prob_type, prob_dims = _elem_type_and_rank(outputs[1])
        if label_type not in (_INT64, _STRING) or prob_type != _FLOAT or len(prob_dims) != 2:
            raise PackagingError(
                f"unsupported estimator {info.description}: its ONNX outputs are not a label "
                "and an FP32 probability matrix"
            )
        return {outputs[0].name: LABEL, outputs[1].name: PROBABILITIES}
    if len(outputs) != 1:
        raise PackagingError(
            f"unsupported estimator {info.description}: its ONNX form has {len(outputs)} outputs"
        )
    elem_type, dims = _elem_type_and_rank(outputs[0])
    if elem_type != _FLOAT or len(dims) > 2 or (len(dims) == 2 and dims[1] not in (1, None)):
        raise PackagingError(
            f"unsupported estimator {info.description}: multi-output or non-FP32 regressors "
            "cannot be packaged (one FP32 prediction per row)"
        )
    return {outputs[0].name: PREDICTION}


def to_onnx(model: object, info: EstimatorInfo, n_features: int) -> bytes:
    """Convert a fitted estimator to a serialized ONNX model with Outpost's tensor names."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from skl2onnx.common.exceptions import MissingConverter, MissingShapeCalculator

    options = {id(model): {"zipmap": False}} if info.task == CLASSIFICATION else None
    try:
        proto = convert_sklearn(
            model,
            initial_types=[(INPUT, FloatTensorType([None, n_features]))],
            options=options,
            target_opset=TARGET_OPSET,
        )
    except (MissingShapeCalculator, MissingConverter) as exc:
        found = _MISSING_TYPE.search(str(exc))
        part = found.group(1) if found else info.description
        raise PackagingError(
            f"unsupported estimator {part}: skl2onnx has no ONNX converter for it "
            f"(model: {info.description})"
        ) from exc
    # skl2onnx raises bare RuntimeError/ValueError/NotImplementedError/NameError for
    # options or parameters a converter does not handle; each means "cannot convert".
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PackagingError(f"cannot convert {info.description} to ONNX: {first_line}") from exc
    rename_outputs(proto.graph, stable_output_names(proto.graph, info))
    dedupe_opsets(proto)
    data: bytes = proto.SerializeToString()
    return data
