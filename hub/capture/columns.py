"""A model version's export columns, and how one captured request becomes lines. Pure.

One line per input row: a request of n rows gives n lines, `row` being the index within it.

    ts, device_id, group, version, id, row,   (ts: ISO 8601 UTC, the device's clock at the request)
    <features>,                               a model with one input [n, F]: the names of the
                                              reference profile (or the manifest's `features`)
                                              when there are F of them, else {input}_{j};
                                              other inputs: {input} (one value a row) or
                                              {input}_{j} (a row flattened)
    <outputs>,                                classification: predicted (the label output) and
                                              probability_{label} (the manifest's labels);
                                              regression: predicted; otherwise {output} or
                                              {output}_{j} like inputs
    label                                     the label fed back for the request (for a
                                              multi-row request, the list's element for the row)

A name that would repeat another column's gets its part's prefix (`output_label`). Values are
kept as the device sent them (non-finite floats arrive as null); a value the layout
expects and the request lacks is None.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from agent.package.manifest import Manifest, TensorSpec

FIXED = ("ts", "device_id", "group", "version", "id", "row")
LABEL = "label"
Kind = Literal["float", "int", "text", "bool"]
Part = Literal["inputs", "outputs"]


def kind_of(datatype: str) -> Kind:
    if datatype.startswith("FP"):
        return "float"
    if datatype.startswith(("INT", "UINT")):
        return "int"
    if datatype == "BOOL":
        return "bool"
    return "text"


@dataclass(frozen=True)
class Column:
    name: str
    part: Part
    tensor: str
    index: int | None  # None: the row's one value; j: element j of the row, flattened
    kind: Kind


@dataclass(frozen=True)
class Layout:
    features: tuple[Column, ...]
    outputs: tuple[Column, ...]
    label_kind: Kind  # regression: float; otherwise text (like the manifest's labels)

    @property
    def header(self) -> list[str]:
        return [*FIXED, *(c.name for c in self.features), *(c.name for c in self.outputs), LABEL]


def _width(shape: Sequence[int]) -> int | None:
    """Values per row of a tensor of this shape (rows first); None when the row is one value
    or its size is not fixed."""
    rest = list(shape[1:])
    if not rest:
        return None
    if any(d < 1 for d in rest):
        return None
    return math.prod(rest)


def _generic(spec: TensorSpec, part: Part) -> list[Column]:
    width = _width(spec.shape)
    kind = kind_of(spec.datatype)
    if width is None or width == 1:
        return [Column(spec.name, part, spec.name, None, kind)]
    return [Column(f"{spec.name}_{j}", part, spec.name, j, kind) for j in range(width)]


def feature_names(manifest: Manifest, width: int) -> tuple[str, ...] | None:
    profiled = manifest.reference_profile.get("features")
    if isinstance(profiled, list):
        names = tuple(str(f.get("name", "")) if isinstance(f, dict) else "" for f in profiled)
        if len(names) == width and all(names) and len(set(names)) == width:
            return names
    if len(manifest.features) == width and len(set(manifest.features)) == width:
        return manifest.features
    return None


def _features(manifest: Manifest) -> list[Column]:
    if len(manifest.inputs) == 1 and len(manifest.inputs[0].shape) == 2:
        spec = manifest.inputs[0]
        width = _width(spec.shape)
        names = feature_names(manifest, width) if width else None
        if names is not None:
            kind = kind_of(spec.datatype)
            return [Column(name, "inputs", spec.name, j, kind) for j, name in enumerate(names)]
    return [c for spec in manifest.inputs for c in _generic(spec, "inputs")]


def _one_per_row(spec: TensorSpec) -> bool:
    return len(spec.shape) == 1 or (len(spec.shape) == 2 and spec.shape[1] == 1)


def _outputs(manifest: Manifest) -> list[Column]:
    outputs = manifest.outputs
    predicted = next((o for o in outputs if _one_per_row(o)), None)
    if manifest.task == "classification" and predicted is not None:
        columns = [Column("predicted", "outputs", predicted.name, None, kind_of(predicted.datatype))]
        labels = manifest.labels
        probs = next(
            (
                o
                for o in outputs
                if len(o.shape) == 2 and labels and o.shape[1] == len(labels) and o is not predicted
            ),
            None,
        )
        if probs is not None:
            columns += [
                Column(f"probability_{label}", "outputs", probs.name, j, "float")
                for j, label in enumerate(labels)
            ]
        return columns
    if manifest.task == "regression" and predicted is not None:
        return [Column("predicted", "outputs", predicted.name, None, kind_of(predicted.datatype))]
    return [c for spec in outputs for c in _generic(spec, "outputs")]


def _unique(features: list[Column], outputs: list[Column]) -> tuple[tuple[Column, ...], tuple[Column, ...]]:
    """Names that would repeat a fixed column, the label or an earlier column get their part's
    prefix (an output named "label" is `output_label`)."""
    taken = {*FIXED, LABEL}
    out: list[Column] = []
    for column in (*features, *outputs):
        name = column.name
        if name in taken:
            name = f"{column.part[:-1]}_{name}"
        while name in taken:
            name += "_"
        taken.add(name)
        out.append(Column(name, column.part, column.tensor, column.index, column.kind))
    return tuple(out[: len(features)]), tuple(out[len(features) :])


def layout(manifest: Manifest) -> Layout:
    """The export's columns for a model version."""
    features, outputs = _unique(_features(manifest), _outputs(manifest))
    return Layout(features, outputs, "float" if manifest.task == "regression" else "text")


