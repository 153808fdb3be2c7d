"""The load client: closed-loop HTTP/1.1 over Unix sockets, cheaper than what it measures.

Each connection sends one pre-built request (bytes made once), waits for the whole response and
sends the next at once (keep-alive, one request in flight per connection). The response is parsed
only as far as needed: the status code and Content-Length, so the client's cost per request is a
write, a read and a few byte searches, driven from asyncio protocol callbacks (uvloop when
installed) rather than coroutines. Latency is `perf_counter_ns` from the write to the last byte.

Load runs in child processes (spawned, so they share nothing with the orchestrator, whose main
thread stays free to sample the server or switch model versions during the load). Every process
gets the same time window on the system-wide monotonic clock that `perf_counter_ns` reads on
Linux, so their samples merge and line up with the orchestrator's timestamps. Requests that start
during warm-up are not recorded; those in flight at the end are awaited and recorded.

Errors are counted, never hidden: a status other than 200, a connection lost or refused, a
response the client cannot frame. Failed requests are left out of the latency figures.

`request_once` and `decode_infer_response` are the slow, complete path used outside the timed
loop: health checks, admin calls, and checking a sample answer against onnxruntime.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import socket
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

MAX_HEADER_BYTES = 64 * 1024
DRAIN_TIMEOUT_S = 10.0  # how long requests in flight at the end may take before they count as failed
READY_TIMEOUT_S = 60.0  # child processes start, import and connect within this


# --- requests ----------------------------------------------------------------------------------


def http_request(method: str, path: str, body: bytes = b"", content_type: str = "",
                 headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: localhost"]
    if content_type:
        lines.append(f"Content-Type: {content_type}")
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def json_infer_request(model: str, tensors: list[tuple[str, str, Any]]) -> bytes:
    """An OIP JSON inference request; tensors are (name, OIP datatype, numpy array).

    orjson writes each FP32 value in its shortest exact form -- what a client using a fast JSON
    library sends, and no longer than needed, so the JSON path is not made artificially heavy.
    """
    import orjson

    body = orjson.dumps(
        {"inputs": [
            {"name": name, "shape": list(arr.shape), "datatype": dt, "data": arr.ravel()}
            for name, dt, arr in tensors
        ]},
        option=orjson.OPT_SERIALIZE_NUMPY,
    )
    return http_request("POST", f"/v2/models/{model}/infer", body, "application/json")


def binary_infer_request(model: str, tensors: list[tuple[str, str, Any]],
                         binary_outputs: list[str]) -> bytes:
    """An inference request in Triton's binary tensor extension: JSON header, then raw tensors."""
    header = json.dumps({
        "inputs": [
            {"name": name, "shape": list(arr.shape), "datatype": dt,
             "parameters": {"binary_data_size": arr.nbytes}}
            for name, dt, arr in tensors
        ],
        "outputs": [{"name": n, "parameters": {"binary_data": True}} for n in binary_outputs],
    }, separators=(",", ":")).encode()
    body = header + b"".join(arr.tobytes() for _, _, arr in tensors)
    return http_request(
        "POST", f"/v2/models/{model}/infer", body, "application/octet-stream",
        {"Inference-Header-Content-Length": str(len(header))},
    )


@dataclass(frozen=True)
class RequestMix:
    """A workload of different requests instead of one: each connection walks `order` (from its own
    offset), where an entry is an index into `pool` (a request that repeats) or -1 (a request made
    unique: `template` with the number of a counter written over `width` bytes at `slot`).

    kind "digits": the slot holds ASCII `1.dddddd` (a JSON number; six decimals stay distinct as
    float32); kind "f32": four little-endian float32 bytes, 1 + n * 2**-23 (exact up to 2**23).
    The bytes are made as they are sent: one join per unique request, nothing per repeat.
    """

    pool: tuple[bytes, ...]
    order: tuple[int, ...]
    template: bytes
    slot: int
    kind: str = "digits"

    @property
    def width(self) -> int:
        return 8 if self.kind == "digits" else 4

    def value(self, n: int) -> bytes:
        if self.kind == "digits":
            return b"1.%06d" % (n % 1_000_000)
        import struct

        return struct.pack("<f", 1.0 + (n % (1 << 23)) * 2.0**-23)

    def unique(self, n: int) -> bytes:
        t = self.template
        return b"".join((t[: self.slot], self.value(n), t[self.slot + self.width :]))


# --- one request, fully parsed (outside the timed loop) ----------------------------------------


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class ClientError(Exception):
    """The server could not be reached or sent something that is not HTTP/1.1."""


