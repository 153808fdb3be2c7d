"""The hub's MQTT fleet consumer: paho-mqtt 2.x (MQTT 5) in, the fleet tables out.

Threads: paho's network thread runs the callbacks, which only enqueue the topic and payload;
one worker thread takes batches off the queue, parses them and writes each batch in one
transaction. The database never blocks the network thread. The queue holds payloads as bytes,
not parsed: a backlog of tens of thousands of parsed bodies (hundreds of objects each) made
the garbage collector's full passes most of the hub's CPU in make bench-fleet's ingest.

Subscriptions (one SUBSCRIBE on every connect, so a reconnect restores them):
- `$share/outpost-hub/outpost/v1/#` at QoS 1: the broker spreads devices' messages across
  every hub worker that subscribes with the same share name (Mosquitto 2, EMQX, HiveMQ,
  VerneMQ); each message goes to one of them.
- `outpost/v1/+/+/state` at QoS 1, not shared: retained messages are never sent to shared
  subscriptions, and the retained state is how a hub that starts learns which devices are
  online. Every worker therefore also sees every live state (twice on the worker the shared
  subscription picked); applying a state again changes nothing (see `hub.fleet.rules`).

Delivery: QoS 1 with manual acknowledgement. A message is acknowledged only after the
transaction that stored it committed, so a hub that dies with messages in its queue gets
them again from the broker (its session persists for `session_expiry_s` under a stable
client id) and the (device, seq) dedupe stores them once. The broker sends at most
`receive_maximum` unacknowledged messages, which should bound the queue for QoS 1 traffic;
Mosquitto 2.0 does not keep to it once acknowledgements flow (tests/benchmarks/receive_maximum.py
shows thousands in flight at a maximum of 50), so the queue (`queue_size`) can still fill. Then
the network thread waits for room (backpressure: the broker holds the rest in the hub's session)
instead of dropping anything it would have to acknowledge; `stats["backpressure"]` counts the
messages that waited. A wait long enough to miss keep-alives makes the broker drop the
connection: the messages not yet acknowledged come again on the next one, and the (device, seq)
dedupe stores them once. At stop, a message still waiting is left unacknowledged for the
session (`stats["deferred"]`). QoS 0 messages (none of the devices' telemetry) are dropped when
the queue is full and counted (`stats["dropped"]`). While the database cannot be written, the worker
keeps its batch and retries with backoff; a batch that fails for any other reason (a message
the database refuses) is retried one message at a time, and the messages that still fail are
dropped, acknowledged and counted (`stats["failed"]`), so one bad message cannot wedge the
stream.

Stopping: the consumer waits (bounded) until what is queued is stored and acknowledged, then
disconnects; its session keeps anything that arrives later for the next start.

Messages received on a connection that has since dropped are stored but not acknowledged
(their packet ids mean nothing on the new connection); the broker redelivers them.
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from hub.errors import HubError, RegistryError
from hub.fleet.batch import Prepared, prepare
from hub.fleet.rules import SHARED_FILTER, STATE_FILTER, Invalid, cmd_topic, parse_message
from hub.fleet.store import ApplyReport, FleetStore

log = logging.getLogger("outpost-hub.fleet")

DEFAULT_QUEUE_SIZE = 10_000
DEFAULT_BATCH_SIZE = 500
DEFAULT_SESSION_EXPIRY_S = 3600
KEEPALIVE_S = 30
RETRY_MAX_S = 10.0
PUBLISH_TIMEOUT_S = 10.0


class FleetConfigError(HubError):
    """The MQTT URL or the consumer's settings are unusable."""


class FleetUnavailable(HubError):
    """The hub cannot reach the devices right now: no MQTT, or the broker is not connected."""

    status = 503


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise FleetConfigError(f"MQTT URL {url!r}: expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")
        tls = parts.scheme == "mqtts"
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError:
            raise FleetConfigError(f"MQTT URL {url!r}: bad port") from None
        user = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password else None
        return cls(parts.hostname, port, tls, user, password)


@dataclass(frozen=True)
class _Item:
    topic: str
    payload: bytes
    retained: bool
    mid: int
    qos: int
    generation: int


