"""Simulated devices: what one agent asks of the hub and the broker, thousands per process.

One load process (`run_worker`, spawned by fleet_sim) runs asyncio on uvloop with one coroutine
per device. A device:

- polls the hub's TUF repository with the agent's request pattern (captured from
  `agent.update.tuf_client.UpdateClient` against a real hub, see docs/benchmarks.md): python-tuf's
  probe for the next root version (`/tuf/metadata/<v+1>.root.json`, 404), then `timestamp.json`;
  only when the timestamp names a new snapshot: `<v>.snapshot.json`, then each role on the
  assignment's delegation path whose version changed (`targets`, `deploy`, `group-<g>`), then the
  assignment target by its hash (`/tuf/targets/groups/<g>/<sha256>.assignment.json`). A new
  assigned version is then fetched as `fetch_version` does: the probe and timestamp again, the
  `models` role if it changed, the manifest and the model file by their hashes.
  Signatures are not verified (python-tuf's cost is on the device, not the hub); hashes are
  read from the metadata as served. With `etag=True` the timestamp is asked with If-None-Match
  (the issue's premise: 304s); the agent today sends none and gets the 469-byte file each time.
- publishes its `state` birth (retained) after connecting, then `summary` and `drift` per window,
  QoS 1, with its own `seq` (one sequence for all its messages, as the agent's), in the agent's
  payload shapes (bodies made by agent.monitor in fleet_sim, only seq, ts, start, end change).

Devices start with the metadata a process fetched once per group (as if they had run for a
while and committed the deployed version), so a run does not begin with a thundering herd.
Times are `time.monotonic()` (CLOCK_MONOTONIC: one clock for every process on the machine).
"""

from __future__ import annotations

import asyncio
import json
import random
import resource
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

from agent.update.canary import Assignment, choose
from tests.benchmarks.fleet_wire import HttpConn, MqttLink, WireError

META = "/tuf/metadata/"
TARGETS = "/tuf/targets/"


@dataclass
class TufView:
    """What a device has verified: versions, the timestamp's ETag, its assignment."""

    root: int = 1
    ts_etag: str | None = None
    snapshot: int = 0
    roles: dict[str, int] = field(default_factory=dict)
    assignment_sha: str | None = None
    assigned: int | None = None  # the model version the assignment gives this device
    installed: int | None = None
    model: str = ""
    models_version: int = 0  # the models role's version the last snapshot named
    models_targets: dict[str, Any] = field(default_factory=dict)  # of the models role


@dataclass
class PollStats:
    cycles: int = 0
    requests: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    bytes_in: int = 0
    latencies_us: list[int] = field(default_factory=list)


_parsed: dict[str, Any] = {}  # immutable (versioned, hash-named) files parsed once per process


async def _get(
    conn: HttpConn, path: str, stats: PollStats, etag: str | None = None
) -> tuple[int, str | None, bytes]:
    answer = await conn.get(path, etag)
    stats.requests += 1
    stats.statuses[answer.status] += 1
    stats.bytes_in += len(answer.body)
    return answer.status, answer.etag, answer.body


def _json(path: str, body: bytes) -> Any:
    doc = _parsed.get(path)
    if doc is None:
        doc = _parsed[path] = json.loads(body)
    return doc


async def poll(
    conn: HttpConn, view: TufView, device_id: str, group: str, stats: PollStats, etag: bool
) -> bool:
    """One update check as the agent makes it; True when the assigned version changed."""
    status, _, _ = await _get(conn, f"{META}{view.root + 1}.root.json", stats)
    if status != 404:
        raise WireError(f"root probe answered {status}")
    status, tag, body = await _get(conn, META + "timestamp.json", stats, view.ts_etag if etag else None)
    if status == 304:
        return False
    if status != 200:
        raise WireError(f"timestamp.json answered {status}")
    view.ts_etag = tag
    snapshot = json.loads(body)["signed"]["meta"]["snapshot.json"]["version"]
    if snapshot == view.snapshot:
        return False
    path = f"{META}{snapshot}.snapshot.json"
    status, _, body = await _get(conn, path, stats)
    if status != 200:
        raise WireError(f"{path} answered {status}")
    meta = _json(path, body)["signed"]["meta"]
    view.snapshot = snapshot
    group_doc = None
    for role in ("targets", "deploy", f"group-{group}"):
        version = meta[f"{role}.json"]["version"]
        if view.roles.get(role) != version:
            path = f"{META}{version}.{role}.json"
            status, _, body = await _get(conn, path, stats)
            if status != 200:
                raise WireError(f"{path} answered {status}")
            view.roles[role] = version
            if role.startswith("group-"):
                group_doc = _json(path, body)
    if group_doc is None:
        return False
    target = f"groups/{group}/assignment.json"
    sha = group_doc["signed"]["targets"][target]["hashes"]["sha256"]
    if sha == view.assignment_sha:
        return False
    path = f"{TARGETS}groups/{group}/{sha}.assignment.json"
    status, _, body = await _get(conn, path, stats)
    if status != 200:
        raise WireError(f"{path} answered {status}")
    view.assignment_sha = sha
    choice = choose(Assignment.parse(_json(path, body), group=group), device_id)
    view.model = choice.ref.model
    changed = choice.ref.version != view.assigned
    view.assigned = choice.ref.version
    view.models_version = meta["models.json"]["version"]
    return changed


