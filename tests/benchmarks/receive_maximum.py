"""Does the broker hold to a subscriber's MQTT v5 Receive Maximum? (docs/benchmarks.md, "Fleet scale")

    python -m tests.benchmarks.receive_maximum [--receive-maximum 50] [--messages 3000] [--no-ack]

The hub's fleet consumer bounds its in-memory queue by asking the broker for a Receive Maximum of
half the queue (hub.fleet.consumer), and drops (and acknowledges) what does not fit. This starts a
Mosquitto (tests/support/broker.py), connects a raw MQTT v5 subscriber (no paho: CONNECT with the
Receive Maximum property, SUBSCRIBE at QoS 1, PUBACKs written by hand) that acknowledges what it
holds every 50 ms, publishes `--messages` QoS 1 messages to it, and prints the most messages it
ever held unacknowledged. A broker that keeps to the limit never sends more than it.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

from tests.benchmarks.fleet_wire import MqttLink, _string, _varint
from tests.support.broker import Mosquitto

TOPIC = "outpost/v1/g/d/summary"


class Subscriber(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = bytearray()
        self.transport: Any = None
        self.unacked: list[int] = []
        self.received = 0
        self.peak = 0
        self.suback: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while len(self.buf) >= 2:
            length, shift, i = 0, 0, 1
            while True:
                if i >= len(self.buf):
                    return
                byte = self.buf[i]
                length |= (byte & 0x7F) << shift
                i += 1
                if not byte & 0x80:
                    break
                shift += 7
            if len(self.buf) < i + length:
                return
            kind, body = self.buf[0] >> 4, bytes(self.buf[i : i + length])
            del self.buf[: i + length]
            if kind == 9 and not self.suback.done():  # SUBACK
                self.suback.set_result(body)
            elif kind == 3:  # PUBLISH at QoS 1: topic, packet id
                (topic_len,) = struct.unpack("!H", body[:2])
                (packet_id,) = struct.unpack("!H", body[2 + topic_len : 4 + topic_len])
                self.unacked.append(packet_id)
                self.received += 1
                self.peak = max(self.peak, len(self.unacked))

    def connect(self, receive_maximum: int) -> None:
        props = b"\x21" + struct.pack("!H", receive_maximum)  # property 0x21: Receive Maximum
        variable = _string("MQTT") + bytes([5, 0x02]) + struct.pack("!H", 0) + _varint(len(props)) + props
        body = variable + _string("receive-maximum-check")
        self.transport.write(b"\x10" + _varint(len(body)) + body)

    def subscribe(self, topic_filter: str) -> None:
        body = struct.pack("!H", 1) + b"\x00" + _string(topic_filter) + b"\x01"  # no props, QoS 1
        self.transport.write(b"\x82" + _varint(len(body)) + body)

    def ack_all(self) -> None:
        held, self.unacked = self.unacked, []
        for packet_id in held:
            self.transport.write(b"\x40\x02" + struct.pack("!H", packet_id))


async def check(
    port: int, receive_maximum: int, messages: int, ack: bool, topic_filter: str
) -> tuple[int, int]:
    loop = asyncio.get_running_loop()
    sub = Subscriber()
    await loop.create_connection(lambda: sub, "127.0.0.1", port)
    sub.connect(receive_maximum)
    await asyncio.sleep(0.2)
    sub.subscribe(topic_filter)
    await asyncio.wait_for(sub.suback, 10)

    async def acker() -> None:
        while True:
            await asyncio.sleep(0.05)
            sub.ack_all()

    task = asyncio.ensure_future(acker()) if ack else None
    publisher = await MqttLink.open("127.0.0.1", port, "receive-maximum-publisher")
    await asyncio.gather(*(publisher.publish(TOPIC, b"x") for _ in range(messages)))
    await asyncio.sleep(3)
    if task is not None:
        task.cancel()
    publisher.close()
    sub.transport.close()
    return sub.received, sub.peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--receive-maximum", type=int, default=50)
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument(
        "--no-ack", action="store_true", help="never acknowledge (the broker must stop at the limit)"
    )
    ap.add_argument("--filter", default="$share/outpost-hub/outpost/v1/#")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="outpost-rm-"))
    broker = Mosquitto(
        work,
        config=lambda m: (
            f"listener {m.port} 127.0.0.1\nallow_anonymous true\n"
            f"log_dest file {m.log_path}\nmax_queued_messages 1000000\n"
        ),
    ).start()
    try:
        received, peak = asyncio.run(
            check(broker.port, args.receive_maximum, args.messages, not args.no_ack, args.filter)
        )
    finally:
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)
    verdict = "kept" if peak <= args.receive_maximum else "OVERRUN"
    print(
        f"Receive Maximum {args.receive_maximum} on {args.filter}, "
        f"{'acknowledging every 50 ms' if not args.no_ack else 'never acknowledging'}: "
        f"received {received}, at most {peak} unacknowledged at once: {verdict}"
    )


if __name__ == "__main__":
    main()
