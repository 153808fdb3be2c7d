"""Hardware variants: the manifest keys, the assignment's variants list and the device's pick."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import pytest

from agent.errors import AssignmentError, PackageError
from agent.package.manifest import Manifest, ModelFile, TensorSpec, Variant, VariantFile, parse_manifest
from agent.runtime.hardware import meets
from agent.update.canary import AssignedVersion, Assignment, choose, pick_variant
from agent.update.lifecycle import VersionRef


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


INT8 = VariantFile("int8", ("cpu:vnni",), "manifest.int8.json", sha("m8"), "model.int8.onnx", sha("int8"))
INT8_ARM = VariantFile(
    "int8-arm",
    ("arch:aarch64", "cpu:dotprod"),
    "manifest.int8-arm.json",
    sha("ma"),
    "model.int8-arm.onnx",
    sha("a"),
)
GENERIC = Manifest(
    name="wine",
    version=2,
    model=ModelFile("model.onnx", sha("fp32"), 10),
    inputs=(TensorSpec("x", "FP32", (-1, 4)),),
    outputs=(TensorSpec("y", "FP32", (-1, 1)),),
    variant=Variant("fp32"),
    variants=(INT8, INT8_ARM),
)


def test_manifest_variants_round_trip() -> None:
    doc = GENERIC.to_json()
    assert doc["variant"] == {"name": "fp32", "requires": []}
    assert doc["variants"][0]["requires"] == ["cpu:vnni"]
    assert parse_manifest(doc) == GENERIC


def test_a_manifest_without_variants_has_no_variant_keys() -> None:
    plain = dataclasses.replace(GENERIC, variant=None, variants=())
    doc = plain.to_json()
    assert "variant" not in doc and "variants" not in doc
    assert parse_manifest(doc) == plain


def _mutated(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    doc = GENERIC.to_json()
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return doc


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        pytest.param(("variant",), "fp32", "variant must be an object", id="variant-not-object"),
        pytest.param(("variant", "name"), "FP32!", "variant.name", id="variant-bad-name"),
        pytest.param(("variant", "requires"), ["vnni"], "variant.requires", id="tag-without-kind"),
        pytest.param(("variants",), {}, "variants must be a list", id="variants-not-list"),
        pytest.param(
            ("variants", 0, "manifest"), "manifest.json", "variants[0].manifest", id="generic-manifest"
        ),
        pytest.param(("variants", 0, "model"), "model.onnx", "variants[0].model", id="generic-model"),
        pytest.param(("variants", 1, "model"), "model.int8.onnx", "variants[1].model", id="same-file-twice"),
        pytest.param(("variants", 0, "model"), "../x.onnx", "variants[0].model", id="path"),
        pytest.param(("variants", 0, "sha256"), "AB" * 32, "variants[0].sha256", id="bad-hash"),
        pytest.param(("variants", 1, "name"), "int8", "listed twice", id="duplicate-name"),
        pytest.param(("variants", 0, "requires"), "cpu:vnni", "variants[0].requires", id="requires-not-list"),
    ],
)
def test_bad_variant_keys_are_refused(path: tuple[Any, ...], value: Any, message: str) -> None:
    with pytest.raises(PackageError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_manifest(_mutated(path, value))


def test_a_variant_manifest_names_its_requirements() -> None:
    doc = dataclasses.replace(GENERIC, variants=()).to_json()
    doc["variant"] = {"name": "int8", "requires": ["cpu:vnni"]}
    assert parse_manifest(doc).variant == Variant("int8", ("cpu:vnni",))


def _version_doc(version: int, variants: list[dict[str, Any]] | None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "version": version,
        "manifest": f"models/wine/{version}/manifest.json",
        "model": f"models/wine/{version}/model.onnx",
        "sha256": sha(f"fp32-{version}"),
        "manifest_sha256": sha(f"m-{version}"),
    }
    if variants is not None:
        doc["variant"] = "fp32"
        doc["variants"] = variants
    return doc


def _variant_doc(version: int, name: str, requires: list[str]) -> dict[str, Any]:
    return {
        "name": name,
        "requires": requires,
        "manifest": f"models/wine/{version}/manifest.{name}.json",
        "model": f"models/wine/{version}/model.{name}.onnx",
        "sha256": sha(f"{name}-{version}"),
        "manifest_sha256": sha(f"m-{name}-{version}"),
    }


def assignment(variants: bool = True, candidate: bool = False, percent: int = 0) -> dict[str, Any]:
    def listed(v: int) -> list[dict[str, Any]] | None:
        if not variants:
            return None
        return [
            _variant_doc(v, "int8", ["cpu:vnni"]),
            _variant_doc(v, "int8-arm", ["arch:aarch64", "cpu:dotprod"]),
        ]

    return {
        "format": "outpost-assignment/1",
        "group": "lab",
        "model": "wine",
        "serial": 4,
        "stable": _version_doc(2, listed(2)),
        "candidate": _version_doc(3, listed(3)) if candidate else None,
        "percent": percent,
        "salt": "s",
        "created": "2026-11-27T00:00:00Z",
    }


@pytest.mark.parametrize(
    ("tags", "variant", "model"),
    [
        pytest.param(
            {"arch:x86_64", "cpu:avx2", "cpu:vnni", "ep:cpu"}, "int8", "model.int8.onnx", id="x86-vnni"
        ),
        pytest.param({"arch:x86_64", "cpu:avx2", "ep:cpu"}, "fp32", "model.onnx", id="x86-no-vnni-generic"),
        pytest.param(
            {"arch:aarch64", "cpu:dotprod", "ep:cpu"}, "int8-arm", "model.int8-arm.onnx", id="arm-dotprod"
        ),
        pytest.param({"arch:aarch64", "ep:cpu"}, "fp32", "model.onnx", id="arm-plain-generic"),
        pytest.param(
            {"arch:aarch64", "cpu:dotprod", "cpu:vnni"}, "int8", "model.int8.onnx", id="first-that-fits-wins"
        ),
        pytest.param(None, "fp32", "model.onnx", id="no-hardware-known"),
    ],
)
def test_the_device_picks_the_first_variant_that_fits(
    tags: set[str] | None, variant: str, model: str
) -> None:
    a = Assignment.parse(assignment())
    choice = choose(a, "dev-1", frozenset(tags) if tags is not None else None)
    assert choice.version.variant == variant
    assert choice.version.model == f"models/wine/2/{model}"
    assert choice.version.variants == ()
    expected = sha("fp32-2") if variant == "fp32" else sha(f"{variant}-2")
    assert choice.ref.sha256 == expected


def test_the_candidate_and_an_experiments_arm_are_picked_too() -> None:
    tags = frozenset({"cpu:vnni"})
    a = Assignment.parse(assignment(candidate=True, percent=100))
    assert choose(a, "dev-1", tags).version.model == "models/wine/3/model.int8.onnx"
    doc = assignment(candidate=True, percent=100)
    doc["experiment"] = {"mode": "shadow", "sample": 10}
    choice = choose(Assignment.parse(doc), "dev-1", tags)
    assert choice.version.model == "models/wine/2/model.int8.onnx"
    assert choice.arm is not None and choice.arm.model == "models/wine/3/model.int8.onnx"


def test_an_assignment_without_variants_is_read_as_before() -> None:
    a = Assignment.parse(assignment(variants=False))
    assert a.stable.variants == () and a.stable.variant == ""
    assert choose(a, "dev-1", frozenset({"cpu:vnni"})).version == a.stable


def test_an_older_agent_reads_only_the_generic_keys() -> None:
    """What an agent without variants uses: stable.model and stable.sha256 are the generic files."""
    doc = assignment()
    assert doc["stable"]["model"] == "models/wine/2/model.onnx"
    assert Assignment.parse(doc).stable.sha256 == sha("fp32-2")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        pytest.param("variants", {}, "stable.variants must be a list", id="not-list"),
        pytest.param("variant", 3, "stable.variant must be a string", id="variant-name"),
    ],
)
def test_malformed_version_variant_keys_are_refused(key: str, value: Any, message: str) -> None:
    doc = assignment()
    doc["stable"][key] = value
    with pytest.raises(AssignmentError, match=message):
        Assignment.parse(doc)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        pytest.param(
            "model", "models/wine/3/model.int8.onnx", "not a file under models/wine/2/", id="other-version"
        ),
        pytest.param("model", "models/other/2/m.onnx", "not a file under", id="other-model"),
        pytest.param("sha256", "xyz", "64 lowercase hex", id="bad-hash"),
        pytest.param("requires", "cpu:vnni", "requires must be a list", id="requires"),
        pytest.param("name", None, "name must be a string", id="name"),
    ],
)
def test_malformed_variants_are_refused(key: str, value: Any, message: str) -> None:
    doc = assignment()
    doc["stable"]["variants"][0][key] = value
    with pytest.raises(AssignmentError, match=message):
        Assignment.parse(doc)


def test_pick_variant_keeps_the_version() -> None:
    a = Assignment.parse(assignment())
    picked = pick_variant(a.stable, frozenset({"cpu:vnni"}))
    assert isinstance(picked, AssignedVersion)
    assert (picked.version, picked.variant, picked.manifest) == (
        2,
        "int8",
        "models/wine/2/manifest.int8.json",
    )


@pytest.mark.parametrize(
    ("tags", "requires", "met"),
    [
        pytest.param({"cpu:vnni"}, [], True, id="nothing-required"),
        pytest.param({"cpu:vnni"}, ["cpu:vnni|cpu:dotprod"], True, id="first-alternative"),
        pytest.param({"cpu:dotprod"}, ["cpu:vnni|cpu:dotprod"], True, id="second-alternative"),
        pytest.param({"cpu:avx2"}, ["cpu:vnni|cpu:dotprod"], False, id="no-alternative"),
        pytest.param({"cpu:vnni"}, ["cpu:vnni|cpu:dotprod", "ep:cuda"], False, id="all-requirements"),
    ],
)
def test_requirements_with_alternatives(tags: set[str], requires: list[str], met: bool) -> None:
    assert meets(tags, requires) is met
    doc = dataclasses.replace(GENERIC, variants=()).to_json()
    doc["variant"] = {"name": "int8", "requires": requires}
    assert parse_manifest(doc).variant == Variant("int8", tuple(requires))


def test_a_requirement_must_be_tags() -> None:
    doc = dataclasses.replace(GENERIC, variants=()).to_json()
    for bad in (["cpu:vnni|"], ["|cpu:vnni"], ["cpu:vnni||cpu:x"], ["CPU:VNNI"]):
        doc["variant"] = {"name": "int8", "requires": bad}
        with pytest.raises(PackageError, match="requires"):
            parse_manifest(doc)


def test_a_device_keeps_the_variant_it_runs_of_a_version() -> None:
    """Tags that change (a new provider, a corrected hardware_tags) do not swap the variant of a
    version installed already (versions are immutable on disk); the next version is picked afresh."""
    a = Assignment.parse(assignment(candidate=True, percent=100))
    runs_int8 = VersionRef("wine", 3, sha("int8-3"))
    choice = choose(a, "dev-1", frozenset({"arch:x86_64"}), keep=runs_int8)
    assert (choice.version.version, choice.version.variant) == (3, "int8")
    assert choice.ref == runs_int8
    runs_generic = VersionRef("wine", 3, sha("fp32-3"))
    assert choose(a, "dev-1", frozenset({"cpu:vnni"}), keep=runs_generic).version.variant == "fp32"
    # An older version kept says nothing about the candidate: it is picked by the tags.
    older = VersionRef("wine", 2, sha("int8-2"))
    assert choose(a, "dev-1", frozenset({"arch:x86_64"}), keep=older).version.variant == "fp32"
    # A hash that is none of the version's variants: picked by the tags.
    other = VersionRef("wine", 3, sha("something else"))
    assert choose(a, "dev-1", frozenset({"cpu:vnni"}), keep=other).version.variant == "int8"