async def fetch_version(conn: HttpConn, view: TufView, stats: PollStats, etag: bool) -> None:
    """`UpdateClient.fetch_version`: a refresh, the models role if new, manifest and model."""
    status, _, _ = await _get(conn, f"{META}{view.root + 1}.root.json", stats)
    status, tag, _ = await _get(conn, META + "timestamp.json", stats, view.ts_etag if etag else None)
    if status == 200:
        view.ts_etag = tag
    models = view.models_version
    if view.roles.get("models") != models:
        path = f"{META}{models}.models.json"
        status, _, body = await _get(conn, path, stats)
        if status != 200:
            raise WireError(f"{path} answered {status}")
        view.roles["models"] = models
        view.models_targets = _json(path, body)["signed"]["targets"]
    for name in ("manifest.json", "model.onnx"):
        target = f"models/{view.model}/{view.assigned}/{name}"
        sha = view.models_targets[target]["hashes"]["sha256"]
        path = f"{TARGETS}models/{view.model}/{view.assigned}/{sha}.{name}"
        status, _, _ = await _get(conn, path, stats)
        if status != 200:
            raise WireError(f"{path} answered {status}")
    view.installed = view.assigned


# -- telemetry --------------------------------------------------------------------------


class Telemetry:
    """One device's messages: topics made once, payloads from the bodies' JSON templates."""

    def __init__(self, device_id: str, group: str, bodies: dict[str, bytes], seq: int = 0) -> None:
        self.device_id = device_id
        self.prefix = f"outpost/v1/{group}/{device_id}/"
        self.bodies = bodies  # kind -> the body's JSON without "{" (start and end not in it)
        self.seq = seq
        self.sent: list[int] = []  # seqs of summary and drift messages acknowledged

    def birth(self, versions: dict[str, Any]) -> tuple[str, bytes]:
        self.seq += 1
        doc = {"device_id": self.device_id, "seq": self.seq, "ts": round(time.time(), 3)}
        doc.update(online=True, bd_seq=1, versions=versions)
        return self.prefix + "state", json.dumps(doc, separators=(",", ":")).encode()

    def window(self, kind: str, start: float, end: float) -> tuple[int, str, bytes]:
        self.seq += 1
        head = b'{"device_id":"%s","seq":%d,"ts":%.3f,"start":%.3f,"end":%.3f,' % (
            self.device_id.encode(), self.seq, time.time(), start, end,
        )  # fmt: skip
        return self.seq, self.prefix + kind, head + self.bodies[kind]


async def publish_window(
    link: MqttLink, tel: Telemetry, start: float, end: float, acks: Counter[int]
) -> None:
    """A window's summary and drift, both in flight at once; returns when both are acknowledged."""
    sent = [tel.window(kind, start, end) for kind in ("summary", "drift")]
    futures = [link.publish(topic, payload) for _, topic, payload in sent]
    for (seq, _, _), fut in zip(sent, futures, strict=True):
        code = await fut
        acks[code] += 1
        if code < 0x80:
            tel.sent.append(seq)


# -- a load process -------------------------------------------------------------------------


