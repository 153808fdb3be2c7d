"""`outpost package` and the example, with real scikit-learn, skl2onnx and onnxruntime."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from agent.package.manifest import Manifest, Tensor, parse_manifest
from agent.package.store import Store, verify_package_dir
from examples.train_example import NAME, TARGET, VERSION, build_example
from hub.errors import PackagingError
from hub.operator_cli import main
from hub.packager import PackageOptions, build_package
from hub.packager.convert import to_onnx
from hub.packager.estimator import inspect_estimator
from hub.packager.evaluate import Evaluation, decide, encode_classes, evaluate
from hub.packager.profile import bin_counts, bin_edges, reference_profile
from hub.packager.quantize import quantize_int8
from hub.packager.sample import load_sample, parse_csv

# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_example(tmp_path_factory.mktemp("example"))


@pytest.fixture(scope="module")
def manifest(example: Path) -> Manifest:
    return parse_manifest(json.loads((example / "manifest.json").read_text()))


def session(model: Path | bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    source = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def array(t: Tensor) -> np.ndarray:
    dtype = {"FP32": np.float32, "INT64": np.int64}[t.datatype]
    return np.asarray(t.data, dtype=dtype).reshape(t.shape)


def sample_rows(example: Path) -> np.ndarray:
    return load_sample(example.parent / f"{NAME}-sample.csv", TARGET).x


# -- the example package --------------------------------------------------------------------


def test_example_package_round_trips(example: Path, manifest: Manifest, tmp_path: Path) -> None:
    assert example.name == f"{NAME}-{VERSION}"
    assert verify_package_dir(example) == manifest
    assert manifest.task == "classification"
    assert manifest.labels == ("0", "1", "2")
    assert manifest.features[0] == "alcohol" and len(manifest.features) == 13
    assert [(s.name, s.datatype, s.shape) for s in manifest.inputs] == [("input", "FP32", (-1, 13))]
    assert [(s.name, s.datatype, s.shape) for s in manifest.outputs] == [
        ("label", "INT64", (-1,)),
        ("probabilities", "FP32", (-1, 3)),
    ]
    installed = Store(tmp_path).install(example.parent / f"{NAME}-{VERSION}.tar")
    assert installed.manifest.model.sha256 == manifest.model.sha256


def test_example_keeps_int8_within_tolerance(example: Path, manifest: Manifest) -> None:
    q = manifest.quantization
    assert q["method"] == "static-qdq-s8s8"
    assert q["kept"] == "int8", q["reason"]
    assert q["accuracy_int8"] >= q["accuracy_fp32"] - q["tolerance"]
    assert q["accuracy_fp32"] > 0.85
    assert q["latency_fp32_us"] > 0 and q["latency_int8_us"] > 0
    ops = {n.op_type for n in onnx.load(example / manifest.model.file).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def test_int8_outputs_agree_with_fp32(example: Path, manifest: Manifest) -> None:
    model = joblib.load(example.parent / f"{NAME}.joblib")
    x = sample_rows(example)
    fp32_model = to_onnx(model, inspect_estimator(model, "example"), x.shape[1])
    outcome = quantize_int8(fp32_model, x)
    assert outcome.model is not None, outcome.reason
    fp32 = session(fp32_model).run(None, {"input": x})
    int8 = session(outcome.model).run(None, {"input": x})
    tolerance = manifest.quantization["tolerance"]
    assert np.mean(fp32[0] == int8[0]) >= 1 - tolerance
    assert np.max(np.abs(fp32[1] - int8[1])) < 0.05


def test_self_test_vectors_reproduce(example: Path, manifest: Manifest) -> None:
    test = manifest.self_test
    assert test is not None
    assert test.inputs[0].shape == (8, 13)
    got = session(example / "model.onnx").run(None, {"input": array(test.inputs[0])})
    for want, have in zip(test.outputs, got, strict=True):
        if want.datatype == "FP32":
            np.testing.assert_allclose(have, array(want), atol=test.atol, rtol=test.rtol)
        else:
            np.testing.assert_array_equal(have, array(want))


def test_int8_rows_one_by_one_equal_one_batch(example: Path, manifest: Manifest) -> None:
    assert manifest.quantization["kept"] == "int8"
    s = session(example / "model.onnx")
    x = sample_rows(example)
    batch = s.run(None, {"input": x})
    singles = [s.run(None, {"input": x[i : i + 1]}) for i in range(len(x))]
    for k, whole in enumerate(batch):
        one_by_one = np.concatenate([single[k] for single in singles])
        assert one_by_one.dtype == whole.dtype
        assert one_by_one.tobytes() == whole.tobytes()


def test_example_profile_counts_sum_to_n(manifest: Manifest) -> None:
    profile = manifest.reference_profile
    n = profile["n"]
    assert n == 72
    for feature in profile["features"]:
        assert sum(feature["counts"]) + feature["missing"] == n
        assert len(feature["counts"]) == len(feature["bin_edges"]) - 1
        assert len(feature["bin_edges"]) <= 11
    prediction = profile["prediction"]
    assert prediction["labels"] == list(manifest.labels)
    assert sum(prediction["counts"]) == n


def test_cli_reports_the_package(example: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = example.parent
    code = main([
        "package", str(out / f"{NAME}.joblib"), "--sample", str(out / f"{NAME}-sample.csv"),
        "--target", TARGET, "--name", NAME, "--version", "2", "--out", str(out),
    ])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "fp32  accuracy" in printed.out and "int8  accuracy" in printed.out
    assert "us/row" in printed.out
    assert "kept  int8" in printed.out
    assert f"{out / f'{NAME}-2'}/" in printed.out and f"{out / f'{NAME}-2.tar'}" in printed.out
    verify_package_dir(out / f"{NAME}-2")


# -- other models ---------------------------------------------------------------------------


def test_regressor_packages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sklearn.datasets import make_regression
    from sklearn.neural_network import MLPRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = make_regression(n_samples=300, n_features=6, noise=5.0, random_state=0)
    model = make_pipeline(
        StandardScaler(),
        MLPRegressor(hidden_layer_sizes=(16,), solver="lbfgs", max_iter=2000, random_state=0),
    ).fit(x, y)
    joblib.dump(model, tmp_path / "reg.joblib")
    np.save(tmp_path / "x.npy", x[:200])
    np.save(tmp_path / "y.npy", y[:200])
    code = main([
        "package", str(tmp_path / "reg.joblib"), "--sample", str(tmp_path / "x.npy"),
        "--labels", str(tmp_path / "y.npy"), "--name", "reg", "--version", "3",
        "--out", str(tmp_path / "out"), "--tolerance", "0.02",
    ])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "R²" in printed.out and "MAE" in printed.out
    m = verify_package_dir(tmp_path / "out" / "reg-3")
    assert m.task == "regression" and m.labels == ()
    assert m.features == ("f0", "f1", "f2", "f3", "f4", "f5")
    [out] = m.outputs
    assert out.name == "prediction" and out.datatype == "FP32" and out.shape in ((-1,), (-1, 1))
    q = m.quantization
    assert q["metric"] == "r2" and q["accuracy_fp32"] > 0.9
    assert q["mae_fp32"] is not None
    prediction = m.reference_profile["prediction"]
    assert prediction["kind"] == "regression"
    assert sum(prediction["counts"]) + prediction["missing"] == 200


@pytest.mark.parametrize(
    ("extra_args", "method", "reason"),
    [
        pytest.param([], "static-qdq-s8s8", "nothing to quantize", id="linear-model-has-no-matmul"),
        pytest.param(["--no-quantize"], "none", "turned off", id="no-quantize"),
    ],
)
def test_fp32_is_kept_with_a_reason(
    tmp_path: Path, extra_args: list[str], method: str, reason: str
) -> None:
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    x, y = load_iris(return_X_y=True)
    joblib.dump(LogisticRegression(max_iter=1000).fit(x, y), tmp_path / "lr.joblib")
    np.save(tmp_path / "x.npy", x)
    code = main([
        "package", str(tmp_path / "lr.joblib"), "--sample", str(tmp_path / "x.npy"),
        "--name", "iris", "--version", "1", "--out", str(tmp_path), *extra_args,
    ])
    assert code == 0
    q = verify_package_dir(tmp_path / "iris-1").quantization
    assert (q["kept"], q["method"], q["accuracy_int8"]) == ("fp32", method, None)
    assert reason in q["reason"]
    # Without labels the score is agreement with scikit-learn's own predictions.
    assert q["reference"] == "sklearn" and q["accuracy_fp32"] == 1.0


def test_string_classes_give_a_bytes_label(tmp_path: Path) -> None:
    from sklearn.datasets import load_iris
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    iris = load_iris()
    species = iris.target_names[iris.target]
    model = make_pipeline(
        StandardScaler(),
        MLPClassifier(hidden_layer_sizes=(8,), solver="lbfgs", max_iter=3000, random_state=0),
    ).fit(iris.data, species)
    joblib.dump(model, tmp_path / "iris.joblib")
    rows = ["sl,sw,pl,pw,species"] + [
        ",".join([*map(str, r), s]) for r, s in zip(iris.data.tolist(), species, strict=True)
    ]
    (tmp_path / "iris.csv").write_text("\n".join(rows) + "\n")
    code = main([
        "package", str(tmp_path / "iris.joblib"), "--sample", str(tmp_path / "iris.csv"),
        "--target", "species", "--name", "iris", "--version", "1", "--out", str(tmp_path),
    ])
    assert code == 0
    m = verify_package_dir(tmp_path / "iris-1")
    assert m.labels == ("setosa", "versicolor", "virginica")
    assert m.features == ("sl", "sw", "pl", "pw")
    assert (m.outputs[0].name, m.outputs[0].datatype) == ("label", "BYTES")
    assert m.quantization["reference"] == "labels" and m.quantization["accuracy_fp32"] > 0.9
    assert m.reference_profile["prediction"]["labels"] == list(m.labels)
    test = m.self_test
    assert test is not None
    got = session(tmp_path / "iris-1" / "model.onnx").run(None, {"input": array(test.inputs[0])})
    assert [str(v) for v in got[0]] == test.outputs[0].data


def test_a_failing_quantizer_falls_back_to_fp32(
    example: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnxruntime.quantization

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("calibration exploded\nsecond line")

    monkeypatch.setattr(onnxruntime.quantization, "quantize_static", broken)
    report = build_package(
        example.parent / f"{NAME}.joblib",
        example.parent / f"{NAME}-sample.csv",
        PackageOptions(name=NAME, version=1, out_dir=tmp_path, target=TARGET),
    )
    q = verify_package_dir(report.directory).quantization
    assert (q["kept"], q["accuracy_int8"], q["latency_int8_us"]) == ("fp32", None, None)
    assert q["reason"] == "quantization failed: RuntimeError: calibration exploded"
    assert report.manifest.self_test is not None and report.manifest.self_test.atol == 1e-4


# -- bad input: exit 2, one clear line, no traceback ----------------------------------------


@pytest.fixture(scope="module")
def bad(example: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sklearn.cluster import KMeans
    from sklearn.kernel_ridge import KernelRidge
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    d = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 13))
    joblib.dump({"not": "a model"}, d / "dict.joblib")
    joblib.dump(make_pipeline(StandardScaler(), MLPClassifier()), d / "unfitted.joblib")
    joblib.dump(KMeans(n_clusters=2, n_init=1, random_state=0).fit(x), d / "kmeans.joblib")
    joblib.dump(KernelRidge().fit(x, x[:, 0]), d / "kernelridge.joblib")
    (d / "garbage.joblib").write_bytes(b"not a pickle")
    (d / "five-columns.csv").write_text("a,b,c,d,e\n1,2,3,4,5\n")
    (d / "words.csv").write_text("1,2,3,4,5,6,7,8,9,10,11,12,13\n" + "1," * 12 + "lots\n")
    (d / "empty.csv").write_text("")
    (d / "header-only.csv").write_text(",".join(f"c{i}" for i in range(13)) + "\n")
    (d / "ragged.csv").write_text("1,2,3\n4,5\n")
    (d / "bad-class.csv").write_text(
        ",".join([*(f"c{i}" for i in range(13)), "class"]) + "\n" + "1," * 13 + "7\n"
    )
    np.save(d / "flat.npy", np.arange(13.0))
    np.save(d / "x.npy", x)
    np.save(d / "short-labels.npy", np.zeros(3))
    d.joinpath("model").symlink_to(example.parent / f"{NAME}.joblib")
    d.joinpath("sample").symlink_to(example.parent / f"{NAME}-sample.csv")
    return d


def package_args(d: Path, model: str, sample: str, *extra: str) -> list[str]:
    return [
        "package", str(d / model), "--sample", str(d / sample), "--name", "m", "--version", "1",
        "--out", str(d / "out"), *extra,
    ]


def run_failing(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI expecting exit 2 with exactly one `outpost: error:` line; return that line."""
    code = main(args)
    printed = capsys.readouterr()
    errors = [line for line in printed.err.splitlines() if line.startswith("outpost: error:")]
    assert code == 2, printed
    assert len(errors) == 1, printed.err
    assert "Traceback" not in printed.err
    assert printed.out == ""
    return errors[0]


