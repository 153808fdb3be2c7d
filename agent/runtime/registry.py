"""The set of loaded model versions and which one answers by default.

Loading (onnxruntime session, self-test, batching check) is blocking and runs in
a worker thread; registering and switching happen on the event loop thread, so
a switch is one dictionary assignment: requests already holding a version finish
on it, new ones get the new default. Nothing is unloaded while a request that
holds it is in flight (the request keeps a reference).

Default version policy: the pinned version if one is pinned, else the highest
ready version.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.config import RuntimeConfig
from agent.errors import ModelLoadError, NotFound, Unavailable
from agent.metrics import Metrics, VersionMetrics
from agent.package.manifest import Manifest, SelfTest, Tensor, TensorSpec
from agent.package.store import InstalledVersion
from agent.runtime.batcher import Batcher, Tensors
from agent.runtime.cache import CacheSettings, ResponseCache
from agent.runtime.session import OrtSession, SessionOptions
from agent.serving.datatypes import numpy_dtype

if TYPE_CHECKING:
    from agent.monitor.service import VersionMonitor
    from agent.runtime.experiment import ExperimentRoute

log = logging.getLogger(__name__)

PLATFORM = "onnxruntime_onnx"


def tensor_to_array(t: Tensor) -> np.ndarray:
    dtype = numpy_dtype(t.datatype)
    if t.datatype == "BYTES":
        return np.array([v.encode() if isinstance(v, str) else v for v in t.data], dtype=object).reshape(
            t.shape
        )
    return np.array(t.data, dtype=dtype).reshape(t.shape)


def check_outputs(
    expected: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray], atol: float, rtol: float
) -> str | None:
    """None when `got` reproduces `expected`; else what differs."""
    for name, want in expected.items():
        if name not in got:
            return f"output {name!r} is missing"
        have = got[name]
        if have.shape != want.shape:
            return f"output {name!r} has shape {list(have.shape)}, expected {list(want.shape)}"
        if want.dtype.kind in "fc":
            if not np.allclose(have.astype(np.float64), want.astype(np.float64), atol=atol, rtol=rtol):
                worst = float(np.max(np.abs(have.astype(np.float64) - want.astype(np.float64))))
                return f"output {name!r} differs from the expected values by up to {worst:.3g}"
        elif not np.array_equal(have, want):
            return f"output {name!r} differs from the expected values"
    return None


def run_self_test(session: OrtSession, test: SelfTest) -> None:
    inputs = {t.name: tensor_to_array(t) for t in test.inputs}
    expected = {t.name: tensor_to_array(t) for t in test.outputs}
    try:
        got = session.run(inputs)
    except Exception as exc:
        raise ModelLoadError(f"self-test failed to run: {exc}") from exc
    problem = check_outputs(expected, got, test.atol, test.rtol)
    if problem:
        raise ModelLoadError(f"self-test mismatch: {problem}")


def _probe_inputs(specs: tuple[TensorSpec, ...], test: SelfTest | None) -> dict[str, np.ndarray] | None:
    """Rows to check batching with: the self-test's when it has several, else seeded random ones."""
    if test is not None:
        arrays = {t.name: tensor_to_array(t) for t in test.inputs}
        if all(a.ndim > 0 and a.shape[0] >= 2 for a in arrays.values()):
            return arrays
    rng = np.random.default_rng(0)
    out: dict[str, np.ndarray] = {}
    for spec in specs:
        if spec.datatype == "BYTES" or not spec.shape or any(d < 0 for d in spec.shape[1:]):
            return None
        shape = (4, *spec.shape[1:])
        dtype = numpy_dtype(spec.datatype)
        if dtype.kind == "f":
            out[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            out[spec.name] = rng.integers(0, 2, shape).astype(dtype)
        else:
            out[spec.name] = rng.integers(0, 3, shape).astype(dtype)
    return out


def batching_verdict(session: OrtSession) -> tuple[bool, str]:
    """Whether batching this model leaves every result bit-for-bit unchanged."""
    if not all(s.shape and s.shape[0] == -1 for s in session.inputs):
        return False, "inputs have no variable first dimension"
    if not all(s.shape and s.shape[0] == -1 for s in session.outputs):
        return False, "outputs have no variable first dimension"
    return True, "on"


def verify_batching(session: OrtSession, test: SelfTest | None, max_rows: int) -> tuple[bool, str]:
    """Run probe rows one by one and in batches of several sizes; batching stays on only if
    every batched result equals the single-row result bit for bit."""
    ok, why = batching_verdict(session)
    if not ok:
        return ok, why
    probe = _probe_inputs(session.inputs, test)
    if probe is None:
        return False, "cannot make probe rows to verify batching"
    rows = next(iter(probe.values())).shape[0]
    try:
        singles = [session.run({k: v[i : i + 1] for k, v in probe.items()}) for i in range(rows)]
        for size in sorted({2, min(7, max_rows), max_rows}):
            if size < 2:
                continue
            # Tile the probe rows up to `size`: the kernels onnxruntime picks depend on the batch size.
            picks = [i % rows for i in range(size)]
            together = session.run({k: v[picks] for k, v in probe.items()})
            for name, arr in together.items():
                if arr.ndim == 0 or arr.shape[0] != size:
                    return False, f"output {name!r} does not follow the batch dimension"
                expected = np.concatenate([singles[i][name] for i in picks])
                if not np.array_equal(arr, expected):
                    worst = ""
                    if arr.dtype.kind == "f":
                        worst = f" by up to {float(np.max(np.abs(arr.astype(np.float64) - expected))):.2g}"
                    return False, f"results of a batch of {size} differ from single-row results{worst}"
    except Exception as exc:
        return False, f"batching check failed to run: {exc}"
    return True, f"on (bit-exact against single rows, verified at load up to {max_rows} rows)"


def measure_single_row_ms(session: OrtSession, test: SelfTest | None) -> float | None:
    """Median time of a one-row run, in milliseconds; None when no probe row can be made."""
    probe = _probe_inputs(session.inputs, test)
    if probe is None:
        return None
    row = {k: v[:1] for k, v in probe.items()}
    times = []
    try:
        session.run(row)  # the first run pays for lazy initialisation
        for _ in range(5):
            start = time.perf_counter()
            session.run(row)
            times.append(time.perf_counter() - start)
    except Exception:
        return None
    return sorted(times)[len(times) // 2] * 1000.0


@dataclass(eq=False)
class LoadedVersion:
    name: str
    version: int
    manifest: Manifest
    session: OrtSession
    batcher: Batcher
    metrics: VersionMetrics
    batching_note: str
    single_row_ms: float | None = None
    loaded_at: float = field(default_factory=time.time)
    # Told of every answer this version gives (ok, seconds); the updater sets it while the
    # version is on probation.
    observer: Callable[[bool, float], None] | None = None
    # Summaries, drift and feedback (agent.monitor); set by the registry's on_add hook.
    monitor: VersionMonitor | None = None
    # The response cache (agent.runtime.cache) when the model's config turns it on: this
    # version's answers only, gone with the version.
    cache: ResponseCache | None = None

    # The version as every response writes it: made once, not per request.
    version_str: str = field(init=False)

    def __post_init__(self) -> None:
        self.version_str = str(self.version)

    def metadata(self, versions: list[str]) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": versions,
            "platform": PLATFORM,
            "inputs": [_spec_json(s) for s in self.session.inputs],
            "outputs": [_spec_json(s) for s in self.session.outputs],
        }

    async def infer(self, inputs: Mapping[str, np.ndarray], rows: int) -> Tensors:
        return await self.batcher.submit(inputs, rows)


def _spec_json(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": spec.datatype, "shape": list(spec.shape)}


def check_signature(manifest: Manifest, session: OrtSession) -> None:
    for kind, declared, actual in (
        ("input", manifest.inputs, session.inputs),
        ("output", manifest.outputs, session.outputs),
    ):
        have = {s.name: s.datatype for s in actual}
        for spec in declared:
            if spec.name not in have:
                raise ModelLoadError(f"the manifest's {kind} {spec.name!r} is not in the ONNX model")
            if have[spec.name] != spec.datatype:
                raise ModelLoadError(
                    f"{kind} {spec.name!r} is {have[spec.name]} in the ONNX model, "
                    f"{spec.datatype} in the manifest"
                )
    if {s.name for s in manifest.inputs} != {s.name for s in session.inputs}:
        raise ModelLoadError("the manifest's inputs do not match the ONNX model's inputs")


@dataclass
class _Model:
    versions: dict[int, LoadedVersion] = field(default_factory=dict)
    pinned: int | None = None
    failed: dict[int, str] = field(default_factory=dict)
    default: LoadedVersion | None = None

    def recompute(self) -> None:
        if self.pinned is not None and self.pinned in self.versions:
            self.default = self.versions[self.pinned]
        elif self.versions:
            self.default = self.versions[max(self.versions)]
        else:
            self.default = None


class ModelRegistry:
    def __init__(
        self,
        config: RuntimeConfig,
        executor: Executor,
        metrics: Metrics,
        on_add: Callable[[LoadedVersion], None] | None = None,
        on_remove: Callable[[LoadedVersion], None] | None = None,
    ) -> None:
        self._on_add = on_add
        self._on_remove = on_remove
        # Models with an on-device experiment (agent.runtime.experiment), by name: empty almost
        # always, so the serving path checks it with one truth test.
        self.experiments: dict[str, ExperimentRoute] = {}
        self._config = config
        self._executor = executor
        self._metrics = metrics
        self._models: dict[str, _Model] = {}
        # Each model's default version, kept with every change of it (`_recompute`): the serving
        # path reads it with one dict look-up rather than a call to get().
        self.defaults: dict[str, LoadedVersion] = {}

    # -- loading (blocking; call from a worker thread) --------------------------------------

    def load(self, installed: InstalledVersion) -> LoadedVersion:
        m = installed.manifest
        cfg = self._config
        session = OrtSession(
            installed.model_path,
            SessionOptions(
                cfg.intra_op_threads, cfg.inter_op_threads, cfg.cpu_mem_arena, cfg.providers_for(m.name)
            ),
        )
        check_signature(m, session)
        if m.self_test is not None:
            run_self_test(session, m.self_test)
        per_model = cfg.models.get(m.name)
        wanted = cfg.batching if per_model is None or per_model.batching is None else per_model.batching
        max_rows = cfg.max_batch_size
        delay_ms = cfg.max_queue_delay_ms
        if per_model is not None:
            max_rows = per_model.max_batch_size or max_rows
            delay_ms = per_model.max_queue_delay_ms if per_model.max_queue_delay_ms is not None else delay_ms
        if wanted:
            batching, note = verify_batching(session, m.self_test, max_rows)
            if not batching:
                note = f"off: {note}"
        else:
            batching, note = False, "off by configuration"
        single_ms = measure_single_row_ms(session, m.self_test)
        inline = single_ms is not None and single_ms < cfg.inline_max_ms
        vm = self._metrics.version(m.name, str(m.version))
        batcher = Batcher(
            session.run,
            None if inline else self._executor,
            enabled=batching,
            max_batch_rows=max_rows,
            max_delay_s=delay_ms / 1000.0,
            max_inflight=cfg.workers,
            on_batch=vm.on_batch,
            uniform=all(d >= 0 for spec in session.inputs for d in spec.shape[1:]),
        )
        lv = LoadedVersion(m.name, m.version, m, session, batcher, vm, note, single_ms)
        ttl_s, max_entries, max_bytes = cfg.cache_settings(m.name)
        if ttl_s > 0:
            lv.cache = ResponseCache(m.name, m.version, CacheSettings(ttl_s, max_entries, max_bytes))
        return lv

    # -- switching (event loop thread) -------------------------------------------------------

    def add(self, lv: LoadedVersion, make_default: bool = True) -> None:
        """Register a loaded version. With make_default=False the model's default stays what it
        was (pinned if need be): the updater switches to a new version itself, when it decides."""
        model = self._models.setdefault(lv.name, _Model())
        if not make_default and model.pinned is None and model.default is not None:
            model.pinned = model.default.version
        model.versions[lv.version] = lv
        model.failed.pop(lv.version, None)
        self._recompute(lv.name, model)
        self._metrics.models_ready = self.ready_count()
        if self._on_add is not None:
            self._on_add(lv)

    def _recompute(self, name: str, model: _Model) -> None:
        model.recompute()
        if model.default is None:
            self.defaults.pop(name, None)
        else:
            self.defaults[name] = model.default

    def record_failure(self, name: str, version: int, reason: str) -> None:
        self._models.setdefault(name, _Model()).failed[version] = reason

    def remove(self, name: str, version: int) -> LoadedVersion | None:
        model = self._models.get(name)
        if model is None:
            return None
        lv = model.versions.pop(version, None)
        self._recompute(name, model)
        self._metrics.models_ready = self.ready_count()
        route = self.experiments.get(name)
        if route is not None and lv is not None and (route.arm is lv or model.default is None):
            self.set_experiment(name, None)  # an experiment never outlives its versions
        if lv is not None and self._on_remove is not None:
            self._on_remove(lv)
        return lv

    def set_experiment(self, name: str, route: ExperimentRoute | None) -> None:
        """Route the model's unversioned requests through `route` (None: the default version only)."""
        if route is None:
            if self.experiments.pop(name, None) is not None:
                log.info("model %s: experiment ended", name)
            return
        model = self._models.get(name)
        if model is None or model.versions.get(route.arm.version) is not route.arm:
            raise NotFound(f"model {name!r} has no loaded version {route.arm.version} to experiment with")
        self.experiments[name] = route
        log.info("model %s: %s experiment with version %d", name, route.mode, route.arm.version)

    def pin(self, name: str, version: int | None) -> LoadedVersion:
        model = self._models.get(name)
        if model is None or not model.versions:
            raise NotFound(f"model {name!r} is not loaded")
        if version is not None and version not in model.versions:
            raise NotFound(f"model {name!r} has no loaded version {version}")
        model.pinned = version
        self._recompute(name, model)
        assert model.default is not None
        log.info(
            "model %s: default version is now %d%s",
            name,
            model.default.version,
            " (pinned)" if version is not None else " (latest)",
        )
        return model.default

    def is_loaded(self, name: str, version: int) -> bool:
        model = self._models.get(name)
        return model is not None and version in model.versions

    # -- lookups (hot path) ------------------------------------------------------------------

    def get(self, name: str, version: str | None = None) -> LoadedVersion:
        model = self._models.get(name)
        if model is None:
            raise NotFound(f"unknown model {name!r}")
        if version is None:
            if model.default is None:
                raise Unavailable(f"model {name!r} has no version ready")
            return model.default
        if not version.isdigit():
            raise NotFound(f"model {name!r} has no version {version!r} (versions are integers)")
        lv = model.versions.get(int(version))
        if lv is None:
            if int(version) in model.failed:
                raise Unavailable(
                    f"model {name!r} version {version} failed to load: {model.failed[int(version)]}"
                )
            raise NotFound(f"model {name!r} has no version {version}")
        return lv

    def versions(self, name: str) -> list[str]:
        model = self._models.get(name)
        return [str(v) for v in sorted(model.versions)] if model else []

    def names(self) -> list[str]:
        return sorted(n for n, m in self._models.items() if m.versions or m.failed)

    def ready_count(self) -> int:
        return sum(len(m.versions) for m in self._models.values())

    def any_ready(self) -> bool:
        return any(m.default is not None for m in self._models.values())

    def all_loaded(self) -> list[LoadedVersion]:
        return [lv for m in self._models.values() for lv in m.versions.values()]

    def status(self) -> list[dict[str, Any]]:
        out = []
        for name in self.names():
            model = self._models[name]
            versions = [
                {
                    "version": lv.version,
                    "state": "ready",
                    "default": lv is model.default,
                    "batching": lv.batching_note,
                    "execution": "event loop" if lv.batcher.inline else "worker threads",
                    "single_row_ms": lv.single_row_ms,
                    "loaded_at": lv.loaded_at,
                    "queued": lv.batcher.queued,
                    **lv.session.provider_status(),
                    "variant": lv.manifest.variant.name if lv.manifest.variant is not None else None,
                    **({"cache": lv.cache.status()} if lv.cache is not None else {}),
                }
                for lv in sorted(model.versions.values(), key=lambda v: v.version)
            ]
            versions += [
                {"version": v, "state": "failed", "reason": reason}
                for v, reason in sorted(model.failed.items())
            ]
            doc: dict[str, Any] = {
                "name": name,
                "default_version": model.default.version if model.default else None,
                "pinned": model.pinned,
                "versions": versions,
            }
            route = self.experiments.get(name)
            if route is not None:
                doc["experiment"] = route.status()
            out.append(doc)
        return out
