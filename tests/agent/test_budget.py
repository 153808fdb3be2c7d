"""agent.runtime.budget: admitting, measuring and evicting around a registry (a fake one here;
tests/e2e/test_memory_budget.py runs the real agent with the real onnxruntime)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from agent.config import RuntimeConfig
from agent.errors import ModelLoadError, NotFound, Unavailable
from agent.package.manifest import Manifest, ModelFile, TensorSpec
from agent.package.store import InstalledVersion
from agent.runtime.budget import MemoryBudget
from agent.runtime.memory import MIB, estimate

SPEC = TensorSpec("x", "FP32", (-1, 4))


def manifest(name: str, version: int, size_mb: float = 10.0) -> Manifest:
    return Manifest(name, version, ModelFile("model.onnx", "0" * 64, int(size_mb * MIB)), (SPEC,), (SPEC,))


@dataclass
class FakeVersion:
    name: str
    version: int
    manifest: Manifest
    batcher: Any = field(default_factory=lambda: SimpleNamespace(last_used=0.0))


class FakeRegistry:
    """What MemoryBudget uses of ModelRegistry; the default version is the highest."""

    def __init__(self) -> None:
        self.loaded: dict[tuple[str, int], FakeVersion] = {}
        self.failed: dict[tuple[str, int], str] = {}
        self.experiments: dict[str, Any] = {}
        self.budget: MemoryBudget | None = None
        self.fail_load = False

    def names(self) -> list[str]:
        return sorted({k[0] for k in self.loaded})

    def get(self, name: str) -> FakeVersion:
        versions = [v for (n, v) in self.loaded if n == name]
        if not versions:
            raise Unavailable(f"{name} has no version ready")
        return self.loaded[(name, max(versions))]

    def all_loaded(self) -> list[FakeVersion]:
        return list(self.loaded.values())

    def load(self, installed: InstalledVersion) -> FakeVersion:
        if self.fail_load:
            raise ModelLoadError("self-test mismatch")
        m = installed.manifest
        return FakeVersion(m.name, m.version, m)

    def add(self, lv: FakeVersion, used: float = 0.0) -> None:
        lv.batcher.last_used = used
        self.loaded[(lv.name, lv.version)] = lv
        assert self.budget is not None
        self.budget.added(lv)  # type: ignore[arg-type]

    def remove(self, name: str, version: int) -> FakeVersion | None:
        lv = self.loaded.pop((name, version), None)
        if lv is None:
            raise NotFound(f"{name} v{version}")
        assert self.budget is not None
        self.budget.removed(lv)  # type: ignore[arg-type]
        return lv

    def record_failure(self, name: str, version: int, reason: str) -> None:
        self.failed[(name, version)] = reason


def make(budget_mb: int, baseline_mb: float = 50.0) -> tuple[MemoryBudget, FakeRegistry]:
    registry = FakeRegistry()
    budget = MemoryBudget(registry, RuntimeConfig(memory_budget_mb=budget_mb))  # type: ignore[arg-type]
    registry.budget = budget
    budget._started = True  # no onnxruntime here: the baseline is set by hand
    budget.ledger.baseline = int(baseline_mb * MIB)
    return budget, registry


def bring_in(budget: MemoryBudget, registry: FakeRegistry, m: Manifest, used: float = 0.0) -> None:
    budget.admit(m)
    lv = budget.load(InstalledVersion(m, Path("/nonexistent")))
    registry.add(lv, used)  # type: ignore[arg-type]


EACH = estimate(manifest("a", 1), 64).total / MIB  # ~22 MiB


def test_a_version_that_does_not_fit_is_refused_before_loading() -> None:
    budget, registry = make(budget_mb=int(50 + EACH + EACH / 2))
    bring_in(budget, registry, manifest("a", 1))
    with pytest.raises(ModelLoadError, match=rf"memory budget: b v1 needs ~{EACH:.1f} MiB"):
        budget.admit(manifest("b", 1))
    assert set(registry.loaded) == {("a", 1)}
    assert budget.ledger.refused == 1
    assert budget.events[-1]["what"] == "refused"
    assert budget.ledger.used() == int(50 * MIB) + budget.ledger.charges[("a", 1)].bytes


def test_the_least_recently_used_unpinned_version_makes_room() -> None:
    budget, registry = make(budget_mb=int(50 + 4 * EACH + EACH / 2))
    for name, version, used in (("a", 1, 5.0), ("a", 2, 1.0), ("c", 1, 2.0), ("c", 2, 1.0)):
        bring_in(budget, registry, manifest(name, version), used)
    bring_in(budget, registry, manifest("b", 1))
    # a v2 and c v2 are defaults; of a v1 (used at 5) and c v1 (at 2), c v1 is older
    assert ("c", 1) not in registry.loaded and ("a", 1) in registry.loaded
    assert "evicted by the memory budget to make room for b v1" in registry.failed[("c", 1)]
    assert budget.evicted == {("c", 1)}
    assert budget.ledger.evicted == 1
    assert budget.ledger.used() <= budget.ledger.budget


def test_what_the_updater_holds_and_experiment_arms_are_never_evicted() -> None:
    budget, registry = make(budget_mb=int(50 + 3 * EACH + EACH / 2))
    for version in (1, 2, 3):
        bring_in(budget, registry, manifest("a", version))
    budget.holds = lambda: {("a", 1): "committed version"}
    registry.experiments["a"] = SimpleNamespace(arm=SimpleNamespace(version=2))
    with pytest.raises(ModelLoadError, match="memory budget"):
        budget.admit(manifest("b", 1))
    assert {r.key: r.pinned_by for r in budget.residents()} == {
        ("a", 1): "committed version",
        ("a", 2): "experiment arm",
        ("a", 3): "default version",
    }


def test_plan_has_no_side_effects_and_can_set_a_version_aside() -> None:
    budget, registry = make(budget_mb=int(50 + 1.5 * EACH))
    bring_in(budget, registry, manifest("a", 1))
    budget.holds = lambda: {("a", 1): "committed version"}
    assert not budget.plan(manifest("a", 2)).fits
    assert budget.plan(manifest("a", 2), without=[("a", 1)]).fits
    assert set(registry.loaded) == {("a", 1)} and budget.ledger.refused == 0


def test_a_failed_load_frees_its_reservation_and_a_removal_its_charge() -> None:
    budget, registry = make(budget_mb=0)  # no budget: the books are kept all the same
    registry.fail_load = True
    budget.admit(manifest("a", 1))
    assert budget.ledger.status()["loading_mb"] > 0
    with pytest.raises(ModelLoadError):
        budget.load(InstalledVersion(manifest("a", 1), Path("/nonexistent")))
    assert budget.ledger.used() == int(50 * MIB)
    registry.fail_load = False
    bring_in(budget, registry, manifest("a", 1))
    charge = budget.ledger.charges[("a", 1)]
    assert charge.measured is not None and charge.bytes >= charge.estimate
    status = budget.status()
    assert status["budget_mb"] is None and status["versions"][0]["pinned_by"] == "default version"
    registry.remove("a", 1)
    assert budget.ledger.used() == int(50 * MIB) and budget.status()["versions"] == []


def test_a_response_cache_is_reserved_at_its_bound() -> None:
    # The cache is empty when the version loads, so no measurement sees it: the estimate must
    # hold its max_bytes, or a full cache takes the agent past its budget unseen.
    cache_mb = 40
    config = RuntimeConfig(memory_budget_mb=int(50 + EACH + cache_mb / 2), cache_ttl_s=30.0,
                           cache_max_bytes=cache_mb * MIB)
    registry = FakeRegistry()
    budget = MemoryBudget(registry, config)
    registry.budget = budget
    budget._started = True
    budget.ledger.baseline = int(50 * MIB)
    est = budget.estimate(manifest("a", 1))
    assert est.cache == cache_mb * MIB
    assert est.total == estimate(manifest("a", 1), 64).total + cache_mb * MIB
    assert est.to_json()["cache_mb"] == cache_mb
    with pytest.raises(ModelLoadError, match="memory budget: a v1 needs"):
        budget.admit(manifest("a", 1))
    # The same model without a cache fits the same budget.
    plain = MemoryBudget(registry, RuntimeConfig(memory_budget_mb=int(50 + EACH + cache_mb / 2)))
    plain._started = True
    plain.ledger.baseline = int(50 * MIB)
    assert plain.estimate(manifest("a", 1)).cache == 0
    plain.admit(manifest("a", 1))
