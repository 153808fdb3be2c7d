"""The JSON answers of a batch, rendered once for all its requests.

Why: requests that shared one onnxruntime call get their answers as rows of the same output
arrays. Encoding each answer on its own (a document of dicts and array views through orjson)
costs about 1.3 µs a request; the numbers of all rows come out of one orjson call per output
instead, and each answer is then its rows' text between fixed pieces (about 0.4 µs).

The answer is byte for byte what `encode_infer_response` writes for the same rows: the same
orjson number formatting, the same keys in the same order (tests/agent/test_jsonrows.py holds
them to it). Outputs orjson cannot write as numbers (BYTES, non-native byte order) make the
whole batch fall back to the per-answer encoder: `answer` returns None.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import numpy as np
import orjson

from agent.serving.datatypes import from_numpy

__all__ = ["JsonRows"]

# Bound once (Final: a C static when compiled): `orjson.dumps` looks the attribute up per call.
_dumps: Final = orjson.dumps
_NUMPY_OPT: Final = orjson.OPT_SERIALIZE_NUMPY
# Between a row's numbers in orjson's text of a two-dimensional array. Numbers, true, false and
# null never contain a bracket, so splitting there gives each row's numbers.
_ROW_BREAK: Final = b"],["


# The fixed text of answers, the same for every batch of a version: made once, not per batch (about
# 2 µs a batch). Keyed by what it is made of; bounded, as a device serves a handful of versions.
_MAX_CACHED: Final = 256
_heads: dict[tuple[str, str], bytes] = {}
_frames: dict[tuple[str, str, tuple[int, ...]], tuple[bytes, bytes, bytes]] = {}


def _head(model_name: str, model_version: str) -> bytes:
    key = (model_name, model_version)
    head = _heads.get(key)
    if head is None:
        if len(_heads) >= _MAX_CACHED:
            _heads.clear()
        head = b'{"model_name":' + _dumps(model_name) + b',"model_version":' + _dumps(model_version)
        _heads[key] = head
    return head


def _frame(name: str, datatype: str, rest_shape: tuple[int, ...]) -> tuple[bytes, bytes, bytes]:
    """An output entry's text before the row count, between it and the data, and before one row's
    data: {"name":...,"datatype":...,"shape":[ROWS,REST...],"data":[...]}."""
    key = (name, datatype, rest_shape)
    frame = _frames.get(key)
    if frame is None:
        if len(_frames) >= _MAX_CACHED:
            _frames.clear()
        opening = b'{"name":' + _dumps(name) + b',"datatype":' + _dumps(datatype) + b',"shape":['
        rest = b"".join([b",%d" % d for d in rest_shape]) + b'],"data":['
        frame = _frames[key] = (opening, rest, opening + b"1" + rest)  # the last: a one-row answer
    return frame


class _Output:
    """One output of the batch: its entry's fixed text around the shape and the data, and the text
    of each row's numbers."""

    __slots__ = ("one_row", "open", "rest", "rows")

    def __init__(self, frame: tuple[bytes, bytes, bytes], rows: list[bytes]) -> None:
        self.open, self.rest, self.one_row = frame
        self.rows = rows


def _row_texts(arr: np.ndarray) -> list[bytes] | None:
    """The text of each row's numbers (flattened, without brackets), or None when orjson cannot
    write them."""
    if arr.ndim == 0 or arr.shape[0] == 0 or from_numpy(arr.dtype) == "BYTES":
        return None
    width = 1
    for d in arr.shape[1:]:
        width *= d
    if width == 0:
        return None
    try:
        text = _dumps(arr.reshape(arr.shape[0], width), option=_NUMPY_OPT)
    except (orjson.JSONEncodeError, ValueError):
        return None
    rows = text[2:-2].split(_ROW_BREAK)  # "[[a,b],[c,d]]" -> ["a,b", "c,d"]
    return rows if len(rows) == arr.shape[0] else None


def _outputs(arrays: Mapping[str, np.ndarray]) -> list[_Output] | None:
    outputs = []
    for name, arr in arrays.items():
        rows = _row_texts(arr)
        if rows is None:
            return None
        outputs.append(_Output(_frame(name, from_numpy(arr.dtype), arr.shape[1:]), rows))
    return outputs


class JsonRows:
    """Every output of one batch as JSON text per row; `answer` puts one request's together."""

    __slots__ = ("_head", "_outputs")

    def __init__(self, model_name: str, model_version: str, arrays: Mapping[str, np.ndarray]) -> None:
        self._head = _head(model_name, model_version)
        self._outputs = _outputs(arrays)

    def answer(self, request_id: str, start: int, count: int) -> bytes | None:
        """The response body of the request whose `count` rows start at row `start` of the batch;
        None when this batch's outputs cannot be written this way."""
        outputs = self._outputs
        if outputs is None:
            return None
        parts = [self._head, b',"id":', _dumps(request_id), b',"outputs":[']
        first = True
        for out in outputs:
            if first:
                first = False
            else:
                parts.append(b",")
            if count == 1:
                parts.append(out.one_row)
                parts.append(out.rows[start])
            else:
                parts.append(out.open)
                parts.append(b"%d" % count)
                parts.append(out.rest)
                parts.append(b",".join(out.rows[start : start + count]))
            parts.append(b"]}")
        parts.append(b"]}")
        return b"".join(parts)