class FleetConsumer:
    def __init__(
        self,
        store: FleetStore,
        url: str,
        client_id: str,
        *,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        batch_size: int = DEFAULT_BATCH_SIZE,
        session_expiry_s: int = DEFAULT_SESSION_EXPIRY_S,
    ) -> None:
        if queue_size < 1 or batch_size < 1:
            raise FleetConfigError("queue_size and batch_size must be at least 1")
        self.store = store
        self.address = BrokerAddress.parse(url)
        self.client_id = client_id
        self.batch_size = batch_size
        self.session_expiry_s = session_expiry_s
        self._queue: queue.Queue[_Item] = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self._closing = threading.Event()  # stop() has begun: a message waiting for room gives up
        self._worker: threading.Thread | None = None
        self._publish_lock = threading.Lock()
        self._generation = 0
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.stats: Counter[str] = Counter()
        self._client = self._make_client(queue_size)

    def _make_client(self, queue_size: int) -> mqtt.Client:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            manual_ack=True,
        )
        if self.address.tls:
            client.tls_set(cert_reqs=ssl.CERT_REQUIRED)
        if self.address.username is not None:
            client.username_pw_set(self.address.username, self.address.password)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self._receive_maximum = max(1, min(queue_size // 2, 65535))
        return client

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.session_expiry_s
        props.ReceiveMaximum = self._receive_maximum
        self._worker = threading.Thread(target=self._run_worker, name="fleet-writer", daemon=True)
        self._worker.start()
        # connect_async: a broker that is down at start is retried by paho's loop, not fatal.
        self._client.connect_async(
            self.address.host, self.address.port, keepalive=KEEPALIVE_S, clean_start=False, properties=props
        )
        self._client.loop_start()
        log.info(
            "fleet: consuming MQTT from %s:%d as %s", self.address.host, self.address.port, self.client_id
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Store and acknowledge what is queued, then disconnect (bounded by `timeout`)."""
        deadline = time.monotonic() + timeout
        self._closing.set()
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.02)
        self._client.disconnect()
        self._client.loop_stop()
        self._stop.set()
        if self._worker is not None:
            self._worker.join(max(0.1, deadline - time.monotonic()))
            if self._worker.is_alive():
                log.warning("fleet: the writer did not finish within %.0f s", timeout)
        log.info("fleet: stopped (%s)", ", ".join(f"{k} {v}" for k, v in sorted(self.stats.items())))

    # -- paho callbacks (network thread: parse and enqueue only) ------------------------------

    def _on_connect(
        self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: ReasonCode, _props: Any
    ) -> None:
        if reason.is_failure:
            log.warning("fleet: broker refused the connection: %s", reason)
            return
        self._generation += 1
        self.connected.set()
        client.subscribe([(SHARED_FILTER, SubscribeOptions(qos=1)), (STATE_FILTER, SubscribeOptions(qos=1))])

    def _on_subscribe(
        self, _client: mqtt.Client, _userdata: Any, _mid: int, reasons: list[ReasonCode], _props: Any
    ) -> None:
        failed = [str(r) for r in reasons if r.is_failure]
        if failed:
            log.error("fleet: the broker refused a subscription: %s", ", ".join(failed))
            return
        log.info("fleet: subscribed to %s and %s", SHARED_FILTER, STATE_FILTER)
        self.subscribed.set()

    def _on_disconnect(
        self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: ReasonCode, _props: Any
    ) -> None:
        self.connected.clear()
        self.subscribed.clear()
        if not self._stop.is_set() and reason.is_failure:
            log.warning("fleet: disconnected from the broker (%s); reconnecting", reason)

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.stats["received"] += 1
        payload, retained = bytes(message.payload), bool(message.retain)
        item = _Item(message.topic, payload, retained, message.mid, message.qos, self._generation)
        try:
            self._queue.put_nowait(item)
            return
        except queue.Full:
            pass
        if item.qos == 0:  # nothing to acknowledge, nothing the broker would send again
            self.stats["dropped"] += 1
            if self.stats["dropped"] == 1 or self.stats["dropped"] % 1000 == 0:
                log.warning("fleet: queue full, dropped %d QoS 0 messages so far", self.stats["dropped"])
            return
        self.stats["backpressure"] += 1
        if self.stats["backpressure"] == 1 or self.stats["backpressure"] % 1000 == 0:
            log.warning(
                "fleet: the database writer is behind (queue of %d full): waiting for room "
                "(%d messages so far)", self._queue.maxsize, self.stats["backpressure"],
            )  # fmt: skip
        while not self._closing.is_set():
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue
        self.stats["deferred"] += 1  # unacknowledged: the broker sends it again to the session

    def _ack(self, client: mqtt.Client, item: _Item) -> None:
        if item.qos > 0 and item.generation == self._generation:
            client.ack(item.mid, item.qos)

    # -- the writer ---------------------------------------------------------------------------

    def _take_batch(self) -> list[_Item]:
        try:
            first = self._queue.get(timeout=0.2)
        except queue.Empty:
            return []
        batch = [first]
        while len(batch) < self.batch_size:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _run_worker(self) -> None:
        while not (self._stop.is_set() and self._queue.empty()):
            batch = self._take_batch()
            if batch:
                self._write(batch)

    def _parse(self, item: _Item) -> Prepared | None:
        """The message's rows to store; None for one to acknowledge only (ours, or invalid:
        counted). The parsed body is dropped here unless the store needs it (prepare)."""
        try:
            parsed = parse_message(item.topic, item.payload)
        except Invalid as exc:
            self.stats["invalid"] += 1
            if self.stats["invalid"] <= 10 or self.stats["invalid"] % 1000 == 0:
                log.warning("fleet: ignored a message (%d so far): %s", self.stats["invalid"], exc)
            return None
        return None if parsed is None else prepare(parsed, item.retained)

    def _write(self, batch: list[_Item]) -> None:
        parsed = [(item, self._parse(item)) for item in batch]
        try:
            self._store(parsed)
        except RegistryError:  # the database cannot be used: only stopping gives up
            self.stats["lost_at_shutdown"] += len(batch)
        except Exception:
            log.exception("fleet: a batch of %d failed; storing its messages one by one", len(batch))
            for item, incoming in parsed:
                try:
                    self._store([(item, incoming)])
                except RegistryError:
                    self.stats["lost_at_shutdown"] += 1
                except Exception as exc:
                    self.stats["failed"] += 1
                    log.error("fleet: dropped a message the database refuses (%s): %s", exc, incoming)
                    self._ack(self._client, item)
        finally:
            for _ in batch:
                self._queue.task_done()

    def _store(self, batch: list[tuple[_Item, Prepared | None]]) -> None:
        """Apply and acknowledge; while the database is unusable, retry with backoff."""
        delay = 0.5
        incoming = [i for _item, i in batch if i is not None]
        while True:
            try:
                report = self.store.apply(incoming) if incoming else ApplyReport()
                break
            except RegistryError:
                if self._stop.is_set():
                    log.exception("fleet: could not store %d messages at shutdown", len(batch))
                    raise
                log.exception("fleet: storing %d messages failed; retrying in %.1f s", len(batch), delay)
                time.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
        for key in ("stored", "duplicates", "too_old", "states_applied", "states_ignored", "pruned"):
            self.stats[key] += getattr(report, key)
        for item, _incoming in batch:
            self._ack(self._client, item)

    # -- commands to devices ------------------------------------------------------------------

    def publish_command(self, group: str, device_id: str, command: dict[str, Any]) -> None:
        """Publish to the device's cmd topic at QoS 1 and wait until the broker has it."""
        import json

        if not self.connected.is_set():
            raise FleetUnavailable("the hub is not connected to the MQTT broker right now")
        with self._publish_lock:
            info = self._client.publish(cmd_topic(group, device_id), json.dumps(command), qos=1)
        info.wait_for_publish(PUBLISH_TIMEOUT_S)
        if not info.is_published():
            raise FleetUnavailable("the broker did not acknowledge the command in time")
