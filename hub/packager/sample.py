"""The sample data a model is packaged with: feature rows, their names, optional targets.

The sample calibrates int8 quantization, measures accuracy and latency, provides the
self-test vectors and the drift reference profile, so it should look like what the
devices will see.

Accepted forms:
- CSV, with or without a header row. A first row with any cell that is not a number
  is the header. With `target`, the header must name that column; it is taken out of
  the features and kept as raw strings. Empty cells and `nan` are missing values (NaN).
- `.npy`: a 2-D numeric array (rows x features), loaded without pickle. Targets then come
  from a separate 1-D `.npy` (`labels`).

`parse_csv` and `sample_from_arrays` are pure; `load_sample` does the file I/O.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from hub.errors import PackagingError

# Read whole: a sample is meant to be a representative few thousand rows, not a data lake.
MAX_SAMPLE_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class Sample:
    """Feature rows as FP32 (NaN = missing), their names when the file has them, targets."""

    x: NDArray[np.float32]
    features: tuple[str, ...] | None = None
    y: NDArray[Any] | None = None

    @property
    def n(self) -> int:
        return int(self.x.shape[0])


def default_feature_names(n_features: int) -> tuple[str, ...]:
    return tuple(f"f{i}" for i in range(n_features))


def _number(cell: str) -> float | None:
    """The cell as a float; NaN for a missing value; None when it is not a number."""
    text = cell.strip()
    if not text:
        return math.nan
    try:
        return float(text)
    except ValueError:
        return None


def parse_csv(text: str, source: str, target: str | None = None) -> Sample:
    """Parse CSV text into a Sample. `source` names the file in error messages."""
    rows = [
        (i, row)
        for i, row in enumerate(csv.reader(io.StringIO(text)), start=1)
        if any(cell.strip() for cell in row)
    ]
    if not rows:
        raise PackagingError(f"{source}: the sample is empty")
    first_line, first = rows[0]
    has_header = any(_number(cell) is None for cell in first)
    if has_header:
        names = [cell.strip() for cell in first]
        body = rows[1:]
    else:
        names = list(default_feature_names(len(first)))
        body = rows
    if target is not None and not has_header:
        raise PackagingError(
            f"{source}: --target {target!r} needs a header row naming the columns; "
            "the first row is all numbers"
        )
    if target is not None and target not in names:
        raise PackagingError(
            f"{source}: no column {target!r} in the header (columns: {', '.join(names)})"
        )
    if len(set(names)) != len(names):
        raise PackagingError(f"{source} line {first_line}: the header repeats a column name")
    if not body:
        raise PackagingError(f"{source}: the sample has a header but no data rows")

    n_features = len(names) - (1 if target is not None else 0)
    values = np.empty((len(body), n_features), dtype=np.float64)
    targets: list[str] = []
    for r, (line, row) in enumerate(body):
        if len(row) != len(names):
            raise PackagingError(
                f"{source} line {line}: {len(row)} cells, but the first row has {len(names)}"
            )
        c = 0
        for name, cell in zip(names, row, strict=True):
            if name == target:
                if not cell.strip():
                    raise PackagingError(f"{source} line {line}: the target {target!r} is empty")
                targets.append(cell.strip())
                continue
            number = _number(cell)
            if number is None:
                raise PackagingError(
                    f"{source} line {line}, column {name!r}: {cell.strip()!r} is not a number "
                    "(features must be numeric; encode categories before packaging)"
                )
            values[r, c] = number
            c += 1
    features = tuple(n for n in names if n != target) if has_header else None
    y = np.asarray(targets, dtype=np.str_) if target is not None else None
    return sample_from_arrays(values, features, y, source)


def sample_from_arrays(
    x: NDArray[Any], features: tuple[str, ...] | None, y: NDArray[Any] | None, source: str
) -> Sample:
    """Validate feature rows (and targets) and convert the rows to FP32."""
    if x.ndim != 2:
        raise PackagingError(
            f"{source}: the sample must be a 2-D array (rows x features), got {x.ndim}-D"
        )
    if x.dtype.kind not in "biuf":
        raise PackagingError(f"{source}: the sample must be numeric, got dtype {x.dtype}")
    if x.shape[0] == 0:
        raise PackagingError(f"{source}: the sample is empty")
    if x.shape[1] == 0:
        raise PackagingError(f"{source}: the sample has no feature columns")
    x32 = x.astype(np.float32)
    # NaN is a missing value; an infinity (or a float64 beyond FP32's range) is not data.
    if np.isinf(x32).any():
        row, col = (int(i) for i in np.argwhere(np.isinf(x32))[0])
        raise PackagingError(
            f"{source}: row {row + 1}, feature {col} is infinite (or too large for FP32)"
        )
    if y is not None:
        y = y.ravel() if y.ndim == 2 and 1 in y.shape else y
        if y.ndim != 1 or len(y) != x.shape[0]:
            raise PackagingError(
                f"{source}: {x.shape[0]} sample rows but the targets have shape {list(y.shape)}"
            )
    return Sample(x=x32, features=features, y=y)


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_SAMPLE_BYTES:
            raise PackagingError(f"{path}: {what} larger than {MAX_SAMPLE_BYTES} bytes")
        return path.read_bytes()
    except FileNotFoundError:
        raise PackagingError(f"{path}: no such {what} file") from None
    except IsADirectoryError:
        raise PackagingError(f"{path}: is a directory, not a {what} file") from None
    except OSError as exc:
        raise PackagingError(f"{path}: cannot read the {what} ({exc.strerror})") from exc


def _load_npy(path: Path, what: str) -> NDArray[Any]:
    raw = _read_bytes(path, what)
    try:
        # allow_pickle=False: a pickled object array would run code on load.
        array: NDArray[Any] = np.load(io.BytesIO(raw), allow_pickle=False)
    except ValueError as exc:
        raise PackagingError(f"{path}: not a plain numeric .npy array ({exc})") from exc
    except OSError as exc:
        raise PackagingError(f"{path}: not a .npy file ({exc})") from exc
    return array


def load_sample(path: Path, target: str | None = None, labels: Path | None = None) -> Sample:
    """Read a sample from CSV or .npy, with targets from a CSV column or a labels .npy."""
    if path.suffix.lower() == ".npy":
        if target is not None:
            raise PackagingError(
                f"{path}: --target names a CSV column; for a .npy sample give --labels y.npy"
            )
        sample = sample_from_arrays(_load_npy(path, "sample"), None, None, str(path))
    else:
        raw = _read_bytes(path, "sample")
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise PackagingError(
                f"{path}: not UTF-8 text; give a CSV file or a .npy array ({exc.reason})"
            ) from exc
        sample = parse_csv(text, str(path), target)
    if labels is not None:
        if sample.y is not None:
            raise PackagingError("give targets either as --target or as --labels, not both")
        y = _load_npy(labels, "labels")
        sample = sample_from_arrays(sample.x, sample.features, y, f"{labels}")
    return sample