async def _seed(host: str, port: int, groups: list[str], device_id: str, etag: bool) -> dict[str, TufView]:
    """Each group's metadata fetched once, as a device that has run for a while holds it."""
    views = {}
    stats = PollStats()
    for group in sorted(set(groups)):
        conn = HttpConn(host, port)
        view = TufView()
        await poll(conn, view, device_id, group, stats, etag)
        await fetch_version(conn, view, stats, etag)
        conn.close()
        views[group] = view
    return views


def _view_for(seeds: dict[str, TufView], group: str) -> TufView:
    seed = seeds[group]
    return replace(seed, roles=dict(seed.roles))


async def _polls(spec: dict[str, Any]) -> dict[str, Any]:
    """Closed loop: `concurrency` connections, each polling for the next device, no pause."""
    host, port, etag = spec["hub_host"], spec["hub_port"], spec["etag"]
    devices: list[tuple[str, str]] = spec["devices"]
    seeds = await _seed(host, port, [g for _, g in devices], devices[0][0], etag)
    views = [_view_for(seeds, g) for _, g in devices]
    stats, window = PollStats(), PollStats()
    start, end = spec["start_at"], spec["end_at"]
    keep_alive = spec.get("keep_alive", True)

    async def loop(slot: int) -> None:
        conn = HttpConn(host, port)
        i = slot
        while time.monotonic() < end:
            device_id, group = devices[i % len(devices)]
            view = views[i % len(devices)]
            i += spec["concurrency"]
            t0 = time.perf_counter_ns()
            counted = window if time.monotonic() >= start else stats
            try:
                await poll(conn, view, device_id, group, counted, etag)
            except (WireError, OSError, TimeoutError) as exc:
                counted.errors[type(exc).__name__] += 1
                conn.close()
                continue
            if counted is window and time.monotonic() <= end:
                window.cycles += 1
                window.latencies_us.append((time.perf_counter_ns() - t0) // 1000)
            if not keep_alive:
                conn.close()
        conn.close()

    await asyncio.gather(*(loop(s) for s in range(spec["concurrency"])))
    return {
        "cycles": window.cycles,
        "requests": window.requests,
        "statuses": dict(window.statuses),
        "errors": dict(window.errors),
        "latencies_us": window.latencies_us,
    }


async def _connect_all(
    spec: dict[str, Any], devices: list[tuple[str, str]], errors: Counter[str]
) -> list[MqttLink | None]:
    gate = asyncio.Semaphore(spec.get("connect_concurrency", 100))

    async def one(device_id: str) -> MqttLink | None:
        async with gate:
            try:
                return await MqttLink.open(spec["mqtt_host"], spec["mqtt_port"], device_id)
            except (WireError, OSError, TimeoutError) as exc:
                errors[f"connect {type(exc).__name__}"] += 1
                return None

    return list(await asyncio.gather(*(one(d) for d, _ in devices)))


async def _ingest(spec: dict[str, Any]) -> dict[str, Any]:
    """Every device connects and is born, then publishes `windows` windows as fast as acked."""
    devices: list[tuple[str, str]] = spec["devices"]
    bodies = {k: v.encode() for k, v in spec["bodies"].items()}
    errors: Counter[str] = Counter()
    acks: Counter[int] = Counter()
    links = await _connect_all(spec, devices, errors)
    tels = [Telemetry(d, g, bodies) for d, g in devices]
    births = []
    for link, tel in zip(links, tels, strict=True):
        if link is not None:
            births.append(link.publish(*tel.birth(spec["versions"]), retain=True))
    for fut in births:
        acks[await fut] += 1
    spec["ready"].put(("ready", len([x for x in links if x])))
    await asyncio.sleep(max(0.0, spec["start_at"] - time.monotonic()))
    window_s = spec["window_s"]
    t_first = time.monotonic()

    async def device(link: MqttLink | None, tel: Telemetry) -> None:
        if link is None:
            return
        base = time.time() - spec["windows"] * window_s
        for w in range(spec["windows"]):
            try:
                await publish_window(link, tel, base + w * window_s, base + (w + 1) * window_s, acks)
            except WireError as exc:
                errors[str(exc)[:60]] += 1
                return

    await asyncio.gather(*(device(link, tel) for link, tel in zip(links, tels, strict=True)))
    t_last = time.monotonic()
    for link in links:
        if link is not None:
            link.close()
    return {
        "sent": {d: tel.sent for (d, _), tel in zip(devices, tels, strict=True)},
        "acks": {str(k): v for k, v in acks.items()},
        "errors": dict(errors),
        "t_first": t_first,
        "t_last": t_last,
    }


async def _propagation(spec: dict[str, Any]) -> dict[str, Any]:
    """Devices poll every `interval` (first at a random offset), publish a window every `window_s`
    (random phase); each records when it saw the new assignment and when it had the model."""
    host, port, etag = spec["hub_host"], spec["hub_port"], spec["etag"]
    devices: list[tuple[str, str]] = spec["devices"]
    interval, window_s, until = spec["interval"], spec["window_s"], spec["end_at"]
    seeds = await _seed(host, port, [g for _, g in devices], devices[0][0], etag)
    errors: Counter[str] = Counter()
    acks: Counter[int] = Counter()
    links: list[MqttLink | None] = [None] * len(devices)
    bodies = {k: v.encode() for k, v in spec["bodies"].items()}
    tels = [Telemetry(d, g, bodies) for d, g in devices]
    if spec["telemetry"]:
        links = await _connect_all(spec, devices, errors)
        births = [
            link.publish(*tel.birth(spec["versions"]), retain=True)
            for link, tel in zip(links, tels, strict=True)
            if link is not None
        ]
        for fut in births:
            acks[await fut] += 1
    stats = PollStats()
    seen: dict[str, float] = {}
    installed: dict[str, float] = {}
    target = spec["target_version"]
    rng = random.Random(spec["seed"])
    spec["ready"].put(("ready", len(devices)))
    begin = time.monotonic()
    poll_at: list[float] = []  # when each poll in latencies_us ended

    async def updates(i: int) -> None:
        device_id, group = devices[i]
        view = _view_for(seeds, group)
        await asyncio.sleep(rng.uniform(0, interval))
        while time.monotonic() < until and device_id not in installed:
            conn = HttpConn(host, port)  # uvicorn closes idle connections after 5 s
            t0 = time.perf_counter_ns()
            try:
                if await poll(conn, view, device_id, group, stats, etag) and view.assigned == target:
                    seen[device_id] = time.monotonic()
                    await fetch_version(conn, view, stats, etag)
                    installed[device_id] = time.monotonic()
                stats.cycles += 1
                stats.latencies_us.append((time.perf_counter_ns() - t0) // 1000)
                poll_at.append(time.monotonic())
            except (WireError, OSError, TimeoutError) as exc:
                errors[type(exc).__name__] += 1
            finally:
                conn.close()
            await asyncio.sleep(max(0.0, min(interval, until - time.monotonic())))

    async def telemetry(i: int) -> None:
        link, tel = links[i], tels[i]
        if link is None:
            return
        await asyncio.sleep(rng.uniform(0, window_s))
        while time.monotonic() < until:
            now = time.time()
            try:
                await publish_window(link, tel, now - window_s, now, acks)
            except WireError as exc:
                errors[str(exc)[:60]] += 1
                return
            await asyncio.sleep(max(0.0, min(window_s, until - time.monotonic())))

    publishers = [asyncio.ensure_future(telemetry(i)) for i in range(len(devices))]
    await asyncio.gather(*(updates(i) for i in range(len(devices))))
    for task in publishers:
        task.cancel()
    await asyncio.gather(*publishers, return_exceptions=True)
    for link in links:
        if link is not None:
            link.close()
    return {
        "begin": begin,
        "seen": seen,
        "installed": installed,
        "cycles": stats.cycles,
        "requests": stats.requests,
        "statuses": dict(stats.statuses),
        "latencies_us": stats.latencies_us,
        "poll_at": poll_at,
        "errors": dict(errors),
        "acks": {str(k): v for k, v in acks.items()},
        "windows_sent": sum(len(t.sent) for t in tels),
    }


PHASES = {"polls": _polls, "ingest": _ingest, "propagation": _propagation}


def run_worker(spec: dict[str, Any], results: Any) -> None:
    """A load process: one phase for its share of the devices; the result on `results`."""
    import uvloop

    before = resource.getrusage(resource.RUSAGE_SELF)
    try:
        result = uvloop.run(PHASES[spec["phase"]](spec))
    except BaseException as exc:  # reported to the orchestrator, which fails the run
        results.put(("error", f"{type(exc).__name__}: {exc}"))
        raise
    after = resource.getrusage(resource.RUSAGE_SELF)
    result["cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    results.put(("done", result))