# (model file, sample file, extra arguments, what the error line must say)
BAD_INPUTS = [
    pytest.param("missing.joblib", "sample", [], "no such model file", id="missing-model"),
    pytest.param("garbage.joblib", "sample", [], "cannot load the model", id="not-a-pickle"),
    pytest.param("dict.joblib", "sample", [], "not a scikit-learn estimator", id="not-a-model"),
    pytest.param("unfitted.joblib", "sample", [], "is not fitted", id="unfitted"),
    pytest.param("kmeans.joblib", "x.npy", [], "unsupported estimator KMeans", id="clusterer"),
    pytest.param(
        "kernelridge.joblib", "x.npy", [], "unsupported estimator KernelRidge: skl2onnx has no",
        id="no-onnx-converter",
    ),
    pytest.param("model", "missing.csv", [], "no such sample file", id="missing-sample"),
    pytest.param(
        "model", "five-columns.csv", [], "5 feature columns, but the model takes 13",
        id="wrong-column-count",
    ),
    pytest.param(
        "model", "sample", [], "takes 13; if one column is the true label or value, name it",
        id="target-column-not-named",
    ),
    pytest.param("model", "words.csv", [], "'lots' is not a number", id="non-numeric-csv"),
    pytest.param("model", "empty.csv", [], "the sample is empty", id="empty-sample"),
    pytest.param("model", "header-only.csv", [], "no data rows", id="header-only"),
    pytest.param("model", "ragged.csv", [], "line 2: 2 cells", id="ragged-csv"),
    pytest.param("model", "flat.npy", [], "must be a 2-D array", id="1-d-npy"),
    pytest.param("model", "sample", ["--target", "nope"], "no column 'nope'", id="unknown-column"),
    pytest.param(
        "model", "bad-class.csv", ["--target", "class"], "'7' is not one of the model's classes",
        id="unknown-class",
    ),
    pytest.param(
        "model", "x.npy", ["--labels", "short-labels.npy"],
        "40 sample rows but the targets have shape [3]", id="labels-length",
    ),
    pytest.param(
        "model", "x.npy", ["--target", "class"], "for a .npy sample give --labels",
        id="target-with-npy",
    ),
    pytest.param("model", "sample", ["--name", "Not OK"], "--name 'Not OK'", id="bad-name"),
]


