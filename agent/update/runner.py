"""The update runner: the I/O around the pure life cycle (`lifecycle.step`).

It polls the hub for the group's signed assignment (`tuf_client.UpdateClient`), picks stable
or candidate by canary bucket, and feeds the machine events; the machine answers with actions
that this module performs: download into staging, install (verify against the manifest),
load and self-test, switch the model's default version (a pointer swap: requests in flight
finish on the version they hold), probation, commit, fall back, garbage-collect.

The record is saved (atomically) before any action runs, so a kill at any point resumes from a
state that names the work under way. Blocking work (network, disk, onnxruntime) runs in the
agent's loading thread; switching happens on the event loop thread.

Failures to reach the hub or to verify its metadata never touch serving: the committed version
keeps serving, the reason is kept for /v1/status, and the next check backs off.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from agent.errors import AgentError, ModelLoadError, PackageError, UpdateError
from agent.runtime.memory import MIB
from agent.runtime.registry import LoadedVersion
from agent.update.canary import AssignedVersion, Assignment, Choice, Experiment, choose
from agent.update.lifecycle import Action, ActionKind, Event, EventKind, State, UpdateRecord, VersionRef, step
from agent.update.probation import LatencyWindow, Outcome, ProbationTracker
from agent.update.state_file import StateFile
from agent.update.tuf_client import UpdateClient

if TYPE_CHECKING:
    from agent.daemon import Agent

log = logging.getLogger(__name__)
T = TypeVar("T")

PROBATION_CHECK_S = 0.5  # how often a version on probation is judged
EVENTS_KEPT = 50  # transitions shown in /v1/status
STATE_FILE = "update-state.json"


class UpdateRunner:
    def __init__(self, agent: Agent, client: UpdateClient | None = None) -> None:
        self.agent = agent
        cfg = agent.config
        data = cfg.data_path
        self.client = client or UpdateClient(
            cfg.hub, cfg.group, data / "tuf" / "metadata", data / "tuf" / "targets"
        )
        self.downloads = data / "staging" / "downloads"
        self.state_file = StateFile(data / STATE_FILE)
        self.record: UpdateRecord = self.state_file.load_or_reset()
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=EVENTS_KEPT)
        self.event_counts = agent.metrics.update_events  # shared: /metrics shows them
        agent.metrics.update_state = self.record.state.value
        self.last_check: dict[str, Any] = {"at": None, "ok": None, "error": None}
        self._choice: Choice | None = None
        self._downloaded: Path | None = None
        self._tracker: ProbationTracker | None = None
        self._probation_task: asyncio.Task[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._download_task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._queue: collections.deque[Event] = collections.deque()
        self._dispatching = False
        self._failures = 0
        # p50 of the committed version's recent answers: what a candidate's latency is judged against.
        self.reference = LatencyWindow()
        # The on-device experiment under way (agent.runtime.experiment): its arm, its terms, the salt.
        self.experiment: tuple[VersionRef, Experiment, str] | None = None
        self._bad_arms: set[str] = set()  # arms (by model hash) that failed here: not tried again
        self.experiment_last: dict[str, Any] | None = None  # its last start, end or failure
        self.experiment_downloads = data / "staging" / "experiment"
        # The memory budget (agent.runtime.budget) never evicts what the machine holds; whether the
        # committed version stays warm beside the last candidate, and why not.
        agent.budget.holds = self._holds
        self.probation_memory: dict[str, Any] | None = None

    # -- what start-up loads ------------------------------------------------------------

    def keeps(self, model: str, version: int) -> bool:
        """Whether start-up should load this installed version: the committed and previous ones
        of the model under update (the pending one is loaded by the machine, counted)."""
        r = self.record
        tracked = {v.model for v in (r.current, r.previous, r.pending, r.assigned) if v is not None}
        if model not in tracked:
            return True
        return any(
            v is not None and (v.model, v.version) == (model, version) for v in (r.current, r.previous)
        )

    # -- life ---------------------------------------------------------------------------

    async def start(self) -> None:
        await self._serve(self.record.current)
        await self.dispatch(Event(EventKind.RESUME))
        self._task = asyncio.ensure_future(self._poll_forever())

    async def stop(self) -> None:
        for task in (self._task, self._probation_task, self._download_task):
            if task is not None:
                task.cancel()
        await asyncio.get_running_loop().run_in_executor(self.agent.load_pool, self.client.close)

    def trigger(self) -> None:
        """Check the hub now (outpost-agent update, POST /v1/update, the MQTT cmd topic)."""
        self._wake.set()

    async def _poll_forever(self) -> None:
        interval = self.agent.config.hub.poll_interval_s
        while True:
            try:
                ok = await self.check_once()
            except Exception:  # a bug in one cycle must not end updates for good
                log.exception("update cycle failed")
                ok = False
            self._failures = 0 if ok else self._failures + 1
            # Back off on failures (full jitter, capped at 10 polls), so a fleet whose hub went
            # down does not come back all at once.
            delay = interval if ok else random.uniform(0, interval * min(10, 2**self._failures))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=max(delay, 0.05))
            self._wake.clear()

    async def check_once(self) -> bool:
        """One poll: True when the hub answered with verified metadata."""
        self.last_check["at"] = time.time()
        try:
            signed = await self._blocking(self.client.check)
            if signed is None:
                self.last_check.update(ok=True, error=None, note="the group has no assignment")
                self.agent.on_capture_policy(None, None)
                return True
            assignment = Assignment.parse(signed.document, group=self.agent.config.group)
        except UpdateError as exc:
            self.last_check.update(ok=False, error=str(exc))
            log.warning("update check failed: %s", exc)
            return False
        self.last_check.update(ok=True, error=None, note=None, serial=assignment.serial)
        # The variant of the version running here is kept even if the tags changed since
        # (agent.update.canary.choose): an installed version is never replaced in place.
        choice = choose(
            assignment, self.agent.config.device_id, self.agent.hardware.tags, keep=self.record.current
        )
        self._choice = choice
        target = choice.ref
        r = self.record
        if target != r.assigned or assignment.serial != r.assignment_serial:
            await self.dispatch(Event.assignment(target, assignment.serial))
        await self._sync_experiment(choice, assignment.salt)
        self.agent.on_capture_policy(assignment.model, assignment.capture)
        return True

    # -- experiments ----------------------------------------------------------------------

    async def _sync_experiment(self, choice: Choice, salt: str) -> None:
        """Start, keep or end the on-device experiment the assignment names for this device.

        Outside the update life cycle: the committed (stable) version stays the default and is what
        the machine tracks; the experiment's arm is loaded beside it and only routed to. It starts
        once the stable version is committed here; an arm that fails (download, verification,
        load, self-test, a signature unlike the stable's) is reported and not tried again while
        the assignment names it."""
        arm, terms = choice.arm_ref, choice.experiment
        if self.experiment is not None and self.experiment[0].model not in self.agent.registry.experiments:
            # The registry ended the route by itself (a version of it was unloaded): start afresh.
            self.experiment = None
        if arm is None or terms is None:
            if self.experiment is not None:
                self._end_experiment("the assignment names no experiment for this device any more")
            return
        r = self.record
        if r.current != choice.ref or r.pending is not None:
            return  # the stable version first
        if self.experiment == (arm, terms, salt) or arm.sha256 in self._bad_arms:
            return
        if self.experiment is not None:
            self._end_experiment("the experiment changed")
        assert choice.arm is not None
        try:
            lv = await self._load_arm(arm, choice.arm.manifest_sha256, _targets(choice.arm))
            stable = self.agent.registry.get(arm.model)
            if lv.manifest.inputs != stable.manifest.inputs:
                raise ModelLoadError(
                    f"its inputs {[s.name for s in lv.manifest.inputs]} are not the stable version's"
                )
            if terms.mode == "ab" and lv.manifest.outputs != stable.manifest.outputs:
                # Apps get answers from both: they must look alike (a shadow's are only compared).
                raise ModelLoadError(
                    f"its outputs {[s.name for s in lv.manifest.outputs]} are not the stable version's"
                )
            from agent.runtime.experiment import ExperimentRoute

            route = ExperimentRoute(terms.mode, lv, salt, weight=terms.weight, sample=terms.sample)
            self.agent.registry.set_experiment(arm.model, route)
        except (AgentError, OSError) as exc:
            self._bad_arms.add(arm.sha256)
            self._experiment_event("failed", arm, terms, str(exc))
            return
        self.experiment = (arm, terms, salt)
        self._experiment_event("started", arm, terms, None)

    async def _load_arm(
        self, arm: VersionRef, manifest_sha256: str, targets: tuple[str, str] | None = None
    ) -> LoadedVersion:
        registry = self.agent.registry
        if not registry.is_loaded(arm.model, arm.version):
            try:
                installed = await self._blocking(self.agent.store.get, arm.model, arm.version)
                present = installed.manifest.model.sha256 == arm.sha256
            except PackageError:
                present = False
            if not present:
                shutil.rmtree(self.experiment_downloads, ignore_errors=True)
                try:
                    path = await self._blocking(
                        lambda: self.client.fetch_version(
                            arm.model,
                            arm.version,
                            self.experiment_downloads,
                            manifest_sha256=manifest_sha256,
                            model_sha256=arm.sha256,
                            targets=targets,
                        )
                    )
                    installed = await self._blocking(self.agent.store.install, path)
                finally:
                    shutil.rmtree(self.experiment_downloads, ignore_errors=True)
                m = installed.manifest
                if (m.name, m.version, m.model.sha256) != (arm.model, arm.version, arm.sha256):
                    raise PackageError(f"the package is {m.name} v{m.version}, the assignment named {arm}")
            await self._load_from_store(arm)
        lv = self._loaded(arm)
        if lv is None:
            raise ModelLoadError(f"{arm} is not loaded")
        return lv

    def _end_experiment(self, reason: str) -> None:
        current = self.experiment
        if current is None:
            return
        arm, terms, _salt = current
        self.experiment = None
        self.agent.registry.set_experiment(arm.model, None)
        r = self.record
        if arm not in (r.current, r.previous, r.pending):
            self._unload(arm)  # its files go at the next clean-up
        self._experiment_event("ended", arm, terms, reason)

    def _experiment_event(self, what: str, arm: VersionRef, terms: Experiment, reason: str | None) -> None:
        entry: dict[str, Any] = {
            "ts": time.time(),
            "transition": what,
            "mode": terms.mode,
            "version": str(arm),
            "reason": reason,
        }
        if terms.mode == "ab":
            entry["weight"] = terms.weight
        else:
            entry["sample"] = terms.sample
        self.experiment_last = entry
        (log.warning if what == "failed" else log.info)(
            "experiment %s: %s %s%s", what, terms.mode, arm, f": {reason}" if reason else ""
        )
        self.agent.on_experiment_event(entry)

    # -- the machine ----------------------------------------------------------------------

    async def dispatch(self, event: Event) -> None:
        """Step the machine with `event` and perform the actions, then any events they produce."""
        self._queue.append(event)
        if self._dispatching:
            return
        self._dispatching = True
        try:
            while self._queue:
                event = self._queue.popleft()
                before = self.record.state
                try:
                    record, actions = step(self.record, event)
                except RuntimeError as exc:  # an event the machine does not take here: a runner bug
                    log.error("update: %s in state %s dropped: %s", event.kind, self.record.state, exc)
                    continue
                await self._blocking(self.state_file.save, record)  # before any side effect
                self.record = record
                self.agent.metrics.update_state = record.state.value
                for action in actions:
                    await self._perform(action)
                if record.state is not before:
                    self.agent.on_update_settled(record.state.value)
        finally:
            self._dispatching = False

    async def _perform(self, action: Action) -> None:
        kind = action.kind
        v = action.version
        if kind is ActionKind.REPORT:
            self._report(action.report)
        elif kind is ActionKind.DOWNLOAD:
            assert v is not None
            # In its own task: a retry waiting out its backoff must not hold up polling (a new
            # assignment, a hub rollback, the status of the hub) or the rest of the machine.
            if self._download_task is not None:
                self._download_task.cancel()
            self._download_task = asyncio.ensure_future(self._download(v, action.delay_s))
        elif kind is ActionKind.VERIFY:
            assert v is not None
            await self._verify(v)
        elif kind is ActionKind.INSTALL_AND_LOAD:
            assert v is not None
            await self._load(v)
        elif kind is ActionKind.SWITCH_TO:
            await self._serve(v)
        elif kind is ActionKind.START_PROBATION:
            assert v is not None
            self._start_probation(v)
        elif kind in (ActionKind.COMMIT, ActionKind.FALL_BACK):
            self._end_probation()
            if kind is ActionKind.FALL_BACK:
                await self._room_for_fall_back(v, action.leaving)
            await self._serve(v)
            self._unload(action.leaving)
            if kind is ActionKind.COMMIT:
                # The window held the version left behind (also when the memory budget had it
                # unloaded already): the new committed version's answers start a new one.
                self.reference = LatencyWindow()
        elif kind is ActionKind.MARK_BAD:
            log.warning("%s marked bad: not tried again until the assignment changes", v)
        elif kind is ActionKind.GC:
            await self._gc(action.keep)

    def _report(self, report: dict[str, Any]) -> None:
        entry = {"ts": time.time(), **report}
        self.events.append(entry)
        self.agent.on_update_event(entry)
        name = str(report.get("event", "?"))
        self.event_counts[name] = self.event_counts.get(name, 0) + 1
        log.info(
            "update: %s -> %s on %s (%s)%s",
            report.get("from"),
            report.get("to"),
            name,
            report.get("version"),
            f": {report['reason']}" if report.get("reason") else "",
        )

    # -- actions --------------------------------------------------------------------------

    async def _blocking(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.agent.load_pool, fn, *args)

    async def _download(self, v: VersionRef, delay_s: float) -> None:
        if delay_s > 0:
            await asyncio.sleep(delay_s * random.uniform(0.5, 1.0))
        choice = self._choice
        picked = choice.version if choice is not None and choice.ref == v else None
        manifest_sha = picked.manifest_sha256 if picked is not None else None
        # The hardware variant chosen for this device: only its two files are downloaded.
        targets = _targets(picked) if picked is not None else None
        shutil.rmtree(self.downloads, ignore_errors=True)
        try:
            path = await self._blocking(
                lambda: self.client.fetch_version(
                    v.model,
                    v.version,
                    self.downloads,
                    manifest_sha256=manifest_sha,
                    model_sha256=v.sha256,
                    targets=targets,
                )
            )
        except UpdateError as exc:
            if self._still_downloading(v):
                await self.dispatch(Event(EventKind.DOWNLOAD_FAILED, version=v, reason=str(exc)))
            return
        if not self._still_downloading(v):  # the assignment moved on while this ran
            shutil.rmtree(path, ignore_errors=True)
            return
        self._downloaded = path
        await self.dispatch(Event(EventKind.DOWNLOADED, version=v))

    def _still_downloading(self, v: VersionRef) -> bool:
        return self.record.state is State.DOWNLOADING and self.record.pending == v

    async def _verify(self, v: VersionRef) -> None:
        path = self._downloaded
        if path is None:  # resumed in VERIFYING: the machine restarts downloads, so this is a bug
            await self.dispatch(Event(EventKind.VERIFY_FAILED, version=v, reason="nothing downloaded"))
            return
        try:
            installed = await self._blocking(self.agent.store.install, path)
            m = installed.manifest
            if (m.name, m.version, m.model.sha256) != (v.model, v.version, v.sha256):
                raise PackageError(
                    f"the package is {m.name} v{m.version} ({m.model.sha256[:12]}), the assignment named {v}"
                )
        except (PackageError, OSError) as exc:
            await self.dispatch(Event(EventKind.VERIFY_FAILED, version=v, reason=str(exc)))
            return
        finally:
            shutil.rmtree(self.downloads, ignore_errors=True)
            self._downloaded = None
        await self.dispatch(Event(EventKind.VERIFIED, version=v))

    async def _load(self, v: VersionRef) -> None:
        registry = self.agent.registry
        if not registry.is_loaded(v.model, v.version):
            try:
                await self._room_for_probation(v)
                await self._load_from_store(v)
            except (ModelLoadError, PackageError) as exc:
                registry.record_failure(v.model, v.version, str(exc))
                await self.dispatch(Event(EventKind.LOAD_FAILED, version=v, reason=str(exc)))
                return
        await self.dispatch(Event(EventKind.LOADED, version=v))

    async def _load_from_store(self, v: VersionRef) -> None:
        """Load an installed version beside the others; the default version stays as it is."""
        installed = await self._blocking(self.agent.store.get, v.model, v.version)
        self.agent.budget.admit(installed.manifest)  # ModelLoadError when it does not fit
        lv = await self._blocking(self.agent.budget.load, installed)
        self.agent.registry.add(lv, make_default=False)

    # -- the memory budget -------------------------------------------------------------------

    def _holds(self) -> dict[tuple[str, int], str]:
        """Versions the memory budget must not evict: the committed one and the pending one."""
        r = self.record
        held: dict[tuple[str, int], str] = {}
        if r.current is not None:
            held[(r.current.model, r.current.version)] = "committed version"
        if r.pending is not None:
            held[(r.pending.model, r.pending.version)] = f"update ({r.state.value})"
        return held

    async def _room_for_probation(self, v: VersionRef) -> None:
        """Keep the committed version warm beside the candidate only when the budget has room for
        both; otherwise unload it before the candidate loads (a fall back reloads it from disk).
        When the candidate does not fit even alone, nothing is unloaded: its load is refused."""
        current = self.record.current
        registry = self.agent.registry
        self.probation_memory = None
        if (
            current is None
            or current.model != v.model
            or not registry.is_loaded(current.model, current.version)
        ):
            return
        installed = await self._blocking(self.agent.store.get, v.model, v.version)
        both = self.agent.budget.plan(installed.manifest)
        doc: dict[str, Any] = {
            "candidate": str(v),
            "previous": str(current),
            "previous_warm": True,
            "reason": None,
        }
        if not both.fits:
            alone = self.agent.budget.plan(installed.manifest, without=[(current.model, current.version)])
            if not alone.fits:
                return
            free = max(0, both.budget - both.used)
            doc["previous_warm"] = False
            doc["reason"] = (
                f"memory budget: {v} needs ~{both.needed / MIB:.1f} MiB, {free / MIB:.1f} MiB free with "
                f"{current} loaded; {current} is unloaded during the probation and a fall back reloads "
                "it from disk (slower, and the model answers 503 while the candidate loads)"
            )
            log.warning("update: %s", doc["reason"])
            state = self.record.state.value
            self._report(
                {
                    "event": "previous_unloaded",
                    "from": state,
                    "to": state,
                    "version": current.to_json(),
                    "reason": doc["reason"],
                }
            )
            lv = registry.remove(current.model, current.version)
            if lv is not None:
                lv.observer = None  # the reference latency it gave stays: the candidate is judged on it
        self.probation_memory = doc

    async def _room_for_fall_back(self, v: VersionRef | None, leaving: VersionRef | None) -> None:
        """Falling back to a version that is not loaded (the budget had no room to keep it warm):
        unload the version left first when both do not fit, so the reload is not refused."""
        registry = self.agent.registry
        if v is None or leaving is None or registry.is_loaded(v.model, v.version):
            return
        if not registry.is_loaded(leaving.model, leaving.version):
            return
        try:
            installed = await self._blocking(self.agent.store.get, v.model, v.version)
        except PackageError:
            return  # _serve says why it cannot serve it
        if self.agent.budget.plan(installed.manifest).fits:
            return  # reloaded beside it, then the one left goes: no gap
        log.warning("update: falling back to %s: unloading %s first to make room (memory budget)", v, leaving)
        self._unload(leaving)
        if self.probation_memory is not None:
            self.probation_memory = {**self.probation_memory, "fell_back": f"{v} reloaded from disk"}

    async def _serve(self, v: VersionRef | None) -> None:
        """Make `v` its model's default version (None: leave the model to its normal policy).

        A committed version kept on disk but not in memory (the previous one, after a commit)
        is loaded again first: a hub rollback or a fall back must not depend on memory."""
        registry = self.agent.registry
        if v is None:
            return
        if not registry.is_loaded(v.model, v.version):
            try:
                await self._load_from_store(v)
            except (ModelLoadError, PackageError) as exc:
                log.error("cannot serve %s: %s", v, exc)
                return
        lv = registry.pin(v.model, v.version)
        if self.record.state is not State.PROBATION or self.record.pending != v:
            lv.observer = self._observe_reference

    def _observe_reference(self, ok: bool, seconds: float) -> None:
        if ok:
            self.reference.add(seconds)

    def _start_probation(self, v: VersionRef) -> None:
        lv = self._loaded(v)
        if lv is None:
            return
        reference = self.reference.p50()
        self._tracker = ProbationTracker(lv.manifest.probation, time.monotonic(), reference)
        lv.observer = self._tracker.record
        self._probation_task = asyncio.ensure_future(self._watch_probation(v))

    async def _watch_probation(self, v: VersionRef) -> None:
        while True:
            await asyncio.sleep(PROBATION_CHECK_S)
            tracker = self._tracker
            if tracker is None or self.record.state is not State.PROBATION or self.record.pending != v:
                return
            verdict = tracker.verdict(time.monotonic())
            if verdict.outcome is Outcome.PASSED:
                await self.dispatch(Event(EventKind.PROBATION_PASSED, version=v, reason=verdict.reason))
                return
            if verdict.outcome is Outcome.FAILED:
                await self.dispatch(Event(EventKind.PROBATION_FAILED, version=v, reason=verdict.reason))
                return

    def _end_probation(self) -> None:
        self._tracker = None
        task = self._probation_task
        self._probation_task = None
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    def _loaded(self, v: VersionRef) -> LoadedVersion | None:
        try:
            return self.agent.registry.get(v.model, str(v.version))
        except AgentError:
            return None

    def _unload(self, v: VersionRef | None) -> None:
        if v is None:
            return
        lv = self.agent.registry.remove(v.model, v.version)
        if lv is not None:
            lv.observer = None
            self.reference = LatencyWindow()

    async def _gc(self, keep: tuple[VersionRef, ...]) -> None:
        if not keep:
            return
        model = keep[0].model
        wanted = {v.version for v in keep}
        if self.experiment is not None and self.experiment[0].model == model:
            wanted.add(self.experiment[0].version)  # the experiment's arm stays
        for item in await self._blocking(self.agent.store.installed):
            m = item.manifest
            if m.name == model and m.version not in wanted:
                self.agent.registry.remove(m.name, m.version)
                await self._blocking(self.agent.store.remove, m.name, m.version)

    # -- status ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        r = self.record
        doc: dict[str, Any] = {
            "state": r.state.value,
            "current": str(r.current) if r.current else None,
            "previous": str(r.previous) if r.previous else None,
            "pending": str(r.pending) if r.pending else None,
            "assigned": str(r.assigned) if r.assigned else None,
            "assignment_serial": r.assignment_serial,
            "attempts": r.attempts,
            "bad": sorted(h[:12] for h in r.bad),
            "reason": r.reason,
            "last_check": dict(self.last_check),
            "experiment": (
                {"mode": self.experiment[1].mode, "candidate": str(self.experiment[0])}
                if self.experiment is not None
                else None
            ),
            "experiment_last": self.experiment_last,
            "probation_memory": self.probation_memory,
            "events": list(self.events)[-20:],
        }
        if self._choice is not None:
            doc["canary"] = {"bucket": self._choice.bucket, "role": self._choice.role}
        if self._tracker is not None:
            t = self._tracker
            doc["probation"] = {
                "requests": t.requests,
                "errors": t.errors,
                "reference_p50_s": t.reference_p50_s,
            }
        return doc


def _targets(version: AssignedVersion) -> tuple[str, str]:
    """The target paths the assignment names for the files of a version: the hardware variant
    picked for this device (agent.update.canary.pick_variant), or the generic ones."""
    return version.manifest, version.model