def _guess(tensors: dict[str, list[Any]], part: Part) -> list[Column]:
    columns: list[Column] = []
    for name, rows in tensors.items():
        first = rows[0] if rows else None
        values = list(_flatten(first))
        datatype = "BYTES" if any(isinstance(v, str) for v in values) else "FP64"
        columns += _generic(TensorSpec(name, datatype, (-1, len(values))), part)
    return columns


def guessed_layout(inputs: dict[str, list[Any]], outputs: dict[str, list[Any]]) -> Layout:
    """Columns from a captured request when the version's manifest is gone (deleted)."""
    features, outputs_ = _unique(_guess(inputs, "inputs"), _guess(outputs, "outputs"))
    return Layout(features, outputs_, "text")


def _flatten(value: Any) -> Iterator[Any]:
    if isinstance(value, list):
        for item in value:
            yield from _flatten(item)
    else:
        yield value


def _cell(tensors: dict[str, list[Any]], column: Column, r: int) -> Any:
    rows = tensors.get(column.tensor)
    if not isinstance(rows, list) or r >= len(rows):
        return None
    value = rows[r]
    if column.index is None:
        while isinstance(value, list) and len(value) == 1:
            value = value[0]
        return value
    flat = list(_flatten(value))
    return flat[column.index] if column.index < len(flat) else None


def row_label(label: Any, r: int, n: int) -> Any:
    """The label of row r of an n-row request: a list's element (one per row), else the value."""
    if isinstance(label, list) and (n > 1 or len(label) == 1):
        return label[r] if r < len(label) else None
    return label


@dataclass(frozen=True)
class Captured:
    """One stored request, as the export reads it."""

    ts: float
    device_id: str
    group: str
    version: int
    prediction_id: str
    inputs: dict[str, list[Any]]
    outputs: dict[str, list[Any]]
    label: Any  # None: no label fed back


def lines(layout: Layout, captured: Captured) -> Iterator[list[Any]]:
    """The request's lines, in `layout.header`'s order (ts as epoch seconds)."""
    first = next(iter(captured.inputs.values()), [])
    n = len(first) if isinstance(first, list) else 1
    fixed = [captured.ts, captured.device_id, captured.group, captured.version, captured.prediction_id]
    for r in range(n):
        yield [
            *fixed,
            r,
            *(_cell(captured.inputs, c, r) for c in layout.features),
            *(_cell(captured.outputs, c, r) for c in layout.outputs),
            row_label(captured.label, r, n),
        ]
