"""The agent process: wires the store, runtime, socket server and systemd together.

Start-up: sweep staging, load every installed version (each failure is logged
and recorded, never fatal), bind the sockets, tell systemd READY. SIGHUP (or
POST /v1/reload) loads versions installed since. SIGTERM and SIGINT drain:
listeners close, in-flight requests finish (up to `server.drain_timeout_s`),
the socket file is removed, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent.buildinfo import compiled_modules
from agent.config import AgentConfig
from agent.errors import AgentError, ModelLoadError, PackageError
from agent.metrics import Metrics
from agent.package.store import InstalledVersion, Store
from agent.runtime.budget import MemoryBudget
from agent.runtime.hardware import Hardware, detect
from agent.runtime.registry import LoadedVersion, ModelRegistry
from agent.sdnotify import Notifier
from agent.serving.app import App
from agent.serving.busypoll import BusyPoll
from agent.serving.http import HttpProtocol, ServerState
from agent.serving.listen import bind_tcp, bind_unix, remove_socket_file

if TYPE_CHECKING:
    from agent.monitor.service import Monitor
    from agent.serving.mqtt import MqttInference
    from agent.telemetry import Command, TelemetryClient
    from agent.update.canary import CapturePolicy
    from agent.update.runner import UpdateRunner

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 1.0


def _log_compiled() -> None:
    compiled = compiled_modules()
    if compiled:
        log.info("request path compiled (%d modules)", len(compiled))
    else:
        log.info("request path in plain Python (not compiled at install: slower, same behaviour)")


class Agent:
    def __init__(self, config: AgentConfig, notifier: Notifier | None = None) -> None:
        self.config = config
        self.notifier = notifier or Notifier.from_environment()
        self.store = Store(config.data_path)
        # The hardware class model variants are chosen by (agent.runtime.hardware).
        self.hardware: Hardware = detect(config.runtime.hardware_tags)
        self.metrics = Metrics(connections=lambda: len(self.state.connections))
        # Inference and loading get separate threads: loading a large model must
        # not stall requests to the models already serving.
        self.infer_pool = ThreadPoolExecutor(config.runtime.workers, thread_name_prefix="infer")
        self.load_pool = ThreadPoolExecutor(1, thread_name_prefix="load")
        self.monitor: Monitor | None = None
        if config.monitor.enabled:
            from agent.monitor.service import Monitor

            self.monitor = Monitor(config.monitor)
            # Data capture rides on the monitor's hand-over of each batch; nothing is kept until
            # the hub's assignment asks for it (agent.monitor.capture).
            from agent.monitor.capture import Capture

            self.monitor.capture = Capture(config.capture)
        self.registry = ModelRegistry(
            config.runtime,
            self.infer_pool,
            self.metrics,
            on_add=self._on_add,
            on_remove=self._on_remove,
        )
        # Every load is admitted, measured and accounted for by the memory budget.
        self.budget = MemoryBudget(self.registry, config.runtime)
        self.metrics.collectors.append(self.budget.collect)
        self.app = App(
            self.registry,
            self.metrics,
            status_info=self._status_info,
            reload=self.reload,
            update=self._update_now,
            feedback=self.monitor.feedback if self.monitor is not None else None,
        )
        if self.monitor is not None:  # the ids the app makes are filed by their counter
            self.monitor.book.own_prefix = self.app.id_prefix
        # Polling after answers (agent.serving.busypoll); None when server.busy_poll_us is 0.
        self.poll = BusyPoll(config.server.busy_poll_us / 1e6) if config.server.busy_poll_us else None
        if self.poll is not None:
            self.metrics.collectors.append(self.poll.metric_families)
        self.state = ServerState(
            self.app.handle,
            max_body_bytes=config.server.max_body_bytes,
            max_header_bytes=config.server.max_header_bytes,
            max_pipelined=config.server.max_pipelined,
            max_connections=config.server.max_connections,
            on_response=self.metrics.response,
            poll=self.poll,
        )
        self.started_at = time.time()
        self._servers: list[asyncio.AbstractServer] = []
        self._socket_path = Path(config.server.socket) if config.server.socket else None
        self._own_socket = False
        self._stop = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self.telemetry: TelemetryClient | None = None
        self.mqtt_inference: MqttInference | None = None  # [mqtt_inference], when enabled
        # What the retained `state` message says besides online: read by the telemetry
        # thread, so it is a dict replaced whole on the loop thread, never changed in place.
        self._state_snapshot: dict[str, Any] = {}
        self.updater: UpdateRunner | None = None
        if config.hub.url:
            from agent.update.runner import UpdateRunner

            self.updater = UpdateRunner(self)

    def _status_info(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "agent": "outpost-agent",
            "version": __version__,
            "device_id": cfg.device_id,
            "group": cfg.group,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started_at, 3),
            "server": {
                "socket": cfg.server.socket,
                "tcp": cfg.server.tcp,
                "connections": len(self.state.connections),
            },
            "data_dir": cfg.data_dir,
            "compiled": compiled_modules(),
            "memory": self.budget.status(),
            "hardware": self.hardware.status(),
            "update": self.updater.status() if self.updater is not None else {"state": "off (no hub.url)"},
            "telemetry": self.telemetry.status() if self.telemetry is not None else {"enabled": False},
            "monitor": self.monitor.status() if self.monitor is not None else {"enabled": False},
            "mqtt_inference": (
                self.mqtt_inference.status() if self.mqtt_inference is not None else {"enabled": False}
            ),
            "capture": (
                self.monitor.capture.status()
                if self.monitor is not None and self.monitor.capture is not None
                else {"enabled": False, "reason": "capture needs [monitor] enabled"}
            ),
        }

    # -- loading ------------------------------------------------------------------------------

    def _on_add(self, lv: LoadedVersion) -> None:
        self.budget.added(lv)
        if self.monitor is not None:
            self.monitor.attach(lv)

    def _on_remove(self, lv: LoadedVersion) -> None:
        self.budget.removed(lv)
        if self.monitor is not None:
            self.monitor.detach(lv)

    async def _load_one(self, installed: InstalledVersion) -> str | None:
        m = installed.manifest
        loop = asyncio.get_running_loop()
        try:
            self.budget.admit(m)  # refused (ModelLoadError) before any session exists when it does not fit
            lv = await loop.run_in_executor(self.load_pool, self.budget.load, installed)
        except (ModelLoadError, PackageError) as exc:
            log.error("%s version %d not served: %s", m.name, m.version, exc)
            self.registry.record_failure(m.name, m.version, str(exc))
            return str(exc)
        self.registry.add(lv)
        log.info("%s version %d ready, batching %s", m.name, m.version, lv.batching_note)
        return None

    async def reload(self) -> dict[str, Any]:
        """Load every installed version not loaded yet; report what happened."""
        async with self._reload_lock:
            loop = asyncio.get_running_loop()
            installed = await loop.run_in_executor(self.load_pool, self.store.installed)
            loaded: list[dict[str, Any]] = []
            failed: list[dict[str, Any]] = []
            for item in installed:
                m = item.manifest
                if self.registry.is_loaded(m.name, m.version):
                    continue
                if (m.name, m.version) in self.budget.evicted:
                    continue  # loading it again would only evict another version
                if self.updater is not None and not self.updater.keeps(m.name, m.version):
                    continue  # the updater loads (and counts) versions it is bringing in
                error = await self._load_one(item)
                entry = {"name": m.name, "version": m.version}
                if error is None:
                    loaded.append(entry)
                else:
                    failed.append({**entry, "error": error})
            return {"loaded": loaded, "failed": failed}

    # -- telemetry ----------------------------------------------------------------------------

    def _refresh_state(self) -> None:
        versions = {m["name"]: m["default_version"] for m in self.registry.status()}
        # The execution providers each model's default version runs on, and the hardware class.
        providers = {
            lv.name: list(lv.session.providers)
            for lv in self.registry.all_loaded()
            if versions.get(lv.name) == lv.version
        }
        state: dict[str, Any] = {"versions": versions, "providers": providers}
        state["hardware"] = sorted(self.hardware.tags)
        # The hardware variant each default version is (absent: a package without variants).
        state["variants"] = {
            lv.name: lv.manifest.variant.name
            for lv in self.registry.all_loaded()
            if versions.get(lv.name) == lv.version and lv.manifest.variant is not None
        }
        if self.updater is not None:
            r = self.updater.record
            state["update"] = {
                "state": r.state.value,
                "current": r.current.version if r.current else None,
                "pending": r.pending.version if r.pending else None,
            }
            experiment = self.updater.experiment
            if experiment is not None:
                state["experiment"] = {"mode": experiment[1].mode, "candidate": experiment[0].version}
        self._state_snapshot = state

    def on_update_event(self, entry: dict[str, Any]) -> None:
        """An update transition: published as an `event`, and the retained state renewed."""
        if self.telemetry is None:
            return
        # The envelope carries its own ts; the transition's time goes as `at`, and the
        # machine's event name as `transition` (`event` says what kind of event this is).
        body = {k: v for k, v in entry.items() if k not in ("ts", "event")}
        body.update(event="update", transition=entry.get("event"), at=entry.get("ts"))
        try:
            self.telemetry.publish("event", body)
        except (AgentError, ValueError) as exc:  # the outbox refused (disk): serving goes on
            log.warning("telemetry: update event not recorded: %s", exc)

    def on_capture_policy(self, model: str | None, policy: CapturePolicy | None) -> None:
        """The assignment's data capture for its model (None, None: the group has no assignment)."""
        capture = self.monitor.capture if self.monitor is not None else None
        if capture is None:
            if policy is not None:
                log.warning("capture for %s asked by the hub, but [monitor] is off: nothing captured", model)
            return
        capture.clear_others({model} if model is not None else set())
        if model is not None:
            capture.set_policy(model, policy)

    def on_experiment_event(self, entry: dict[str, Any]) -> None:
        """An experiment started, ended or failed on this device: published as an `event`."""
        self._refresh_state()
        if self.telemetry is None:
            return
        body = {k: v for k, v in entry.items() if k != "ts"}
        body.update(event="experiment", at=entry.get("ts"))
        try:
            self.telemetry.publish("event", body)
        except (AgentError, ValueError) as exc:
            log.warning("telemetry: experiment event not recorded: %s", exc)
        self.telemetry.rebirth()

    def on_update_settled(self, state: str) -> None:
        """A step's actions are done (the default version switched): renew the retained state."""
        if self.telemetry is None:
            return
        if state in ("committed", "rolled_back", "probation"):
            self._refresh_state()
            self.telemetry.rebirth()

    def _on_command(self, command: Command) -> None:
        if command.command == "update" and self.updater is not None:
            log.info("command from the hub: check for an update now")
            self.updater.trigger()

    def _open_telemetry(self) -> None:
        """The outbox and the client, wired to the monitor; connecting is `TelemetryClient.start`.

        Before the socket is served: a window that closes before the broker is reached (a quick
        client can fill `window_requests` in milliseconds) must be stored, not counted unpublished.
        """
        from agent.telemetry import Outbox, TelemetryClient, on_loop

        cfg = self.config.mqtt
        outbox = Outbox(
            self.config.data_path / "telemetry" / "outbox.db",
            max_messages=cfg.outbox_max_messages,
            max_bytes=cfg.outbox_max_bytes,
            max_age_s=cfg.outbox_max_age_s,
        )
        self._refresh_state()
        self.telemetry = TelemetryClient(
            cfg,
            self.config.device_id,
            self.config.group,
            outbox,
            on_command=on_loop(asyncio.get_running_loop(), self._on_command),
            state_fields=lambda: self._state_snapshot,
        )
        if self.monitor is not None:
            self.monitor.publish = self.telemetry.publish
            if self.monitor.capture is not None:
                self.monitor.capture.publish = self.telemetry.publish
                self.monitor.capture.outbox_bytes = functools.partial(self.telemetry.queued_bytes, "capture")

    async def _monitor_ticks(self, monitor: Monitor) -> None:
        # Often enough that a window closes within a second of being due; each tick also
        # counts what requests are pending, so the work comes in small steps.
        every = min(1.0, self.config.monitor.window_s / 4)
        while True:
            await asyncio.sleep(every)
            try:
                monitor.tick()
            except Exception:  # a bug must be seen, but serving goes on
                log.exception("monitor tick failed")

    async def _run_updater(self, updater: UpdateRunner) -> None:
        try:
            await updater.start()
        except Exception:  # a bug must be seen, not vanish with its task; serving goes on
            log.exception("the updater failed to start; updates are off until a restart")

    async def _update_now(self) -> dict[str, Any]:
        if self.updater is None:
            raise AgentError("updates are off: hub.url is not set in the config")
        self.updater.trigger()
        return {"triggered": True}

    # -- life cycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        try:
            self.store.prepare()
        except OSError as exc:
            raise AgentError(f"data_dir {cfg.data_dir}: {exc}") from exc
        self.notifier.status("loading models")
        # onnxruntime's start and the agent's baseline RSS, before any model (the memory budget)
        await loop.run_in_executor(self.load_pool, self.budget.start)
        result = await self.reload()
        log.info("loaded %d model version(s), %d failed", len(result["loaded"]), len(result["failed"]))

        # Telemetry (sqlite3 and paho: about 2 MB of RSS) only when there is a broker or
        # something to report: with the monitor on, its windows are kept in the outbox
        # even without a broker, until one is configured.
        if cfg.mqtt.url or self.updater is not None or self.monitor is not None:
            try:
                self._open_telemetry()
            except AgentError as exc:  # a bad outbox or broker setting must not stop serving
                log.error("telemetry off: %s", exc)

        def factory() -> HttpProtocol:
            return HttpProtocol(self.state)

        if self._socket_path is not None:
            sock = bind_unix(self._socket_path, cfg.server.socket_mode, cfg.server.socket_group)
            self._own_socket = True
            self._servers.append(await loop.create_unix_server(factory, sock=sock))
            log.info("serving on unix:%s", self._socket_path)
        if cfg.server.tcp:
            tcp = bind_tcp(cfg.server.tcp)
            self._servers.append(await loop.create_server(factory, sock=tcp))
            log.info("serving on tcp:%s", cfg.server.tcp)
        _log_compiled()
        self.app.started = True
        self._tasks.append(asyncio.ensure_future(self._sweeper()))
        if cfg.mqtt_inference.enabled:  # paho is imported only then
            from agent.serving.mqtt import MqttInference

            try:
                self.mqtt_inference = MqttInference(cfg.mqtt_inference, cfg.device_id, cfg.group, self.app)
                self.mqtt_inference.start()
                self.metrics.collectors.append(self.mqtt_inference.collect)
            except AgentError as exc:  # a bad broker setting must not stop serving on the socket
                self.mqtt_inference = None
                log.error("inference over MQTT off: %s", exc)
        if self.telemetry is not None:  # connects in the background; the outbox keeps meanwhile
            await loop.run_in_executor(self.load_pool, self.telemetry.start)
        if self.monitor is not None:
            self._tasks.append(asyncio.ensure_future(self._monitor_ticks(self.monitor)))
        if self.updater is not None:
            # In the background: serving starts now, with the committed version.
            self._tasks.append(asyncio.ensure_future(self._run_updater(self.updater)))
        interval = self.notifier.watchdog_interval()
        if interval:
            self._tasks.append(asyncio.ensure_future(self._watchdog(interval / 2)))
        models = self.registry.ready_count()
        self.notifier.ready(f"serving {models} model version(s)")

    async def _sweeper(self) -> None:
        s = self.config.server
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            self.state.sweep(s.idle_timeout_s, s.request_timeout_s)

    async def _watchdog(self, every: float) -> None:
        # Pinged from the event loop, so a wedged loop stops the pings and
        # systemd restarts us.
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(every)

    def request_stop(self) -> None:
        self._stop.set()

    async def wait_stopped(self) -> None:
        await self._stop.wait()

    async def stop(self) -> None:
        self.notifier.stopping("draining requests")
        log.info("stopping: draining %d busy connection(s)", self.state.busy())
        self.state.draining = True
        for server in self._servers:
            server.close()
        self.state.close_idle()
        deadline = time.monotonic() + self.config.server.drain_timeout_s
        if self.mqtt_inference is not None:  # no more requests; those in flight answered, or the deadline
            await self.mqtt_inference.stop(deadline)
        while self.state.busy() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self.state.busy():
            log.warning("drain timeout: closing %d busy connection(s)", self.state.busy())
        self.state.close_all()
        # close() only starts flushing what is buffered; the loop must keep
        # running until the last answers are written or the deadline passes.
        while self.state.open_transports > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self.state.open_transports > 0:
            log.warning("drain timeout: %d connection(s) still writing", self.state.open_transports)
        for task in self._tasks:
            task.cancel()
        if self.updater is not None:
            await self.updater.stop()
        if self.monitor is not None:
            self.monitor.close_all()  # the open windows go into the outbox before it closes
        if self.telemetry is not None:
            # The death state (online: false) goes out before the socket closes.
            await asyncio.get_running_loop().run_in_executor(None, self.telemetry.stop)
        # Only our own socket: a second agent that failed to start must not
        # delete the first one's.
        if self._socket_path is not None and self._own_socket:
            remove_socket_file(self._socket_path)
        self.infer_pool.shutdown(wait=False, cancel_futures=True)
        self.load_pool.shutdown(wait=False, cancel_futures=True)
        self.notifier.close()
        log.info("stopped")


async def _main(config: AgentConfig) -> None:
    agent = Agent(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.request_stop)
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(agent.reload()))
    try:
        await agent.start()
    except BaseException:
        await agent.stop()
        raise
    await agent.wait_stopped()
    await agent.stop()


def run(config: AgentConfig) -> int:
    """Run the agent until SIGTERM/SIGINT. Returns the process exit code."""
    runner: Callable[[Coroutine[Any, Any, None]], None]
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # uvloop is optional (not on every platform)
        runner = asyncio.run
    try:
        runner(_main(config))
    except AgentError as exc:
        log.error("%s", exc)
        return 1
    return 0


__all__ = ["Agent", "run"]
