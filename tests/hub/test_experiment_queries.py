"""hub.experiments.queries: which deployment rows make one experiment, and what a read returns
before any telemetry (a real registry, on SQLite and on PostgreSQL, with real packages; no hub process)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from hub.errors import NotFoundError
from hub.experiments import Thresholds, experiments, group_experiment
from hub.fleet.ledger import FleetBase
from hub.registry import BlobStore, Database, Experiment, Registry
from tests.support.packages import affine_package

T0 = datetime(2026, 11, 27, 9, 0, tzinfo=UTC)


@pytest.fixture
def registry(tmp_path: Path, database_url: str) -> Iterator[Registry]:
    db = Database(database_url)
    db.create_all()
    FleetBase.metadata.create_all(db.engine)  # the windows the arms are read from
    ticks = itertools.count()
    r = Registry(db, BlobStore(tmp_path / "blobs"), clock=lambda: T0 + timedelta(minutes=next(ticks)))
    for version in (1, 2, 3):
        package = affine_package(tmp_path / f"v{version}", version=version)
        r.push_version((package / "manifest.json").read_bytes(), (package / "model.onnx").read_bytes())
    yield r
    db.dispose()


def test_an_experiment_spans_the_rows_that_keep_it_and_ends_with_the_next_deployment(
    registry: Registry,
) -> None:
    ab = Experiment("ab", 30)
    first = registry.set_deployment("lab", "affine", 1, candidate=2, percent=20, experiment=ab)
    wider = registry.set_deployment("lab", "affine", 1, candidate=2, percent=100, experiment=ab)  # same one
    (x,) = experiments(registry.db)
    assert (x["id"], x["serial"], x["percent"], x["live"], x["stopped"]) == (
        first.id,
        wider.id,
        100,
        True,
        None,
    )
    assert x["started"] == first.created.isoformat()
    assert (x["stable"], x["candidate"], x["experiment"], x["mode"]) == (
        1,
        2,
        {"mode": "ab", "weight": 30},
        "ab",
    )

    heavier = registry.set_deployment(
        "lab", "affine", 1, candidate=2, percent=100, experiment=Experiment("ab", 60)
    )
    registry.set_deployment("lab", "affine", 1, candidate=3, percent=100, experiment=Experiment("shadow", 10))
    ended = registry.set_deployment("lab", "affine", 1)
    registry.set_deployment("edge", "affine", 2, candidate=3, percent=50, experiment=ab)

    found = experiments(registry.db)
    assert [(e["group"], e["candidate"], e["experiment"].get("weight"), e["live"]) for e in found] == [
        ("edge", 3, 30, True),
        ("lab", 3, None, False),
        ("lab", 2, 60, False),
        ("lab", 2, 30, False),
    ]
    assert found[3]["stopped"] == heavier.created.isoformat()  # a new weight is a new experiment
    assert found[1]["stopped"] == ended.created.isoformat()
    assert [e["group"] for e in experiments(registry.db, live=True)] == ["edge"]
    assert len(experiments(registry.db, group="lab", live=False)) == 3
    assert experiments(registry.db, model="other") == []


def test_before_any_telemetry_there_is_no_verdict(registry: Registry) -> None:
    registry.set_deployment("lab", "affine", 1, candidate=2, percent=100, experiment=Experiment("shadow", 50))
    x = group_experiment(registry.db, "lab", Thresholds(min_compared=10))
    assert x["verdict"] == "not enough data"
    assert x["arms"]["candidate"]["requests"] == 0 and x["arms"]["stable"]["version"] == 1
    assert x["agreement"] == {
        "compared": 0, "agreed": 0, "rate": None, "ci": None, "enough": False, "min_compared": 10,
    }  # fmt: skip
    assert x["thresholds"] == {"min_labelled": 100, "min_requests": 500, "min_compared": 10}
    registry.set_deployment("lab", "affine", 1)
    with pytest.raises(NotFoundError, match="runs no experiment"):
        group_experiment(registry.db, "lab")
