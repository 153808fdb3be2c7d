"""The memory budget: what a model version should cost, what is charged for it, and who may go.

Pure: the process's resident set is read by agent.runtime.process. The registry
(agent.runtime.registry) asks `MemoryLedger.decide` before it creates a session, so a version
that does not fit is refused before onnxruntime allocates anything, and versions already
serving are never disturbed by the attempt.

Accounting (all in bytes):

    used = baseline + sum(charge of each loaded version) + sum(reservations)

- baseline: the agent's resident set once onnxruntime has started (one tiny session made and
  dropped), before any model is loaded: the interpreter, numpy, onnxruntime's own set-up.
- estimate (`estimate`): from the signed manifest alone, before loading, plus the bound of the
  version's response cache when its model has one (`cache_max_bytes`; the cache starts empty, so
  no measurement at load time can see what it will hold).
- measured: the resident set after the load (session, self-test, the batching check up to the
  largest batch) minus before it. Noisy: malloc reuses memory freed earlier (a second load can
  measure 0), and other threads allocate meanwhile.
- charge = max(estimate, measured): a measured cost above the estimate is believed (a shared
  initializer packed once per node, intermediates larger than the inputs), one below it is not.
- reservation: the estimate of a version being loaded now, so two loads cannot both take the
  same free room.

Eviction: versions that nothing pins (`Resident.pinned_by` is None) may be unloaded, least
recently used first, when that makes room; otherwise the load is refused. Pins are decided by
the caller: every model's default version, an on-device experiment's arm, the updater's
committed version and its candidate.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from agent.package.manifest import Manifest, TensorSpec

MIB = 1024 * 1024

# The constants below come from measurements on the development machine (x86-64, onnxruntime
# 1.32, CPU memory arena off): `python -m tests.benchmarks.memory_estimate` loads each package in
# a fresh process with ModelRegistry.load (session, self-test, batching check to 64 rows) after
# the runtime's warm-up, and prints the RSS it added (two runs) beside the estimate:
#
#   package (model file)                  estimate   measured
#   wine example (6 KiB, sklearn)          2.0 MiB    1.8 / 1.8 MiB
#   bench-tabular (12 KiB, int8 MLP)       2.0 MiB    1.9 / 1.9 MiB
#   bench-conv (96 KiB, 3x224x224 input)  38.9 MiB   37.5 / 36.2 MiB  (64 rows x 588 KiB input)
#   MatMul chain 512x4 (4 MiB)            10.3 MiB   10.7 / 10.8 MiB
#   MatMul chain 1024x4 (16 MiB)          34.5 MiB   26.8 / 34.7 MiB
#   MatMul chain 2048x2 (32 MiB)          67.0 MiB   50.7 / 50.8 MiB
#   one 1024x1024 weight shared by 8 MatMuls (4 MiB)   10.5 MiB   34.8 / 34.8 MiB  <- see below
#
# About 1 MiB of each figure is paid once per process, by whichever model loads first (a second
# small model in the same process adds 0.1-0.5 MiB). onnxruntime keeps the initializers and
# pre-packs MatMul/Gemm/Conv weights into a second, kernel-friendly copy: about 2x the file. An
# initializer shared by n nodes is packed n times, which the file size cannot show: then the
# measured cost wins after the load (charge = max). The first session of a process costs about
# 10 MiB more (thread pools, kernel registry): that goes to the baseline
# (agent.runtime.process.start_runtime), not to any model.
WEIGHT_FACTOR = 2.0  # resident bytes per byte of the ONNX file
SESSION_OVERHEAD_BYTES = 2 * MIB  # per session: graph, kernels, allocator bookkeeping (see above)
# Bytes of a batch's activations per byte of its inputs and outputs. Intermediates of the
# graph are not in the manifest; 1.0 matched the conv net, whose input dominates.
ACTIVATION_FACTOR = 1.0
UNKNOWN_DIM = 1  # a variable dimension other than the batch's counts as 1
BYTES_ELEMENT = 64  # a BYTES (string) element: its length is not known before the request

_ELEMENT_BYTES = {
    "BOOL": 1,
    "UINT8": 1,
    "INT8": 1,
    "UINT16": 2,
    "INT16": 2,
    "FP16": 2,
    "BF16": 2,
    "UINT32": 4,
    "INT32": 4,
    "FP32": 4,
    "UINT64": 8,
    "INT64": 8,
    "FP64": 8,
    "BYTES": BYTES_ELEMENT,
}

Key = tuple[str, int]  # (model name, version)


def mb(n: int) -> float:
    """Bytes as MiB with one decimal, for status documents and messages."""
    return round(n / MIB, 1)


def row_bytes(spec: TensorSpec) -> int:
    """Bytes of one row of a tensor (the first dimension is the batch)."""
    dims = spec.shape[1:] if spec.shape else ()
    n = 1
    for d in dims:
        n *= d if d >= 0 else UNKNOWN_DIM
    return n * _ELEMENT_BYTES.get(spec.datatype, 8)


@dataclass(frozen=True)
class Estimate:
    weights: int
    session: int
    activations: int
    # The version's response cache at its max_bytes (0 when the cache is off). Empty at load,
    # so a measured resident set never shows it: reserved up front, the cache can fill without
    # taking the agent past its budget unseen.
    cache: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.session + self.activations + self.cache

    def to_json(self) -> dict[str, float]:
        return {
            "weights_mb": mb(self.weights),
            "session_mb": mb(self.session),
            "activations_mb": mb(self.activations),
            "cache_mb": mb(self.cache),
            "total_mb": mb(self.total),
        }


def estimate(manifest: Manifest, max_batch_size: int, cache_bytes: int = 0) -> Estimate:
    """What loading this version should add to the agent's resident set (see the table above);
    `cache_bytes`: its response cache's bound, when the model has one."""
    per_row = sum(row_bytes(s) for s in (*manifest.inputs, *manifest.outputs))
    return Estimate(
        weights=int(manifest.model.size * WEIGHT_FACTOR),
        session=SESSION_OVERHEAD_BYTES,
        activations=int(per_row * max(1, max_batch_size) * ACTIVATION_FACTOR),
        cache=max(0, cache_bytes),
    )


