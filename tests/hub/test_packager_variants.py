"""`outpost package --variants`: one version as int8 and fp32 variants, with real onnxruntime."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from agent.package.manifest import Manifest, Variant, parse_manifest
from agent.package.store import verify_package_dir
from examples.train_example import NAME, TARGET, build_example
from hub.errors import PackagingError
from hub.operator_cli import main
from hub.packager.variants import parse_variants


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_example(tmp_path_factory.mktemp("example")).parent


def package(example: Path, out: Path, *extra: str) -> list[str]:
    return [
        "package", str(example / f"{NAME}.joblib"), "--sample", str(example / f"{NAME}-sample.csv"),
        "--target", TARGET, "--name", NAME, "--version", "5", "--out", str(out), *extra,
    ]  # fmt: skip


def read(path: Path) -> Manifest:
    return parse_manifest(json.loads(path.read_text()))


def reproduces(directory: Path, manifest: Manifest) -> None:
    assert manifest.self_test is not None
    session = ort.InferenceSession(str(directory / manifest.model.file), providers=["CPUExecutionProvider"])
    feeds = {t.name: np.array(t.data, dtype=np.float32).reshape(t.shape) for t in manifest.self_test.inputs}
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))
    for t in manifest.self_test.outputs:
        want = np.array(t.data).reshape(t.shape)
        assert np.allclose(got[t.name], want, atol=manifest.self_test.atol, rtol=manifest.self_test.rtol)


def test_int8_and_fp32_variants_side_by_side(
    example: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(package(example, tmp_path, "--variants", "int8,fp32")) == 0
    printed = capsys.readouterr().out
    assert "as 2 variant(s)" in printed
    assert "latency us/row" in printed
    rows = {line.split()[0]: line for line in printed.splitlines() if line.startswith(("  fp32", "  int8"))}
    assert "(generic)" in rows["fp32"] and "model.onnx" in rows["fp32"]
    assert "cpu:vnni|cpu:dotprod" in rows["int8"] and "model.int8.onnx" in rows["int8"]

    directory = tmp_path / f"{NAME}-5"
    generic = verify_package_dir(directory)  # the generic package is an ordinary package
    assert generic.variant == Variant("fp32")
    assert generic.quantization["kept"] == "fp32"
    (int8,) = generic.variants
    assert (int8.name, int8.requires) == ("int8", ("cpu:vnni|cpu:dotprod",))
    variant = read(directory / int8.manifest)
    assert variant.variant == Variant("int8", ("cpu:vnni|cpu:dotprod",))
    assert variant.model.file == int8.model and variant.model.sha256 == int8.sha256
    assert variant.quantization["kept"] == "int8"
    assert variant.inputs == generic.inputs and variant.outputs == generic.outputs
    reproduces(directory, generic)
    reproduces(directory, variant)
    with tarfile.open(tmp_path / f"{NAME}-5.tar") as tar:
        assert tar.getnames() == ["manifest.json", "model.onnx", "manifest.int8.json", "model.int8.onnx"]


def test_without_quantization_only_the_generic_variant_is_made(
    example: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(package(example, tmp_path, "--variants", "int8,fp32", "--no-quantize")) == 0
    printed = capsys.readouterr().out
    assert "int8     not included: quantization turned off" in printed
    assert read(tmp_path / f"{NAME}-5" / "manifest.json").variants == ()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("int8", "fp32 must be one of them", id="no-generic"),
        pytest.param("int8,fp32,int8", "named twice", id="twice"),
        pytest.param("int4,fp32", "'int4' is not one of int8, fp16, fp32", id="unknown"),
    ],
)
def test_bad_variant_lists_are_refused(text: str, message: str) -> None:
    with pytest.raises(PackagingError, match=message):
        parse_variants(text)
    assert parse_variants(" int8 , fp32 ") == ("int8", "fp32")


def test_an_fp16_variant_for_gpus(example: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Converted by onnxruntime's float16 tool, inputs and outputs kept fp32; measured on this CPU."""
    assert main(package(example, tmp_path, "--variants", "int8,fp16,fp32")) == 0
    printed = capsys.readouterr().out
    assert "as 3 variant(s)" in printed and "model.fp16.onnx" in printed
    directory = tmp_path / f"{NAME}-5"
    generic = read(directory / "manifest.json")
    assert [v.name for v in generic.variants] == ["int8", "fp16"]
    fp16 = read(directory / generic.variants[1].manifest)
    assert fp16.variant is not None and "ep:cuda" in fp16.variant.requires[0].split("|")
    assert fp16.inputs == generic.inputs  # the same requests work on every variant
    reproduces(directory, fp16)
