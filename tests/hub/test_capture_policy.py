"""Data capture in a group's deployment: the request's wording, the carry-forward rules
(same model keeps it, a named null ends it, a rollback keeps it, another model drops it) and
the signed assignment, which always carries `capture` (null when off)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from hub.errors import InvalidRequestError
from hub.registry import BlobStore, Database, Deployment, Registry
from hub.registry import deployments as rules
from hub.registry.records import Capture
from tests.support.packages import affine_package

NOW = datetime(2026, 11, 27, tzinfo=UTC)


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        (None, None),
        ({"sample_bp": 500}, Capture(500, 60)),
        ({"sample_bp": 1, "max_rows_per_min": 1}, Capture(1, 1)),
        ({"sample_bp": 10_000, "max_rows_per_min": 6000}, Capture(10_000, 6000)),
    ],
    ids=["null", "default-rate", "lowest", "highest"],
)
def test_parse_capture_accepts(doc: Any, expected: Capture | None) -> None:
    assert rules.parse_capture(doc) == expected


@pytest.mark.parametrize(
    ("doc", "says"),
    [
        ([500], "sample_bp"),
        ({}, "needs sample_bp"),
        ({"sample_bp": 0}, "from 1 to 10000"),
        ({"sample_bp": 10_001}, "from 1 to 10000"),
        ({"sample_bp": 5.0}, "integer"),
        ({"sample_bp": True}, "integer"),
        ({"sample_bp": 5, "max_rows_per_min": 0}, "from 1 to 6000"),
        ({"sample_bp": 5, "max_rows_per_min": 6001}, "from 1 to 6000"),
        ({"sample_bp": 5, "rate": 3}, "not rate"),
    ],
    ids=["list", "empty", "zero", "over", "float", "bool", "rate-zero", "rate-over", "unknown-key"],
)
def test_parse_capture_refuses(doc: Any, says: str) -> None:
    with pytest.raises(InvalidRequestError, match=says):
        rules.parse_capture(doc)


def deployment(model: str = "wine", capture: Capture | None = None) -> Deployment:
    return Deployment(1, "lab", model, 3, None, 0, "s", 2, 1, NOW, "ops", capture=capture)


ON = Capture(500, 60)
OTHER = Capture(100, 10)


@pytest.mark.parametrize(
    ("prior", "model", "asked", "expected"),
    [
        (None, "wine", rules.KEEP_CAPTURE, None),
        (None, "wine", ON, ON),
        (deployment(capture=ON), "wine", rules.KEEP_CAPTURE, ON),
        (deployment(capture=ON), "wine", OTHER, OTHER),
        (deployment(capture=ON), "wine", None, None),
        (deployment(capture=ON), "beer", rules.KEEP_CAPTURE, None),
        (deployment(capture=ON), "beer", OTHER, OTHER),
        (deployment(capture=None), "wine", rules.KEEP_CAPTURE, None),
    ],
    ids=[
        "first-unnamed",
        "first-named",
        "same-model-keeps",
        "same-model-changes",
        "named-null-ends",
        "other-model-drops",
        "other-model-named",
        "off-stays-off",
    ],
)
def test_plan_carries_capture_forward(
    prior: Deployment | None, model: str, asked: rules.CaptureChoice, expected: Capture | None
) -> None:
    plan = rules.plan_deployment(prior, model, 4, None, 0, None, make_salt=lambda: "x", capture=asked)
    assert plan.capture == expected


def test_a_rollback_keeps_capture() -> None:
    history = [deployment(capture=ON), deployment(capture=None)]
    assert rules.plan_rollback(history).capture == ON


def test_same_as_tells_a_capture_change() -> None:
    prior = deployment(capture=ON)
    plan = rules.plan_deployment(prior, "wine", 3, None, 0, "s", capture=rules.KEEP_CAPTURE)
    assert rules.same_as(prior, plan)
    assert not rules.same_as(prior, rules.plan_deployment(prior, "wine", 3, None, 0, "s", capture=OTHER))


@pytest.fixture
def registry(database_url: str, tmp_path: Path) -> Iterator[Registry]:
    db = Database(database_url)
    db.create_all()
    reg = Registry(db, BlobStore(tmp_path / "blobs"))
    for name in ("wine", "beer"):
        for version in (1, 2):
            out = affine_package(tmp_path / f"{name}-{version}", version=version, name=name)
            reg.push_version((out / "manifest.json").read_bytes(), (out / "model.onnx").read_bytes())
    yield reg
    db.dispose()


def signed_capture(reg: Registry, d: Deployment) -> Any:
    return json.loads(reg.assignment_document(d))["capture"]


def test_the_registry_keeps_ends_and_drops_capture(registry: Registry) -> None:
    d1 = registry.set_deployment("lab", "wine", 1)
    assert d1.capture is None and signed_capture(registry, d1) is None
    d2 = registry.set_deployment("lab", "wine", 1, capture=ON)
    assert d2.id > d1.id and registry.current_deployment("lab").capture == ON
    assert signed_capture(registry, d2) == {"sample_bp": 500, "max_rows_per_min": 60}
    assert registry.set_deployment("lab", "wine", 1, salt=d2.salt, capture=ON).id == d2.id  # a repeat
    d3 = registry.set_deployment("lab", "wine", 2)  # the next version keeps it
    assert d3.capture == ON and signed_capture(registry, d3) == ON.to_json()
    d4 = registry.rollback("lab")
    assert (d4.stable, d4.capture) == (1, ON)
    d5 = registry.set_deployment("lab", "wine", 1, capture=None)
    assert d5.capture is None and signed_capture(registry, d5) is None
    registry.set_deployment("lab", "wine", 1, capture=OTHER)
    d6 = registry.set_deployment("lab", "beer", 1)  # another model: no capture
    assert d6.capture is None and signed_capture(registry, d6) is None


def test_the_registry_refuses_a_bad_capture(registry: Registry) -> None:
    with pytest.raises(InvalidRequestError, match="sample_bp"):
        registry.set_deployment("lab", "wine", 1, capture=Capture(0, 60))