@dataclass(frozen=True)
class Charge:
    estimate: int
    measured: int | None = None  # None while it loads (a reservation)

    @property
    def bytes(self) -> int:
        return self.estimate if self.measured is None else max(self.estimate, self.measured)


@dataclass(frozen=True)
class Resident:
    """A loaded version as the budget sees it."""

    key: Key
    charge: int
    last_used: float  # time.monotonic() of its last answer (or of its load)
    pinned_by: str | None = None  # why it may not be evicted; None: it may


@dataclass(frozen=True)
class Decision:
    fits: bool
    needed: int
    used: int
    budget: int
    evict: tuple[Key, ...] = ()
    reason: str = ""


def choose(what: str, budget: int, used: int, needed: int, residents: Iterable[Resident]) -> Decision:
    """Whether `needed` more bytes fit, and which unpinned versions to unload first if that makes
    room (least recently used first, as few as needed). budget 0 = no budget: always fits."""
    if budget <= 0 or used + needed <= budget:
        return Decision(True, needed, used, budget)
    free = budget - used
    chosen: list[Resident] = []
    for r in sorted((r for r in residents if r.pinned_by is None), key=lambda r: (r.last_used, r.key)):
        if free >= needed:
            break
        chosen.append(r)
        free += r.charge
    if free >= needed:
        names = ", ".join(f"{k[0]} v{k[1]}" for k in (r.key for r in chosen))
        reason = (
            f"memory budget: {what} needs ~{mb(needed)} MiB, {mb(used)} of {mb(budget)} MiB in use; "
            f"evicting least recently used {names} ({mb(sum(r.charge for r in chosen))} MiB)"
        )
        return Decision(True, needed, used, budget, tuple(r.key for r in chosen), reason)
    evictable = sum(r.charge for r in residents if r.pinned_by is None)
    reason = (
        f"memory budget: {what} needs ~{mb(needed)} MiB but {mb(used)} of {mb(budget)} MiB are in use "
        f"({mb(budget - used)} free"
        + (f", {mb(evictable)} more if every unpinned version were unloaded" if evictable else "")
        + "); raise runtime.memory_budget_mb or unload a model"
    )
    return Decision(False, needed, used, budget, (), reason)


