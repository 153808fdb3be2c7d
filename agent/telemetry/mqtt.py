"""The MQTT adapter: paho-mqtt 2.x (MQTT v5) behind one small class, and the outbox's publisher.

Threads, and who does what:

- paho's network thread (`loop_start`) runs the callbacks. They only record facts (connected,
  disconnected, which message ids the broker acknowledged, the last error), wake the
  publisher, and hand commands to `on_command`. They never publish: paho is not meant to be
  published to from its own callbacks, and a callback that blocks stalls keep-alives.
  The one exception is `on_pre_connect`, which sets the next connection's last will (and
  persists its `bd_seq`): the will must be in place before the CONNECT packet is built.
- the publisher thread is the only thread that calls paho's `publish`/`subscribe`. On each new
  connection it subscribes to `cmd`, publishes the birth (`state`, retained, with `bd_seq`)
  and reports outbox drops, then drains the outbox oldest first, up to `max_inflight`
  messages awaiting PUBACK; a message is deleted from the outbox only after its PUBACK.
  A thread rather than an asyncio task: paho, its PUBACK waits and SQLite all block, and the
  client then works the same with or without an event loop (the daemon's loop stays free).
- any thread may call `publish()` (it only writes to the outbox and wakes the publisher),
  `rebirth()` and `status()`.

At least once: a message can be sent twice (a PUBACK lost with the connection, a crash
between PUBACK and the outbox delete); the hub drops duplicates by (device_id, seq).

Unheard messages stay: a PUBACK "No matching subscribers" (reason 16, MQTT 5) means the broker
took the message and gave it to nobody. That happens after a broker restart, before the hub has
subscribed again: a shared subscription (`$share/outpost-hub/...`) of a disconnected hub queues
nothing in Mosquitto. Such a message is kept in the outbox and sent again after a pause (1 s,
doubling to 30 s, reset when a message is heard), so telemetry made while the hub was away
reaches it once it is back. A broker with no hub at all therefore keeps the outbox full, within
its bounds (the oldest go first), which is what a store-and-forward buffer is for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

from agent.config import MqttConfig
from agent.errors import ConfigError, OutboxError
from agent.telemetry import messages
from agent.telemetry.messages import Command
from agent.telemetry.outbox import Outbox

if TYPE_CHECKING:
    # paho is imported when a broker is configured (`_make_client`): a device that only buffers
    # its telemetry on disk does not pay its memory.
    import paho.mqtt.client as paho
    from paho.mqtt.properties import Properties
    from paho.mqtt.reasoncodes import ReasonCode

log = logging.getLogger(__name__)

STATE_QOS = 1
_POLL_S = 0.1  # how often a wait re-checks for a disconnect or a stop
_IDLE_S = 1.0  # the publisher's sleep with nothing to do (expiry, missed wake-ups)
NO_MATCHING_SUBSCRIBERS = 16  # the PUBACK reason code of a message nobody received
_UNHEARD_RETRY_S = (1.0, 30.0)  # the pause before sending unheard messages again, doubling


def on_loop(loop: asyncio.AbstractEventLoop, handler: Callable[[Command], None]) -> Callable[[Command], None]:
    """An `on_command` that runs `handler` on `loop` (commands arrive on paho's thread)."""

    def hand_off(command: Command) -> None:
        loop.call_soon_threadsafe(handler, command)

    return hand_off


class TelemetryClient:
    """Publishes the device's telemetry through its outbox; receives its commands.

    `start()` connects in the background (or does nothing but buffer when `config.url` is
    empty); `publish()` stores a message durably and returns its seq; `stop()` publishes the
    death state and disconnects. `on_command` is called on paho's network thread and must
    not block: hand the command off (`on_loop(loop, handler)`).
    """

    def __init__(
        self,
        config: MqttConfig,
        device_id: str,
        group: str,
        outbox: Outbox,
        on_command: Callable[[Command], None] | None = None,
        state_fields: Callable[[], Mapping[str, Any]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.device_id = device_id
        self.group = group
        self._outbox = outbox
        self._on_command = on_command
        self._state_fields = state_fields
        self._clock = clock
        try:
            messages.topic_prefix(group, device_id)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        self._state_topic = messages.state_topic(group, device_id)
        self._cmd_topic = messages.cmd_topic(group, device_id)

        self._lock = threading.Lock()  # guards the fields below, written by paho's thread
        self._connected = False
        self._conn_gen = 0  # +1 per successful connection
        self._pending_bd_seq = 0  # bd_seq of the will set for the connection being attempted
        self._bd_seq = 0  # bd_seq of the current connection (its will and birth)
        self._last_error = ""
        self._rejected_mids: dict[int, ReasonCode] = {}
        self._unheard_mids: set[int] = set()
        self._unheard_total = 0  # PUBACKs "no matching subscribers" (each message is kept, resent)
        self._hold_until = 0.0  # no outbox message is sent before this (monotonic)
        self._hold_s = _UNHEARD_RETRY_S[0]
        self._rebirth = False
        self._rejected_total = 0

        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._publisher: threading.Thread | None = None
        # seq -> (paho's handle, when it was sent or its connection came up)
        self._inflight: dict[int, tuple[paho.MQTTMessageInfo, float]] = {}
        self._stop_timeout = 5.0
        self._stop_deadline = 0.0
        self._paho = self._make_client() if config.url else None

    # -- the paho adapter -------------------------------------------------------------------

    def _make_client(self) -> paho.Client:
        import ssl

        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        cfg = self.config
        try:
            address = messages.parse_broker_url(cfg.url)
        except ValueError as exc:
            raise ConfigError(f"mqtt.url: {exc}") from exc
        self._address = address
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"outpost-{self.device_id}",
            protocol=paho.MQTTv5,
            reconnect_on_failure=True,
        )
        if cfg.username:
            client.username_pw_set(cfg.username, cfg.password or None)
        if address.tls or cfg.ca_file or cfg.cert_file:
            try:
                client.tls_set(
                    ca_certs=cfg.ca_file or None,
                    certfile=cfg.cert_file or None,
                    keyfile=cfg.key_file or None,
                    cert_reqs=ssl.CERT_REQUIRED,
                    tls_version=ssl.PROTOCOL_TLS_CLIENT,
                )
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"mqtt.ca_file/cert_file/key_file: cannot load the TLS files ({exc})"
                ) from exc
            client.tls_insecure_set(cfg.tls_insecure)
        # paho takes ints in its annotations; it only compares, doubles and sleeps on them.
        client.reconnect_delay_set(cfg.reconnect_min_s, cfg.reconnect_max_s)  # type: ignore[arg-type]
        client.max_inflight_messages_set(cfg.max_inflight)
        # paho's memory queue is unlimited by default; ours holds one window, the messages of a
        # window cut by a disconnect (paho re-sends them after reconnecting) and the state messages.
        client.max_queued_messages_set(2 * cfg.max_inflight + 8)
        client.enable_logger(logging.getLogger(__name__ + ".paho"))
        client.on_pre_connect = self._cb_pre_connect
        client.on_connect = self._cb_connect
        client.on_connect_fail = self._cb_connect_fail
        client.on_disconnect = self._cb_disconnect
        client.on_publish = self._cb_publish
        client.on_message = self._cb_message
        return client

    def _cb_pre_connect(self, client: paho.Client, userdata: Any) -> None:
        # Sparkplug's bdSeq: one number per connection attempt, persisted, in the will and the birth.
        try:
            bd_seq = self._outbox.next_bd_seq()
            seq = self._outbox.reserve_seq()
        except OutboxError as exc:
            # Cannot persist: keep counting in memory so this process's births still increase.
            log.error("telemetry: %s", exc)
            with self._lock:
                self._last_error = str(exc)
                bd_seq, seq = self._pending_bd_seq + 1, 0
        will = messages.envelope(
            "state", self.device_id, self.group, seq, self._clock(), messages.state_body(False, bd_seq)
        )[1]
        client.will_set(self._state_topic, will, qos=STATE_QOS, retain=True)
        with self._lock:
            self._pending_bd_seq = bd_seq

    def _cb_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._lock:
            if reason.is_failure:
                self._last_error = f"the broker refused the connection: {reason}"
                log.warning("telemetry: %s", self._last_error)
                return
            self._connected = True
            self._conn_gen += 1
            self._bd_seq = self._pending_bd_seq
            self._last_error = ""
        log.info("telemetry: connected to %s (bd_seq %d)", self.config.url, self._bd_seq)
        self._wake.set()

    def _cb_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        with self._lock:
            self._last_error = f"cannot connect to {self.config.url}"

    def _cb_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._lock:
            was = self._connected
            self._connected = False
            if reason.value != 0:  # 0: a DISCONNECT we asked for
                self._last_error = f"disconnected: {reason}"
        if was and not self._stopping.is_set():
            log.warning("telemetry: disconnected from %s (%s); buffering on disk", self.config.url, reason)
        self._wake.set()

    def _cb_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode, properties: Properties
    ) -> None:
        # Runs before paho marks the message published, so the publisher sees this first.
        if reason.is_failure:
            with self._lock:
                self._rejected_mids[mid] = reason
        elif reason.value == NO_MATCHING_SUBSCRIBERS:
            with self._lock:
                self._unheard_mids.add(mid)

    def _cb_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        command = messages.parse_command(bytes(msg.payload))
        if command is None:
            log.warning("telemetry: ignored a malformed command on %s: %r", msg.topic, msg.payload[:200])
            return
        if command.command == "rebirth":
            self.rebirth()
            return
        if self._on_command is None:
            log.info("telemetry: no handler for command %r", command.command)
            return
        try:
            self._on_command(command)
        except Exception:
            log.exception("telemetry: the command handler failed on %r", command)

    # -- the publisher thread -----------------------------------------------------------------

    def _session(self) -> tuple[bool, int]:
        with self._lock:
            return self._connected, self._conn_gen

    def _alive(self, gen: int) -> bool:
        return self._session() == (True, gen)

    def _send(self, topic: str, payload: bytes, qos: int, retain: bool) -> paho.MQTTMessageInfo | None:
        assert self._paho is not None
        if threading.current_thread() is not self._publisher:
            raise RuntimeError("telemetry: only the publisher thread may publish to paho")
        info = self._paho.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != 0:  # MQTTErrorCode.MQTT_ERR_SUCCESS
            # NO_CONN (lost the connection just now) or QUEUE_SIZE: the outbox keeps it, try later.
            return None
        return info

    def _result(self, info: paho.MQTTMessageInfo) -> Literal["acked", "unheard", "rejected", "lost"] | None:
        """`acked` (PUBACK), `unheard` (PUBACK "no matching subscribers"), `rejected` (PUBACK with a
        failure code), `lost` (paho gave up), None: pending."""
        try:
            if not info.is_published():
                return None
        except (ValueError, RuntimeError):
            return "lost"
        with self._lock:
            reason = self._rejected_mids.pop(info.mid, None)
            unheard = info.mid in self._unheard_mids
            self._unheard_mids.discard(info.mid)
        if unheard:
            return "unheard"
        if reason is not None:
            log.error("telemetry: the broker refused a message (%s)", reason)
            return "rejected"
        return "acked"

    def _await(self, info: paho.MQTTMessageInfo, gen: int, timeout: float, stopping: bool = False) -> bool:
        """Wait for one PUBACK while connection `gen` lasts: at most `timeout`, and (unless `stopping`)
        only until stop() is called."""
        deadline = time.monotonic() + timeout
        while True:
            result = self._result(info)
            if result is not None:
                return result in ("acked", "unheard")  # the broker has it (a state is retained)
            if not self._alive(gen) or time.monotonic() > deadline:
                return False
            if self._stopping.is_set() and not stopping:
                return False
            try:
                info.wait_for_publish(_POLL_S)
            except (ValueError, RuntimeError):
                return False

    def _publish_now(
        self, kind: str, body: Mapping[str, Any], gen: int, retain: bool, timeout: float
    ) -> bool:
        """A message that does not go through the outbox (state, drop reports): now or never."""
        seq = self._outbox.reserve_seq()
        topic, payload = messages.envelope(kind, self.device_id, self.group, seq, self._clock(), body)
        info = self._send(topic, payload, STATE_QOS, retain)
        return info is not None and self._await(info, gen, timeout, stopping=self._stopping.is_set())

    def _birth(self, gen: int) -> bool:
        with self._lock:
            bd_seq = self._bd_seq
            self._rebirth = False
        try:
            fields = dict(self._state_fields()) if self._state_fields else {}
        except Exception:
            log.exception("telemetry: state_fields() failed; birth without them")
            fields = {}
        counters = self._outbox.counters()
        fields["telemetry"] = {k: counters[k] for k in ("queued", "dropped_total", "expired_total")}
        body = messages.state_body(True, bd_seq, fields)
        return self._publish_now("state", body, gen, retain=True, timeout=self.config.publish_timeout_s)

    def _report_losses(self, gen: int) -> None:
        c = self._outbox.counters()
        lost = c["dropped_total"] + c["expired_total"]
        if lost <= c["reported_lost"]:
            return
        body = {
            "event": "telemetry_dropped",
            "dropped_total": c["dropped_total"],  # the outbox was full: the oldest went
            "expired_total": c["expired_total"],  # older than mqtt.outbox_max_age_s
            "unreported": lost - c["reported_lost"],
        }
        if self._publish_now("event", body, gen, retain=False, timeout=self.config.publish_timeout_s):
            self._outbox.mark_reported(lost)

    def _start_session(self, gen: int) -> bool:
        assert self._paho is not None
        now = time.monotonic()
        # paho re-sends what was in flight when the last connection dropped; give it time again.
        self._inflight = {seq: (info, now) for seq, (info, _) in self._inflight.items()}
        # Commands are orders for now: a retained one must not re-run at every reconnect.
        from paho.mqtt.subscribeoptions import SubscribeOptions

        options = SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND)
        self._paho.subscribe(self._cmd_topic, options=options)
        if not self._birth(gen):
            return False
        self._report_losses(gen)
        return True

    def _drain(self, gen: int, deadline: float | None = None) -> None:
        """Send what the outbox holds while connected; with a deadline (at stop), until then even
        though stopping, so that what was stored last (a closing window) goes out with a clean stop."""
        cfg = self.config
        while self._alive(gen) and (
            not self._stopping.is_set() if deadline is None else time.monotonic() < deadline
        ):
            if time.monotonic() < self._hold_until:  # the last messages were unheard: pause
                return
            with self._lock:
                if self._rebirth:
                    return
            batch = self._outbox.peek(cfg.max_inflight)
            if not batch and not self._inflight:
                return
            now = time.monotonic()
            for m in batch:
                if len(self._inflight) >= cfg.max_inflight:
                    break
                if m.seq in self._inflight:
                    continue
                info = self._send(m.topic, m.payload, m.qos, m.retain)
                if info is None:
                    break
                self._inflight[m.seq] = (info, now)
            if not self._inflight:  # nothing could be sent: wait for a reconnect or a wake-up
                return
            # Wait a little for the oldest, then collect every result there is.
            oldest = next(iter(self._inflight.values()))[0]
            with contextlib.suppress(ValueError, RuntimeError):  # seen again in _result below
                oldest.wait_for_publish(_POLL_S)
            delivered: list[int] = []
            unheard = 0
            for seq, (info, sent) in list(self._inflight.items()):
                result = self._result(info)
                if result is None:
                    if time.monotonic() - sent > cfg.publish_timeout_s:
                        del self._inflight[seq]  # paho lost it: send it again
                    continue
                del self._inflight[seq]
                if result == "acked":
                    delivered.append(seq)
                elif result == "unheard":
                    unheard += 1  # kept in the outbox, sent again after the pause
                elif result == "rejected":
                    # The broker answered with a failure (e.g. not authorized): it would refuse it
                    # again, and keeping it would block the queue for good.
                    log.error("telemetry: message seq %d dropped", seq)
                    with self._lock:
                        self._rejected_total += 1
                    delivered.append(seq)
                # "lost": still in the outbox; sent again on the next pass
            if delivered:
                self._outbox.ack(delivered)
            if unheard:
                with self._lock:
                    self._unheard_total += unheard
                if self._hold_s == _UNHEARD_RETRY_S[0]:
                    log.warning(
                        "telemetry: no subscriber took %d message(s) (is the hub connected?); "
                        "kept, sending again in %.0f s",
                        unheard,
                        self._hold_s,
                    )
                self._hold_until = time.monotonic() + self._hold_s
                self._hold_s = min(self._hold_s * 2, _UNHEARD_RETRY_S[1])
                return
            if delivered:
                self._hold_s = _UNHEARD_RETRY_S[0]

    def _run(self) -> None:
        done_gen = 0  # the connection whose birth went out
        while True:
            self._wake.wait(_IDLE_S)
            self._wake.clear()
            connected, gen = self._session()
            if self._stopping.is_set():
                # One budget for the whole stop (the outbox, then the offline state), so the agent's
                # stop stays inside the unit's TimeoutStopSec with the request drain before it.
                self._stop_deadline = time.monotonic() + self._stop_timeout
                if connected and gen == done_gen:
                    try:
                        self._drain(gen, deadline=time.monotonic() + self._stop_timeout / 2)
                    except Exception as exc:  # stopping goes on: the outbox keeps what is left
                        log.warning("telemetry: could not send the outbox at stop (%s)", exc)
                break
            if not connected:
                continue
            try:
                with self._lock:
                    rebirth = self._rebirth
                if gen != done_gen or rebirth:
                    born = self._start_session(gen) if gen != done_gen else self._birth(gen)
                    if not born and not self._alive(gen):
                        continue  # the connection dropped: the next one starts over
                    done_gen = gen
                self._drain(gen)
                if self._outbox_pending():
                    # _drain returned with work left: a rebirth to do, paho refused to queue more
                    # (a full window cut by a disconnect), or a pause after unheard messages.
                    # Come back soon (or when the pause ends), without spinning.
                    held = self._hold_until - time.monotonic()
                    self._stopping.wait(min(max(_POLL_S, held), _IDLE_S))
                    self._wake.set()
            except OutboxError as exc:
                self._error(exc)
                time.sleep(_IDLE_S)
            except Exception as exc:  # the thread must survive; the next wake-up retries
                log.exception("telemetry: publisher failed")
                self._error(exc)
                time.sleep(_IDLE_S)
        self._death(done_gen)

    def _outbox_pending(self) -> bool:
        with self._lock:
            if self._rebirth:
                return True
        return bool(self._inflight) or bool(self._outbox.peek(1))

    def _error(self, exc: BaseException) -> None:
        with self._lock:
            self._last_error = str(exc)

    def _death(self, gen: int) -> None:
        if gen == 0 or not self._alive(gen):
            return
        with self._lock:
            bd_seq = self._bd_seq
        try:
            left = max(0.5, self._stop_deadline - time.monotonic())
            if not self._publish_now(
                "state", messages.state_body(False, bd_seq), gen, retain=True, timeout=left
            ):
                log.warning("telemetry: the offline state was not acknowledged; the broker's will covers it")
        except Exception as exc:
            log.warning("telemetry: could not publish the offline state (%s)", exc)

    # -- the API ----------------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background; returns at once. Without a broker URL, only buffers."""
        if self._paho is None or self._publisher is not None:
            return
        self._publisher = threading.Thread(
            target=self._run, name=f"outpost-telemetry-{self.device_id}", daemon=True
        )
        self._publisher.start()
        self._paho.connect_async(
            self._address.host,
            self._address.port,
            keepalive=self.config.keepalive_s,
            clean_start=True,
        )
        self._paho.loop_start()

    def publish(self, kind: str, body: Mapping[str, Any]) -> int:
        """Store a `summary`, `drift`, `event` or `capture` message in the outbox; returns its seq.

        Durable on return (OutboxError if the disk refuses it); sent when connected.
        """
        if kind not in messages.PUBLISHED_KINDS:
            raise ValueError(
                f"cannot publish {kind!r}; expected one of {', '.join(messages.PUBLISHED_KINDS)}"
            )
        ts = self._clock()
        topic = messages.topic(kind, self.group, self.device_id)

        def build(seq: int) -> bytes:
            return messages.envelope(kind, self.device_id, self.group, seq, ts, body)[1]

        seq = self._outbox.put(topic, build, qos=self.config.qos, retain=False)
        self._wake.set()
        return seq

    def queued_bytes(self, kind: str) -> int:
        """Bytes of `kind` messages waiting in the outbox (agent.monitor.capture keeps to its share)."""
        return self._outbox.queued_bytes(kind)

    def rebirth(self) -> None:
        """Publish the `state` again (same bd_seq), e.g. after the model versions changed."""
        with self._lock:
            self._rebirth = True
        self._wake.set()

    def status(self) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = {
                "enabled": self._paho is not None,
                "connected": self._connected,
                "bd_seq": self._bd_seq,
                "last_error": self._last_error,
                "rejected": self._rejected_total,
                "unheard": self._unheard_total,
            }
        try:
            c = self._outbox.counters()
            out.update(queued=c["queued"], dropped=c["dropped_total"], expired=c["expired_total"])
        except OutboxError as exc:
            out.update(queued=None, dropped=None, expired=None, last_error=str(exc))
        return out

    def stop(self, timeout: float = 5.0) -> None:
        """Publish the offline state (when connected), disconnect, stop the threads. Idempotent."""
        self._stop_timeout = timeout
        self._stopping.set()
        self._wake.set()
        if self._publisher is not None:
            self._publisher.join(timeout + 2 * _IDLE_S)
            if self._publisher.is_alive():
                log.warning("telemetry: the publisher thread did not stop in time")
        if self._paho is not None:
            self._paho.disconnect()
            self._paho.loop_stop()
        with self._lock:
            self._connected = False

    def __enter__(self) -> TelemetryClient:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
