"""The simulated fleet's two wires, kept minimal so thousands of devices fit in one process.

- `MqttLink`: MQTT v5 over asyncio, only what a device's telemetry needs: CONNECT (clean start,
  no keep-alive, so no PINGREQ timers), PUBLISH at QoS 1 (optionally retained), PUBACK, and
  DISCONNECT. paho runs a thread and a socket loop per client, which at ten thousand clients per
  process would cost more than the hub it loads; gmqtt/aiomqtt each keep a task and timers per
  client. This is one asyncio Protocol per connection and a dict of pending packet ids.
- `HttpConn`: HTTP/1.1 GET on one keep-alive connection (asyncio streams), returning the
  status, the ETag and the body. Enough for the static TUF files the hub serves.

Neither retries nor reconnects: a failure is counted by the caller, never hidden.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass
from typing import Any


class WireError(Exception):
    """A connection failed or the peer answered something the simulator does not accept."""


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(s: str) -> bytes:
    raw = s.encode()
    return struct.pack("!H", len(raw)) + raw


def connect_packet(client_id: str) -> bytes:
    # protocol name, level 5, flags: clean start; keep-alive 0 (off); no properties
    variable = _string("MQTT") + bytes([5, 0x02]) + struct.pack("!H", 0) + _varint(0)
    body = variable + _string(client_id)
    return b"\x10" + _varint(len(body)) + body


def publish_packet(topic: str, payload: bytes, packet_id: int, retain: bool = False) -> bytes:
    body = _string(topic) + struct.pack("!H", packet_id) + b"\x00" + payload
    return bytes([0x32 | (1 if retain else 0)]) + _varint(len(body)) + body


class MqttLink(asyncio.Protocol):
    """One device's MQTT connection: `publish` returns when the broker's PUBACK arrives."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._transport: Any = None
        self._connack: asyncio.Future[int] | None = None
        self._pending: dict[int, asyncio.Future[int]] = {}
        self._next_id = 0
        self.closed = False

    @classmethod
    async def open(cls, host: str, port: int, client_id: str, timeout: float = 30.0) -> MqttLink:
        loop = asyncio.get_running_loop()
        link = cls()
        link._connack = loop.create_future()
        transport, _ = await asyncio.wait_for(loop.create_connection(lambda: link, host, port), timeout)
        link._transport = transport  # uvloop's transports are not asyncio.Transport subclasses
        transport.write(connect_packet(client_id))
        code = await asyncio.wait_for(link._connack, timeout)
        if code != 0:
            link.close()
            raise WireError(f"CONNACK reason {code} for {client_id}")
        return link

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> asyncio.Future[int]:
        """A future of the PUBACK's reason code (0 success, 16 no matching subscribers)."""
        if self._transport is None or self.closed:
            raise WireError("the MQTT connection is closed")
        self._next_id = self._next_id % 65535 + 1
        while self._next_id in self._pending:
            self._next_id = self._next_id % 65535 + 1
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending[self._next_id] = fut
        self._transport.write(publish_packet(topic, payload, self._next_id, retain))
        return fut

    def close(self) -> None:
        if self._transport is not None and not self.closed:
            self._transport.write(b"\xe0\x00")
            self._transport.close()
        self.closed = True

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        error = WireError(f"MQTT connection lost: {exc}")
        for fut in [self._connack, *self._pending.values()]:
            if fut is not None and not fut.done():
                fut.set_exception(error)
        self._pending.clear()

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        while len(buf) >= 2:
            length, shift, i = 0, 0, 1
            while True:
                if i >= len(buf):
                    return
                byte = buf[i]
                length |= (byte & 0x7F) << shift
                i += 1
                if not byte & 0x80:
                    break
                shift += 7
            if len(buf) < i + length:
                return
            kind, body = buf[0] >> 4, bytes(buf[i : i + length])
            del buf[: i + length]
            if kind == 2 and self._connack is not None and not self._connack.done():  # CONNACK
                self._connack.set_result(body[1] if len(body) > 1 else 0)
            elif kind == 4:  # PUBACK: packet id, reason code (absent: success)
                (packet_id,) = struct.unpack("!H", body[:2])
                fut = self._pending.pop(packet_id, None)
                if fut is not None and not fut.done():
                    fut.set_result(body[2] if len(body) > 2 else 0)


@dataclass(frozen=True)
class HttpAnswer:
    status: int
    etag: str | None
    body: bytes


class HttpConn:
    """GETs on one keep-alive HTTP/1.1 connection to `host:port`, opened on first use."""

    def __init__(self, host: str, port: int, timeout: float = 30.0) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.opened = 0  # connections made (each reconnect after the server closed one counts)

    async def get(self, path: str, if_none_match: str | None = None) -> HttpAnswer:
        return await asyncio.wait_for(self._get(path, if_none_match), self.timeout)

    async def _get(self, path: str, if_none_match: str | None) -> HttpAnswer:
        for attempt in (1, 2):
            if self._writer is None:
                self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
                self.opened += 1
            assert self._reader is not None and self._writer is not None
            head = f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\nUser-Agent: outpost-fleet-sim\r\n"
            if if_none_match:
                head += f"If-None-Match: {if_none_match}\r\n"
            self._writer.write((head + "Accept-Encoding: identity\r\n\r\n").encode())
            try:
                raw = await self._reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                # The server closed an idle keep-alive connection: once more on a new one.
                self.close()
                if attempt == 2:
                    raise WireError(f"GET {path}: the connection closed") from None
                continue
            lines = raw.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            headers = {}
            for line in lines[1:]:
                key, _, value = line.partition(":")
                headers[key.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            body = await self._reader.readexactly(length) if length else b""
            if headers.get("connection", "").lower() == "close":
                self.close()
            return HttpAnswer(status, headers.get("etag"), body)
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None
