"""Captured requests out as CSV or Parquet, streamed: bytes a chunk at a time, never the whole
export in memory (Parquet: one row group per CHUNK_LINES lines).

CSV: a header line (hub.capture.columns), then one line per input row; ts in ISO 8601 UTC with
milliseconds, missing values empty, booleans true/false, floats in their shortest exact form,
lists and objects as JSON.

Parquet (pyarrow, `pip install 'outpost[parquet]'`): the same columns, typed: ts a UTC
timestamp (ms), version and row int64, each feature and output by its tensor's datatype
(float64, int64, bool, string), probabilities float64, the label float64 for regression and
text otherwise. A value that does not fit its column's type is null there.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

from hub.capture.columns import Captured, Kind, Layout, lines
from hub.errors import InvalidRequestError

CHUNK_LINES = 10_000
FORMATS = ("csv", "parquet")
MEDIA_TYPES = {"csv": "text/csv; charset=utf-8", "parquet": "application/vnd.apache.parquet"}
PARQUET_MISSING = "Parquet export needs pyarrow on the hub: pip install 'outpost[parquet]'"


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ""
    if isinstance(value, int | str):
        return str(value)
    return json.dumps(value, separators=(",", ":"))


def csv_stream(layout: Layout, captured: Iterable[Captured]) -> Iterator[bytes]:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(layout.header)
    count = 0
    for item in captured:
        for line in lines(layout, item):
            writer.writerow([iso(line[0]), *(csv_cell(v) for v in line[1:])])
            count += 1
            if count % 1000 == 0:
                yield buffer.getvalue().encode("utf-8")
                buffer.seek(0)
                buffer.truncate()
    yield buffer.getvalue().encode("utf-8")


def check_parquet() -> None:
    """InvalidRequestError (400) when this hub cannot write Parquet."""
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise InvalidRequestError(PARQUET_MISSING) from None


def _coerce(kind: Kind, value: Any) -> Any:
    if value is None:
        return None
    if kind == "float":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return float(value) if ok else None
    if kind == "int":
        return value if isinstance(value, int) and not isinstance(value, bool) else None
    if kind == "bool":
        return value if isinstance(value, bool) else None
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


class _Sink:
    """A write-only file for pyarrow that hands its bytes to the stream."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.closed = False
        self._pos = 0

    def write(self, data: bytes) -> int:
        self.chunks.append(bytes(data))
        self._pos += len(data)
        return len(data)

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def take(self) -> bytes:
        out = b"".join(self.chunks)
        self.chunks.clear()
        return out


def parquet_stream(layout: Layout, captured: Iterable[Captured]) -> Iterator[bytes]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = {"float": pa.float64(), "int": pa.int64(), "bool": pa.bool_(), "text": pa.string()}
    fixed = [
        pa.field("ts", pa.timestamp("ms", tz="UTC")),
        pa.field("device_id", pa.string()),
        pa.field("group", pa.string()),
        pa.field("version", pa.int64()),
        pa.field("id", pa.string()),
        pa.field("row", pa.int64()),
    ]
    kinds: list[Kind] = [c.kind for c in (*layout.features, *layout.outputs)] + [layout.label_kind]
    names = layout.header[len(fixed) :]
    schema = pa.schema(fixed + [pa.field(n, types[k]) for n, k in zip(names, kinds, strict=True)])
    sink = _Sink()
    writer = pq.ParquetWriter(sink, schema)

    def group(rows: list[list[Any]]) -> Any:
        columns: list[Any] = [
            [round(r[0] * 1000) for r in rows],
            *([r[i] for r in rows] for i in range(1, len(fixed))),
        ]
        for offset, kind in enumerate(kinds):
            columns.append([_coerce(kind, r[len(fixed) + offset]) for r in rows])
        return pa.Table.from_arrays(
            [pa.array(col, type=field.type) for col, field in zip(columns, schema, strict=True)],
            schema=schema,
        )

    pending: list[list[Any]] = []
    for item in captured:
        pending.extend(lines(layout, item))
        if len(pending) >= CHUNK_LINES:
            writer.write_table(group(pending))
            pending = []
            yield sink.take()
    if pending:
        writer.write_table(group(pending))
    writer.close()
    yield sink.take()
