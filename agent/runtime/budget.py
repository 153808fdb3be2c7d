"""The memory budget at work: admits, measures and evicts around the model registry.

`runtime.memory_budget_mb` (0 = no budget; the books are kept anyway, for status) bounds the
agent's resident set as agent.runtime.memory accounts for it. Every load goes through here:

1. `admit(manifest)` on the event loop thread, BEFORE any session exists: estimate the version;
   if it does not fit, evict least recently used versions that nothing pins when that makes
   room, or refuse with a ModelLoadError naming the budget, the use and the need. Versions
   already serving are untouched by a refusal. On success the estimate is reserved.
2. `load(installed)` in the loading thread: the registry's load, with the resident set read
   before and after; the measured cost is recorded beside the estimate.
3. The registry's on_add / on_remove hooks (`added`, `removed`) turn the reservation into a
   charge and drop it again.

Pinned (never evicted): every model's default version (it answers the model's unversioned
requests; an `outpost-agent default` pin is one), an on-device experiment's arm, and what the
updater holds (`holds`: its committed version and the candidate on probation).
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from agent.errors import AgentError, ModelLoadError
from agent.package.manifest import Manifest
from agent.runtime.memory import (
    MIB,
    Decision,
    Estimate,
    Key,
    MemoryLedger,
    Resident,
    estimate,
    mb,
    pins,
    version_memory,
)
from agent.runtime.process import read_rss_bytes, start_runtime

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from agent.config import RuntimeConfig
    from agent.package.store import InstalledVersion
    from agent.runtime.registry import LoadedVersion, ModelRegistry

log = logging.getLogger(__name__)

EVENTS_KEPT = 20  # evictions and refusals shown in /v1/status


class MemoryBudget:
    def __init__(self, registry: ModelRegistry, config: RuntimeConfig) -> None:
        self.registry = registry
        self._config = config
        self.ledger = MemoryLedger(budget=config.memory_budget_mb * MIB)
        self._estimates: dict[Key, Estimate] = {}
        self._started = False
        # Set by the updater: the versions it holds loaded, with why (never evicted).
        self.holds: Callable[[], dict[Key, str]] | None = None
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=EVENTS_KEPT)
        # Versions evicted and not loaded since: a reload of installed packages leaves them out
        # (loading one would only evict another); the updater still loads what it needs.
        self.evicted: set[Key] = set()

    @property
    def enabled(self) -> bool:
        return self.ledger.budget > 0

    # -- start (blocking; the loading thread) -----------------------------------------------

    def start(self) -> None:
        """Start onnxruntime and take the baseline: the agent's resident set before any model."""
        if self._started:
            return
        cfg = self._config
        start_runtime(cfg.intra_op_threads, cfg.inter_op_threads)
        self.ledger.baseline = read_rss_bytes() or 0
        self._started = True
        if self.enabled:
            log.info(
                "memory budget %.1f MiB; the agent itself takes %.1f MiB before any model",
                mb(self.ledger.budget),
                mb(self.ledger.baseline),
            )
            if self.ledger.baseline >= self.ledger.budget:
                log.warning("memory budget: the agent alone is over runtime.memory_budget_mb; no model fits")

    # -- deciding (event loop thread) -------------------------------------------------------

    def estimate(self, manifest: Manifest) -> Estimate:
        per_model = self._config.models.get(manifest.name)
        rows = self._config.max_batch_size
        if per_model is not None and per_model.max_batch_size:
            rows = per_model.max_batch_size
        ttl_s, _, cache_max_bytes = self._config.cache_settings(manifest.name)
        return estimate(manifest, rows, cache_max_bytes if ttl_s > 0 else 0)

    def residents(self) -> list[Resident]:
        held = self.holds() if self.holds is not None else {}
        defaults: dict[str, int | None] = {}
        for name in self.registry.names():
            try:
                defaults[name] = self.registry.get(name).version
            except AgentError:
                defaults[name] = None
        arms = {name: route.arm.version for name, route in self.registry.experiments.items()}
        pinned = pins(defaults, arms, held)
        out = []
        for lv in self.registry.all_loaded():
            key = (lv.name, lv.version)
            charge = self.ledger.charges.get(key)
            out.append(Resident(key, charge.bytes if charge else 0, lv.batcher.last_used, pinned.get(key)))
        return out

    def plan(self, manifest: Manifest, without: Iterable[Key] = ()) -> Decision:
        """Whether the version would be admitted now (no side effects); `without`: as if those
        versions were unloaded first."""
        key = (manifest.name, manifest.version)
        return self.ledger.decide(key, self.estimate(manifest).total, self.residents(), without)

    def admit(self, manifest: Manifest) -> None:
        """Make room for the version and reserve it, or raise ModelLoadError (nothing loaded)."""
        if not self._started:
            self.start()  # normally done at start-up, in the loading thread
        key = (manifest.name, manifest.version)
        est = self.estimate(manifest)
        decision = self.ledger.decide(key, est.total, self.residents())
        if not decision.fits:
            self.ledger.refused += 1
            self._event("refused", key, decision.reason)
            log.error("%s v%d not loaded: %s", key[0], key[1], decision.reason)
            raise ModelLoadError(decision.reason)
        for victim in decision.evict:
            self.registry.remove(*victim)
            self.ledger.evicted += 1
            self.evicted.add(victim)
            why = f"evicted by the memory budget to make room for {key[0]} v{key[1]}"
            self.registry.record_failure(victim[0], victim[1], why)
            self._event("evicted", victim, f"to make room for {key[0]} v{key[1]}: {decision.reason}")
            log.warning("memory budget: evicted %s v%d to make room for %s v%d", *victim, *key)
        self.evicted.discard(key)
        self._estimates[key] = est
        self.ledger.reserve(key, est.total)

    def _event(self, what: str, key: Key, reason: str) -> None:
        self.events.append(
            {"ts": time.time(), "what": what, "version": f"{key[0]} v{key[1]}", "reason": reason}
        )

    # -- loading (blocking; the loading thread) ----------------------------------------------

    def load(self, installed: InstalledVersion) -> LoadedVersion:
        """The registry's load, measured. Call `admit` first (on the event loop thread)."""
        m = installed.manifest
        key = (m.name, m.version)
        before = read_rss_bytes()
        try:
            lv = self.registry.load(installed)
        except BaseException:
            self.ledger.cancel(key)
            raise
        after = read_rss_bytes()
        measured = after - before if before is not None and after is not None else None
        est = self._estimates.get(key) or self.estimate(m)
        self.ledger.settle(key, est.total, max(0, measured) if measured is not None else None)
        if measured is not None and measured > est.total * 1.5 and measured - est.total > 4 * MIB:
            log.warning(
                "%s v%d: loading it took %.1f MiB, the estimate was %.1f MiB: charged the measured cost",
                m.name,
                m.version,
                mb(measured),
                mb(est.total),
            )
        return lv

    # -- registry hooks (event loop thread) ----------------------------------------------------

    def added(self, lv: LoadedVersion) -> None:
        key = (lv.name, lv.version)
        if key not in self.ledger.charges:  # loaded without `load` (tests, tools): estimate only
            est = self._estimates[key] = self.estimate(lv.manifest)
            self.ledger.settle(key, est.total, None)
        if self.enabled and self.ledger.used() > self.ledger.budget:
            log.warning(
                "memory budget: %.1f of %.1f MiB in use after loading %s v%d (its measured cost was "
                "above the estimate)",
                mb(self.ledger.used()),
                mb(self.ledger.budget),
                lv.name,
                lv.version,
            )

    def removed(self, lv: LoadedVersion) -> None:
        key = (lv.name, lv.version)
        self.ledger.drop(key)
        self._estimates.pop(key, None)

    # -- reporting -----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        doc: dict[str, Any] = self.ledger.status(read_rss_bytes())
        residents = {r.key: r for r in self.residents()}
        now = time.monotonic()
        versions = []
        for key, charge in sorted(self.ledger.snapshot()):
            r = residents.get(key)
            entry: dict[str, Any] = {"model": key[0], "version": key[1], "loaded": r is not None}
            entry.update(version_memory(charge, self._estimates.get(key)) or {})
            if r is not None:
                entry["pinned_by"] = r.pinned_by
                entry["idle_s"] = round(max(0.0, now - r.last_used), 1)
            versions.append(entry)
        doc["versions"] = versions
        doc["events"] = list(self.events)
        return doc

    def collect(self) -> Iterable[Metric]:
        """Prometheus families (Metrics.collectors): the budget, the use, per-version costs."""
        from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

        ledger = self.ledger
        yield GaugeMetricFamily(
            "outpost_memory_budget_bytes",
            "runtime.memory_budget_mb in bytes (0: no budget)",
            value=ledger.budget,
        )
        yield GaugeMetricFamily(
            "outpost_memory_used_bytes",
            "Memory the budget counts as used: the agent's baseline plus loaded versions' charges",
            value=ledger.used(),
        )
        yield GaugeMetricFamily(
            "outpost_memory_baseline_bytes",
            "The agent's resident set before any model",
            value=ledger.baseline,
        )
        labels = ["model", "version"]
        est = GaugeMetricFamily(
            "outpost_model_memory_estimate_bytes", "A version's estimated cost, before loading", labels=labels
        )
        measured = GaugeMetricFamily(
            "outpost_model_memory_measured_bytes",
            "A version's measured cost: resident set after its load minus before",
            labels=labels,
        )
        for (name, version), charge in sorted(ledger.snapshot()):
            est.add_metric([name, str(version)], charge.estimate)
            if charge.measured is not None:
                measured.add_metric([name, str(version)], charge.measured)
        yield est
        yield measured
        yield CounterMetricFamily(
            "outpost_memory_refusals", "Loads refused by the memory budget", value=ledger.refused
        )
        yield CounterMetricFamily(
            "outpost_memory_evictions",
            "Versions unloaded to make room under the memory budget",
            value=ledger.evicted,
        )