def request_once(socket_path: str, raw: bytes, timeout: float = 30.0) -> Response:
    """Send one request on a new connection and read the whole response."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(socket_path)
            sock.sendall(raw)
            buf = b""
            while b"\r\n\r\n" not in buf:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ClientError("connection closed before the response headers")
                buf += chunk
            head, _, rest = buf.partition(b"\r\n\r\n")
            status_line, *header_lines = head.decode("latin-1").split("\r\n")
            status = int(status_line.split(" ", 2)[1])
            headers = {}
            for line in header_lines:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            if headers.get("transfer-encoding", "").lower() == "chunked":
                body = _read_chunked(sock, rest)
            else:
                length = int(headers.get("content-length", "0"))
                while len(rest) < length:
                    chunk = sock.recv(max(65536, length - len(rest)))
                    if not chunk:
                        raise ClientError("connection closed inside the response body")
                    rest += chunk
                body = rest[:length]
            return Response(status, headers, body)
    except (OSError, ValueError, IndexError) as exc:
        raise ClientError(f"{socket_path}: {exc}") from exc


def _read_chunked(sock: socket.socket, buf: bytes) -> bytes:
    body = b""
    while True:
        while b"\r\n" not in buf:
            buf += sock.recv(65536)
        size_line, _, buf = buf.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        while len(buf) < size + 2:
            chunk = sock.recv(65536)
            if not chunk:
                raise ClientError("connection closed inside a chunk")
            buf += chunk
        if size == 0:
            return body
        body += buf[:size]
        buf = buf[size + 2:]


OIP_NUMPY = {"FP32": "float32", "FP64": "float64", "INT64": "int64", "INT32": "int32",
             "INT8": "int8", "UINT8": "uint8", "BOOL": "bool"}


def decode_infer_response(resp: Response) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the response's JSON document, {output name: numpy array}), JSON or binary extension."""
    import numpy as np

    header_len = resp.headers.get("inference-header-content-length")
    if header_len is not None:
        n = int(header_len)
        doc, raw = json.loads(resp.body[:n]), memoryview(resp.body)[n:]
    else:
        doc, raw = json.loads(resp.body), memoryview(b"")
    arrays = {}
    offset = 0
    for out in doc["outputs"]:
        dtype = np.dtype(OIP_NUMPY[out["datatype"]])
        size = (out.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            arrays[out["name"]] = np.frombuffer(raw[offset:offset + size], dtype).reshape(
                out["shape"])
            offset += size
        else:
            arrays[out["name"]] = np.asarray(out["data"], dtype).reshape(out["shape"])
    if offset != len(raw):
        raise ClientError(f"binary response: {len(raw) - offset} bytes after the last output")
    return doc, arrays


# --- the load generator ------------------------------------------------------------------------


@dataclass
class LoadResult:
    connections: int
    processes: int
    duration_s: float
    starts_ns: Any  # numpy int64, one per successful request
    latencies_ns: Any  # numpy int64, same order
    errors: dict[str, int] = field(default_factory=dict)
    reconnects: int = 0
    client_cpu_s: float = 0.0

    @property
    def count(self) -> int:
        return len(self.latencies_ns)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def throughput(self) -> float:
        return self.count / self.duration_s

    @property
    def client_cores(self) -> float:
        return self.client_cpu_s / self.duration_s

    def percentile_us(self, q: float, start_ns: int | None = None, end_ns: int | None = None
                      ) -> float | None:
        import numpy as np

        lat = self.latencies_ns
        if start_ns is not None or end_ns is not None:
            lo = start_ns if start_ns is not None else -(2**62)
            hi = end_ns if end_ns is not None else 2**62
            lat = lat[(self.starts_ns >= lo) & (self.starts_ns < hi)]
        if len(lat) == 0:
            return None
        return float(np.percentile(lat, q)) / 1000.0

    def summary(self) -> dict[str, Any]:
        p = self.percentile_us
        return {
            "count": self.count, "errors": self.error_count, "error_kinds": self.errors,
            "reconnects": self.reconnects, "throughput_rps": self.throughput,
            "p50_us": p(50), "p90_us": p(90), "p99_us": p(99), "max_us": p(100),
            "connections": self.connections, "client_processes": self.processes,
            "client_cores": self.client_cores, "duration_s": self.duration_s,
        }


class _Worker:
    """One process's share of the connections, driven by protocol callbacks."""

    def __init__(self, socket_path: str, raw: bytes | RequestMix, index: int = 0) -> None:
        self.socket_path = socket_path
        self.raw = raw if isinstance(raw, bytes) else b""
        self.mix = raw if isinstance(raw, RequestMix) else None
        # Where this process starts in the mix's order, and its unique requests' first number:
        # processes never send the same "unique" request.
        self.step = index * 7919
        self.serial = index * 250_000
        self.measure_ns = 0
        self.end_ns = 0
        self.starts = array("q")
        self.lats = array("q")
        self.errors: Counter[str] = Counter()
        self.reconnects = 0
        self.live: set[_Conn] = set()

    def next_request(self) -> bytes:
        mix = self.mix
        assert mix is not None
        pick = mix.order[self.step % len(mix.order)]
        self.step += 1
        if pick >= 0:
            return mix.pool[pick]
        self.serial += 1
        return mix.unique(self.serial)

    def record(self, t0: int, t1: int, status: int) -> None:
        if t0 < self.measure_ns:
            return
        if status == 200:
            self.starts.append(t0)
            self.lats.append(t1 - t0)
        else:
            self.errors[f"status {status}"] += 1

    def record_error(self, t0: int, kind: str) -> None:
        if t0 >= self.measure_ns:
            self.errors[kind] += 1

    async def slot(self, first: _Conn | None) -> None:
        """Keep one connection busy until the end, reconnecting when the server closes it."""
        loop = asyncio.get_running_loop()
        conn = first
        while time.perf_counter_ns() < self.end_ns:
            if conn is None:
                try:
                    _, conn = await loop.create_unix_connection(
                        lambda: _Conn(self), self.socket_path)
                except OSError as exc:
                    self.record_error(time.perf_counter_ns(), f"connect: {exc.strerror or exc}")
                    await asyncio.sleep(0.005)
                    continue
                self.reconnects += 1
            conn.send()
            await conn.closed
            conn = None


class _Conn(asyncio.Protocol):
    def __init__(self, worker: _Worker) -> None:
        self.w = worker
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.need = -1  # total bytes of the response once its headers are parsed
        self.status = 0
        self.t0 = 0
        self.busy = False
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.w.live.add(self)

    def send(self) -> None:
        assert self.transport is not None
        self.busy = True
        w = self.w
        raw = w.raw if w.mix is None else w.next_request()
        self.t0 = time.perf_counter_ns()
        self.transport.write(raw)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if self.need < 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEADER_BYTES:
                    self._fail("response headers too large")
                return
            try:
                self.status = int(buf[9:12])
                head = bytes(buf[:end]).lower()
                i = head.find(b"\r\ncontent-length:")
                if i < 0:
                    self._fail("response without Content-Length (chunked is not supported)")
                    return
                j = head.find(b"\r\n", i + 2)
                self.need = end + 4 + int(head[i + 17:j if j > 0 else len(head)])
            except ValueError:
                self._fail("response is not HTTP/1.1")
                return
        if len(buf) < self.need:
            return
        t1 = time.perf_counter_ns()
        if len(buf) > self.need:
            self._fail("bytes after the response")
            return
        self.busy = False
        self.w.record(self.t0, t1, self.status)
        self.buf = bytearray()
        self.need = -1
        if t1 < self.w.end_ns:
            self.send()
        else:
            self.transport.close()  # type: ignore[union-attr]

    def _fail(self, kind: str) -> None:
        self.w.record_error(self.t0, kind)
        self.busy = False
        self.transport.close()  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        self.w.live.discard(self)
        if self.busy:
            self.busy = False
            self.w.record_error(self.t0, "connection lost")
        if not self.closed.done():
            self.closed.set_result(None)


def _child(pipe: Any, socket_path: str, raw: bytes | RequestMix, connections: int, index: int = 0) -> None:
    """A load process: connect, report ready, wait for the window, run it, send back samples."""
    try:
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    worker = _Worker(socket_path, raw, index)
    try:
        async def connect() -> list[_Conn]:
            conns = []
            for _ in range(connections):
                _, conn = await loop.create_unix_connection(lambda: _Conn(worker), socket_path)
                conns.append(conn)
            return conns

        conns = loop.run_until_complete(connect())
    except OSError as exc:
        pipe.send({"error": f"cannot connect to {socket_path}: {exc}"})
        return
    pipe.send({"ready": True})
    go = pipe.recv()
    if go is None:
        return
    worker.measure_ns, worker.end_ns = go["measure_ns"], go["end_ns"]

    def on_message() -> None:
        # The orchestrator may move the end of the window (e.g. once a version switch is over).
        try:
            msg = pipe.recv() if pipe.poll() else {"end_ns": worker.end_ns}
        except (EOFError, OSError):
            msg = None
        if msg is None:
            # The orchestrator gave up on this run (None, or it closed the pipe): stop now.
            loop.remove_reader(pipe.fileno())
            worker.end_ns = time.perf_counter_ns()
        else:
            worker.end_ns = msg["end_ns"]

    loop.add_reader(pipe.fileno(), on_message)

    async def run() -> float:
        slots = [asyncio.ensure_future(worker.slot(c)) for c in conns]
        await asyncio.sleep(max(0.0, (worker.measure_ns - time.perf_counter_ns()) / 1e9))
        cpu0 = time.process_time()
        while (left := worker.end_ns - time.perf_counter_ns()) > 0:
            await asyncio.sleep(min(left / 1e9, 0.05))
        cpu = time.process_time() - cpu0
        with contextlib.suppress(OSError, ValueError):
            loop.remove_reader(pipe.fileno())
        _, pending = await asyncio.wait(slots, timeout=DRAIN_TIMEOUT_S)
        for conn in list(worker.live):
            if conn.busy:
                conn.busy = False  # counted here, not again as "connection lost"
                worker.errors["timeout"] += 1
            if conn.transport is not None:
                conn.transport.abort()
        for task in pending:
            task.cancel()
        await asyncio.sleep(0)  # let the cancellations and aborts run
        return cpu

    cpu = loop.run_until_complete(run())
    loop.close()
    # The event loop made the pipe non-blocking for add_reader; a large result must be written
    # whole, so make it blocking again.
    with contextlib.suppress(OSError):  # the orchestrator may have stopped listening
        os.set_blocking(pipe.fileno(), True)
        pipe.send({
            "starts": worker.starts.tobytes(), "lats": worker.lats.tobytes(),
            "errors": dict(worker.errors), "reconnects": worker.reconnects, "cpu_s": cpu,
        })


class Load:
    """A load run in child processes; `start()` returns once requests flow, `join()` the result.

        with Load(sock, raw, connections=16, warmup_s=1, duration_s=5) as load:
            load.start()
            ...  # the orchestrator may act here; load.measure_ns / load.end_ns bound the window
            result = load.join()
    """

    def __init__(self, socket_path: str, raw: bytes | RequestMix, connections: int, warmup_s: float,
                 duration_s: float, processes: int = 1) -> None:
        self.socket_path = socket_path
        self.raw = raw
        self.connections = connections
        self.processes = max(1, min(processes, connections))
        self.warmup_s = warmup_s
        self.duration_s = duration_s
        self.measure_ns = 0
        self.end_ns = 0
        self._procs: list[Any] = []
        self._pipes: list[Any] = []

    def __enter__(self) -> Load:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        share = [self.connections // self.processes] * self.processes
        for i in range(self.connections % self.processes):
            share[i] += 1
        for index, n in enumerate(share):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_child, args=(child, self.socket_path, self.raw, n, index),
                               daemon=True)
            proc.start()
            child.close()
            self._procs.append(proc)
            self._pipes.append(parent)
        for pipe in self._pipes:
            try:
                if not pipe.poll(READY_TIMEOUT_S):
                    raise ClientError("a load process did not get ready in time")
                msg = pipe.recv()
            except (OSError, EOFError) as exc:
                raise ClientError(f"a load process failed to start: {exc!r}") from exc
            if "error" in msg:
                raise ClientError(msg["error"])
        now = time.perf_counter_ns()
        self.measure_ns = now + int(self.warmup_s * 1e9)
        self.end_ns = self.measure_ns + int(self.duration_s * 1e9)
        for pipe in self._pipes:
            pipe.send({"measure_ns": self.measure_ns, "end_ns": self.end_ns})

    def set_end(self, end_ns: int) -> None:
        """Move the end of the measured window (only before it has passed)."""
        self.end_ns = end_ns
        for pipe in self._pipes:
            pipe.send({"end_ns": end_ns})

    def join(self) -> LoadResult:
        import numpy as np

        wait_s = (self.end_ns - time.perf_counter_ns()) / 1e9 + DRAIN_TIMEOUT_S + 30
        starts, lats = [], []
        errors: Counter[str] = Counter()
        reconnects = 0
        cpu = 0.0
        for pipe in self._pipes:
            try:
                if not pipe.poll(max(1.0, wait_s)):
                    raise ClientError("a load process did not report its results in time")
                msg = pipe.recv()
            except (OSError, EOFError) as exc:
                raise ClientError(f"a load process failed: {exc}") from exc
            starts.append(np.frombuffer(msg["starts"], np.int64))
            lats.append(np.frombuffer(msg["lats"], np.int64))
            errors.update(msg["errors"])
            reconnects += msg["reconnects"]
            cpu += msg["cpu_s"]
        self.close()
        return LoadResult(
            connections=self.connections, processes=self.processes,
            duration_s=(self.end_ns - self.measure_ns) / 1e9,
            starts_ns=np.concatenate(starts), latencies_ns=np.concatenate(lats),
            errors=dict(errors), reconnects=reconnects, client_cpu_s=cpu,
        )

    def close(self) -> None:
        for pipe in self._pipes:
            with contextlib.suppress(OSError):
                pipe.send(None)  # releases a child still waiting for the window
            pipe.close()
        for proc in self._procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        self._procs, self._pipes = [], []


def run_load(socket_path: str, raw: bytes, connections: int, warmup_s: float,
             duration_s: float, processes: int = 1) -> LoadResult:
    with Load(socket_path, raw, connections, warmup_s, duration_s, processes) as load:
        load.start()
        return load.join()


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))