@pytest.mark.parametrize(("model", "sample", "extra", "message"), BAD_INPUTS)
def test_cli_rejects_bad_input(
    bad: Path, model: str, sample: str, extra: list[str], message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    extra = [str(bad / a) if a.endswith(".npy") else a for a in extra]
    assert message in run_failing(package_args(bad, model, sample, *extra), capsys)


@pytest.mark.parametrize(
    ("drop", "extra", "message"),
    [
        pytest.param("--out", [], "the following arguments are required: --out", id="missing-out"),
        pytest.param(None, ["--version", "0"], "0 is not a positive integer", id="version-0"),
        pytest.param(None, ["--tolerance", "2"], "2.0 is not between 0 and 1", id="tolerance"),
        pytest.param(None, ["--target", "a", "--labels", "y.npy"], "not allowed with",
                     id="target-and-labels"),
    ],
)
def test_cli_rejects_bad_usage(
    bad: Path, drop: str | None, extra: list[str], message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = package_args(bad, "model", "sample", *extra)
    if drop is not None:
        at = args.index(drop)
        del args[at : at + 2]
    assert message in run_failing(args, capsys)


def test_cli_refuses_to_overwrite_a_version(
    example: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = example.parent
    args = [
        "package", str(out / f"{NAME}.joblib"), "--sample", str(out / f"{NAME}-sample.csv"),
        "--target", TARGET, "--name", NAME, "--version", str(VERSION), "--out", str(out),
    ]
    assert "already exists" in run_failing(args, capsys)
    verify_package_dir(example)


# -- pure parts -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "target", "x", "features", "y"),
    [
        pytest.param("1,2\n3,4\n", None, [[1, 2], [3, 4]], None, None, id="no-header"),
        pytest.param("a,b\n1,2\n", None, [[1, 2]], ("a", "b"), None, id="header"),
        pytest.param("a,b,t\n1,2,x\n\n3,,y\n", "t", [[1, 2], [3, math.nan]], ("a", "b"), ["x", "y"],
                     id="target-blank-line-missing-cell"),
        pytest.param("t,a\n0,nan\n", "t", [[math.nan]], ("a",), ["0"], id="target-first-nan"),
    ],
)
def test_parse_csv(
    text: str, target: str | None, x: list[list[float]], features: tuple[str, ...] | None,
    y: list[str] | None,
) -> None:
    sample = parse_csv(text, "s.csv", target)
    np.testing.assert_array_equal(sample.x, np.asarray(x, dtype=np.float32))
    assert sample.x.dtype == np.float32
    assert sample.features == features
    assert (sample.y.tolist() if sample.y is not None else None) == y


@pytest.mark.parametrize(
    ("values", "classes", "expected"),
    [
        pytest.param(["1", "0", "1.0"], (0, 1), [1, 0, 1], id="numeric-text"),
        pytest.param(np.array([2, 0]), (0, 1, 2), [2, 0], id="ints"),
        pytest.param(["b", "a"], ("a", "b"), [1, 0], id="strings"),
    ],
)
def test_encode_classes(values: Any, classes: tuple[Any, ...], expected: list[int]) -> None:
    assert encode_classes(np.asarray(values), classes, "target").tolist() == expected


def test_encode_classes_rejects_an_unknown_class() -> None:
    with pytest.raises(PackagingError, match="'c' is not one of the model's classes"):
        encode_classes(np.asarray(["a", "c"]), ("a", "b"), "target")


@pytest.mark.parametrize(
    ("fp32", "int8", "kept"),
    [
        pytest.param(0.95, 0.95, "int8", id="equal"),
        pytest.param(0.95, 0.94, "int8", id="at-tolerance"),
        pytest.param(0.95, 0.93, "fp32", id="beyond-tolerance"),
        pytest.param(0.95, None, "fp32", id="no-int8"),
    ],
)
def test_decide(fp32: float, int8: float | None, kept: str) -> None:
    ev = lambda a: Evaluation(accuracy=a, mae=None, latency_us=1.0)  # noqa: E731
    decision = decide(ev(fp32), ev(int8) if int8 is not None else None, 0.01, "why")
    assert decision.kept == kept


class FakeRunner:
    """Stands in for onnxruntime: fixed outputs, fixed latency."""

    def __init__(self, outputs: dict[str, np.ndarray]) -> None:
        self.outputs = outputs

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return self.outputs

    def median_latency_us(self, x: np.ndarray) -> float:
        return 7.0


@pytest.mark.parametrize(
    ("task", "outputs", "truth", "score", "mae"),
    [
        pytest.param("classification", {"label": np.array(["b", "a", "b", "b"])},
                     np.array([1, 0, 0, 1]), 0.75, None, id="accuracy"),
        pytest.param("regression", {"prediction": np.array([[1.0], [2.0], [4.0]], np.float32)},
                     np.array([1.0, 2.0, 3.0]), 1 - 1 / 2, 1 / 3, id="r2-and-mae"),
        pytest.param("regression", {"prediction": np.array([5.0, 5.0], np.float32)},
                     np.array([5.0, 5.0]), 1.0, 0.0, id="constant-reference"),
    ],
)
def test_evaluate(
    task: str, outputs: dict[str, np.ndarray], truth: np.ndarray, score: float, mae: float | None
) -> None:
    x = np.zeros((len(truth), 2), np.float32)
    result = evaluate(FakeRunner(outputs), x, truth, task, ("a", "b"))
    assert result.accuracy == pytest.approx(score)
    assert result.mae == (pytest.approx(mae) if mae is not None else None)
    assert result.latency_us == 7.0


@pytest.mark.parametrize(
    ("values", "edges", "counts", "missing"),
    [
        pytest.param([3.0, 3.0, 3.0], [3.0, 3.0], [3], 0, id="constant"),
        pytest.param([math.nan, math.nan], [], [], 2, id="all-missing"),
        pytest.param([0.0, 1.0, math.nan], [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0],
                     [1, 0, 0, 0, 0, 0, 0, 0, 0, 1], 1, id="two-values-and-missing"),
        pytest.param(list(range(10)), None, [1] * 9 + [1], 0, id="ten-distinct"),
    ],
)
def test_feature_profile(
    values: list[float], edges: list[float] | None, counts: list[int], missing: int
) -> None:
    x = np.asarray(values, dtype=np.float32)[:, None]
    prediction = {"kind": "classification", "labels": [], "counts": []}
    [feature] = reference_profile(x, ("f",), prediction)["features"]
    if edges is not None:
        np.testing.assert_allclose(feature["bin_edges"], edges)
    else:
        assert len(feature["bin_edges"]) == 11
    assert feature["counts"] == counts and feature["missing"] == missing


def test_values_outside_the_edges_count_in_the_end_bins() -> None:
    assert bin_counts([0.0, 1.0, 2.0], np.array([-5.0, 0.0, 1.0, 2.0, 9.0])) == [2, 3]


@given(
    hnp.arrays(
        np.float32,
        st.integers(1, 60),
        elements=st.one_of(st.floats(-1e6, 1e6, width=32), st.just(math.nan)),
    )
)
def test_profile_counts_always_sum_to_n(values: np.ndarray) -> None:
    edges = bin_edges(values)
    counts = bin_counts(edges, values)
    assert sum(counts) + int(np.isnan(values).sum()) == len(values)
    assert edges == sorted(edges) and len(edges) <= 11
    assert len(counts) == max(len(edges) - 1, 0)