@dataclass
class MemoryLedger:
    """The budget's books: baseline, charges of loaded versions, reservations of loads under way.

    Written on the event loop thread, except `settle` and `cancel` at the end of a load (the
    loading thread); each change is one dictionary operation, and readers iterate a `snapshot`.
    """

    budget: int  # bytes; 0 = no budget (the books are still kept, for status)
    baseline: int = 0
    charges: dict[Key, Charge] = field(default_factory=dict)
    refused: int = 0
    evicted: int = 0

    def used(self, without: Iterable[Key] = ()) -> int:
        skip = set(without)
        return self.baseline + sum(c.bytes for k, c in self.snapshot() if k not in skip)

    def snapshot(self) -> list[tuple[Key, Charge]]:
        """The charges, copied in one step: the loading thread may add or drop one meanwhile, and
        iterating the live dict in Python code could then fail (list() copies it without a switch)."""
        return list(self.charges.items())

    def decide(
        self,
        key: Key,
        needed: int,
        residents: Iterable[Resident],
        without: Iterable[Key] = (),
    ) -> Decision:
        """See `choose`; `without`: as if those versions were unloaded first (and not evictable)."""
        skip = set(without)
        rest = [r for r in residents if r.key not in skip and r.key != key]
        return choose(f"{key[0]} v{key[1]}", self.budget, self.used(skip | {key}), needed, rest)

    def reserve(self, key: Key, estimate: int) -> None:
        self.charges[key] = Charge(estimate)

    def settle(self, key: Key, estimate: int, measured: int | None) -> Charge:
        charge = self.charges[key] = Charge(estimate, measured)
        return charge

    def cancel(self, key: Key) -> None:
        """A load that was reserved failed: its room is free again (a loaded version keeps its charge)."""
        charge = self.charges.get(key)
        if charge is not None and charge.measured is None:
            self.charges.pop(key, None)

    def drop(self, key: Key) -> None:
        self.charges.pop(key, None)

    def status(self, rss: int | None = None) -> dict[str, object]:
        used = self.used()
        doc: dict[str, object] = {
            "budget_mb": mb(self.budget) if self.budget else None,
            "used_mb": mb(used),
            "free_mb": mb(self.budget - used) if self.budget else None,
            "baseline_mb": mb(self.baseline),
            "loading_mb": mb(sum(c.estimate for _, c in self.snapshot() if c.measured is None)),
            "refused": self.refused,
            "evicted": self.evicted,
        }
        if rss is not None:
            doc["rss_mb"] = mb(rss)
        return doc


def version_memory(charge: Charge | None, est: Estimate | None) -> dict[str, object] | None:
    """The `memory` entry of a version in /v1/status."""
    if charge is None:
        return None
    return {
        "estimate_mb": mb(charge.estimate),
        "measured_mb": mb(charge.measured) if charge.measured is not None else None,
        "charged_mb": mb(charge.bytes),
        **({"estimate": est.to_json()} if est is not None else {}),
    }


def pins(
    defaults: Mapping[str, int | None],
    experiment_arms: Mapping[str, int],
    held: Mapping[Key, str],
) -> dict[Key, str]:
    """Why each pinned version may not be evicted: a model's default version answers its
    unversioned requests; an experiment's arm is routed to; `held` comes from the updater."""
    out: dict[Key, str] = dict(held)
    for name, version in experiment_arms.items():
        out.setdefault((name, version), "experiment arm")
    for name, default in defaults.items():
        if default is not None:
            out.setdefault((name, default), "default version")
    return out
