"""A version's export columns (from its manifest) and the CSV and Parquet files, pure: one line
per input row, features named by the reference profile, predicted and probability_{label} for a
classifier, the label's element per row."""

from __future__ import annotations

import csv
import io
from typing import Any

import pytest

from agent.package.manifest import Manifest, ModelFile, TensorSpec
from hub.capture import columns, export
from hub.capture.columns import Captured

FILE = ModelFile("model.onnx", "0" * 64, 1)


def manifest(**kw: Any) -> Manifest:
    base: dict[str, Any] = {
        "name": "wine",
        "version": 3,
        "model": FILE,
        "inputs": (TensorSpec("input", "FP32", (-1, 3)),),
        "outputs": (TensorSpec("label", "INT64", (-1,)), TensorSpec("probabilities", "FP32", (-1, 3))),
        "task": "classification",
        "labels": ("0", "1", "2"),
        "reference_profile": {"features": [{"name": "alcohol"}, {"name": "ash"}, {"name": "hue"}]},
    }
    return Manifest(**{**base, **kw})


FIXED = ["ts", "device_id", "group", "version", "id", "row"]
CASES = {
    "classifier-profile-names": (
        manifest(),
        ["alcohol", "ash", "hue", "predicted", "probability_0", "probability_1", "probability_2"],
    ),
    "manifest-features-when-no-profile": (
        manifest(reference_profile={}, features=("a", "b", "c")),
        ["a", "b", "c", "predicted", "probability_0", "probability_1", "probability_2"],
    ),
    "profile-of-another-width": (
        manifest(reference_profile={"features": [{"name": "x"}]}),
        ["input_0", "input_1", "input_2", "predicted", "probability_0", "probability_1", "probability_2"],
    ),
    "regression": (
        manifest(task="regression", labels=(), outputs=(TensorSpec("y", "FP32", (-1, 1)),)),
        ["alcohol", "ash", "hue", "predicted"],
    ),
    "other-task-two-inputs": (
        manifest(
            task="other",
            labels=(),
            inputs=(TensorSpec("a", "FP32", (-1, 2)), TensorSpec("b", "INT64", (-1,))),
            outputs=(TensorSpec("y", "FP32", (-1, 2, 2)),),
        ),
        ["a_0", "a_1", "b", "y_0", "y_1", "y_2", "y_3"],
    ),
}


@pytest.mark.parametrize(("m", "names"), CASES.values(), ids=CASES.keys())
def test_columns_follow_the_manifest(m: Manifest, names: list[str]) -> None:
    assert columns.layout(m).header == [*FIXED, *names, "label"]


def test_columns_guessed_from_a_request_when_the_manifest_is_gone() -> None:
    guessed = columns.guessed_layout({"x": [[1.0, 2.0]], "k": [["a"]]}, {"label": [1]})
    assert guessed.header == [*FIXED, "x_0", "x_1", "k", "output_label", "label"]
    assert [c.kind for c in guessed.features] == ["float", "float", "text"]


@pytest.mark.parametrize(
    ("label", "n", "expected"),
    [
        (2, 1, [2]),
        ([2], 1, [2]),
        ([1, 2], 2, [1, 2]),
        ([1], 2, [1, None]),
        ("x", 2, ["x", "x"]),
        (None, 2, [None, None]),
        ([1, 2], 1, [[1, 2]]),
    ],
    ids=["scalar", "one-list", "per-row", "short-list", "scalar-for-many", "none", "list-for-one"],
)
def test_the_label_of_each_row(label: Any, n: int, expected: list[Any]) -> None:
    assert [columns.row_label(label, r, n) for r in range(n)] == expected


REQUEST = Captured(
    ts=1764252000.101,
    device_id="dev-1",
    group="lab",
    version=3,
    prediction_id="p1",
    inputs={"input": [[13.2, None, 0.5], [12.0, 2.5, 1.0]]},
    outputs={"label": [1, 0], "probabilities": [[0.1, 0.8, 0.1], [0.7, 0.2, 0.1]]},
    label=[1, 2],
)


def test_csv_has_a_line_per_input_row() -> None:
    data = b"".join(export.csv_stream(columns.layout(manifest()), [REQUEST])).decode()
    assert list(csv.reader(io.StringIO(data))) == [
        [
            *FIXED,
            "alcohol",
            "ash",
            "hue",
            "predicted",
            "probability_0",
            "probability_1",
            "probability_2",
            "label",
        ],
        [
            "2025-11-27T14:00:00.101Z",
            "dev-1",
            "lab",
            "3",
            "p1",
            "0",
            "13.2",
            "",
            "0.5",
            "1",
            "0.1",
            "0.8",
            "0.1",
            "1",
        ],
        [
            "2025-11-27T14:00:00.101Z",
            "dev-1",
            "lab",
            "3",
            "p1",
            "1",
            "12.0",
            "2.5",
            "1.0",
            "0",
            "0.7",
            "0.2",
            "0.1",
            "2",
        ],
    ]


@pytest.mark.parametrize(
    ("value", "cell"),
    [
        (None, ""),
        (True, "true"),
        (0.1, "0.1"),
        (float("nan"), ""),
        (3, "3"),
        ("a,b", "a,b"),
        ({"k": [1]}, '{"k":[1]}'),
    ],
    ids=["none", "bool", "float", "nan", "int", "text", "object"],
)
def test_csv_cells(value: Any, cell: str) -> None:
    assert export.csv_cell(value) == cell


def test_parquet_is_typed_and_reads_back() -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    many = [REQUEST] + [
        Captured(
            1764252001.0 + i, "dev-2", "lab", 3, f"q{i}", {"input": [[1.0, 2.0, 3.0]]}, {"label": [2]}, None
        )
        for i in range(export.CHUNK_LINES)
    ]
    data = b"".join(export.parquet_stream(columns.layout(manifest()), many))
    table = pq.read_table(io.BytesIO(data))
    assert table.num_rows == 2 + export.CHUNK_LINES
    assert table.schema.field("ts").type == pa.timestamp("ms", tz="UTC")
    assert table.schema.field("alcohol").type == pa.float64()
    assert table.schema.field("predicted").type == pa.int64()
    assert table.schema.field("label").type == pa.string()
    first = table.slice(0, 3).to_pylist()
    assert [r["row"] for r in first] == [0, 1, 0]
    assert [r["ash"] for r in first] == [None, 2.5, 2.0]
    assert [r["label"] for r in first] == ["1", "2", None]
    assert [r["probability_1"] for r in first] == [0.8, 0.2, None]
