"""int8 static quantization of a converted model (QDQ format, S8S8).

Static, not dynamic: activation scales are fixed at packaging time from the sample, so
a row gives bit-for-bit the same result alone or inside any batch. The agent's
micro-batcher relies on that; dynamic quantization computes scales per batch and
would make a prediction depend on its neighbours.

S8S8 QDQ (int8 activations and weights, QuantizeLinear/DequantizeLinear pairs) is
onnxruntime's recommended default on x86-64 and ARM64.

onnxruntime's `quant_pre_process` runs first, as ONNX shape inference only: its graph
optimisation drops the type information after scikit-learn's ai.onnx.ml operators
(Scaler, ...), so the calibrator then misses tensors, and its symbolic shape inference
needs sympy, which nothing else here uses.

Quantization never fails a packaging run: any failure yields no int8 model and a reason,
and the package keeps FP32.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from hub.packager.convert import INPUT

METHOD = "static-qdq-s8s8"
# Operators whose int8 kernels do the work; a graph without any (e.g. scikit-learn's
# linear and tree models, which convert to ai.onnx.ml operators) gains nothing.
QUANTIZABLE_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose"})
CALIBRATION_ROWS = 2000
CALIBRATION_BATCH = 64


@dataclass(frozen=True)
class QuantizeOutcome:
    model: bytes | None  # the int8 model, or None when there is none
    reason: str  # why there is none; empty when there is one


def calibration_rows(x: NDArray[np.float32]) -> NDArray[np.float32]:
    """The rows to calibrate on: complete rows only (NaN would poison min/max), capped."""
    complete = x[~np.isnan(x).any(axis=1)]
    return complete[:CALIBRATION_ROWS]


def op_types(model: bytes) -> set[str]:
    import onnx

    graph = onnx.load_from_string(model).graph
    return {node.op_type for node in graph.node}


def quantize_int8(model: bytes, x: NDArray[np.float32]) -> QuantizeOutcome:
    """Quantize `model` to int8, calibrated on the rows of `x`."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    ops = op_types(model)
    if not ops & QUANTIZABLE_OPS:
        return QuantizeOutcome(
            None,
            "nothing to quantize: the model has no MatMul, Gemm or Conv "
            f"(it uses {', '.join(sorted(ops))})",
        )
    rows = calibration_rows(x)
    if rows.shape[0] == 0:
        return QuantizeOutcome(
            None, "no complete sample row (without missing values) to calibrate on"
        )

    class Reader(CalibrationDataReader):  # type: ignore[misc]  # onnxruntime is untyped
        def __init__(self) -> None:
            self._batches: Iterator[NDArray[np.float32]] = (
                rows[i : i + CALIBRATION_BATCH] for i in range(0, rows.shape[0], CALIBRATION_BATCH)
            )

        def get_next(self) -> dict[str, Any] | None:
            batch = next(self._batches, None)
            return None if batch is None else {INPUT: batch}

    with tempfile.TemporaryDirectory(prefix="outpost-quantize-") as tmp:
        source = Path(tmp) / "fp32.onnx"
        prepared = Path(tmp) / "prepared.onnx"
        target = Path(tmp) / "int8.onnx"
        source.write_bytes(model)
        try:
            quant_pre_process(source, prepared, skip_optimization=True, skip_symbolic_shape=True)
            quantize_static(
                prepared,
                target,
                Reader(),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
            )
            quantized = target.read_bytes()
        # The quantizer fails in many ways (ValueError, RuntimeError, KeyError from its
        # graph walks, onnx checker errors); each only means "no int8 for this model".
        except Exception as exc:
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            return QuantizeOutcome(None, f"quantization failed: {type(exc).__name__}: {detail}")
    return QuantizeOutcome(quantized, "")
