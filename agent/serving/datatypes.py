"""Open Inference Protocol datatypes, their numpy dtypes and onnxruntime's type names.

Pure tables and functions; no I/O.
"""

from __future__ import annotations

import numpy as np

from agent.errors import RequestError

# OIP datatype -> numpy dtype. BYTES maps to object arrays of `bytes`.
_TO_NUMPY: dict[str, np.dtype[np.generic]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}

# onnxruntime's NodeArg.type strings -> OIP datatype.
_FROM_ORT: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

DATATYPES = frozenset(_TO_NUMPY)


def numpy_dtype(datatype: str) -> np.dtype[np.generic]:
    """The numpy dtype of an OIP datatype; a RequestError for an unknown one."""
    try:
        return _TO_NUMPY[datatype]
    except KeyError:
        raise RequestError(
            f"unknown datatype {datatype!r}; expected one of {', '.join(sorted(DATATYPES))}"
        ) from None


def from_ort_type(ort_type: str) -> str:
    """The OIP datatype of an onnxruntime tensor type such as 'tensor(float)'."""
    try:
        return _FROM_ORT[ort_type]
    except KeyError:
        raise ValueError(f"onnxruntime type {ort_type!r} has no Open Inference Protocol datatype") from None


_FROM_NUMPY: dict[np.dtype[np.generic], str] = {
    dtype: name for name, dtype in _TO_NUMPY.items() if name != "BYTES"
}


def from_numpy(dtype: np.dtype[np.generic]) -> str:
    """The OIP datatype of a numpy dtype (str and bytes arrays are BYTES)."""
    found = _FROM_NUMPY.get(dtype)  # per output of every response: a dict hit
    if found is not None:
        return found
    if dtype.kind in ("O", "U", "S"):
        return "BYTES"
    for name, candidate in _TO_NUMPY.items():
        if candidate == dtype:
            return name
    raise ValueError(f"numpy dtype {dtype} has no Open Inference Protocol datatype")


def itemsize(datatype: str) -> int:
    """Bytes per element in the binary tensor encoding; 0 for BYTES (length-prefixed)."""
    return 0 if datatype == "BYTES" else _TO_NUMPY[datatype].itemsize
