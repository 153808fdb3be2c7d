"""Inference over MQTT: Open Inference Protocol requests through a local broker (MQTT v5 request/response).

    request  {prefix}/models/{model}/infer                      payload: the OIP v2 request, as for
             {prefix}/models/{model}/versions/{version}/infer   POST /v2/models/{m}[/versions/{v}]/infer
             properties: Response Topic (required), Correlation Data (echoed), and the user property
             Inference-Header-Content-Length for binary tensors (Triton's extension)
    answer   published to the request's Response Topic, Correlation Data echoed byte for byte;
             the OIP response JSON, or {"error": "...", "status": 400|404|413|500|503}; the user
             property `status` carries the same code

Every request goes through `App.infer`, the socket's own path: the same validation, batching,
prediction ids, metrics and monitoring. At most `max_inflight` requests are being answered at once;
one more gets the 503 answer `busy` at once, so nothing queues without bound. A request without a
response topic cannot be answered: it is counted (`no_response_topic`) and dropped.

Threads: paho's network thread (`loop_start`) runs the callbacks, which only hand what they saw to
the event loop (`call_soon_threadsafe`). Everything else runs on the loop thread: the in-flight
count, the inference, and every paho call that sends (subscribe, publish, unsubscribe), so one
thread publishes and the counters need no lock. paho is imported in `start()`, only when the
feature is on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.config import MqttInferenceConfig
from agent.errors import AgentError, ConfigError
from agent.serving.http import Deferred, Response
from agent.serving.mqtt_messages import answer_of, error_payload, header_length_of, infer_route, subscriptions

if TYPE_CHECKING:
    import paho.mqtt.client as paho
    from paho.mqtt.properties import Properties
    from paho.mqtt.reasoncodes import ReasonCode
    from prometheus_client.metrics_core import Metric

    from agent.serving.app import App

log = logging.getLogger(__name__)

_STOP_POLL_S = 0.01
_JSON = "application/json"
_BINARY = "application/octet-stream"


@dataclass(slots=True)
class Counters:
    """What happened to the requests since start; on the loop thread only."""

    requests: int = 0  # messages received on the request topics
    answered: int = 0  # 200 answers
    errors: int = 0  # error answers, busy ones included
    busy: int = 0  # 503 "busy": max_inflight requests were being answered already
    no_response_topic: int = 0  # dropped: nowhere to answer
    not_sent: int = 0  # answers paho refused to queue (the connection was gone and its queue full)
    connections: int = 0  # successful connections to the broker (reconnects included)


# -- the adapter -------------------------------------------------------------------------------


class MqttInference:
    """Answers inference requests from a local broker through `app`.

    `start()` (on the loop) connects in the background, subscribing at each (re)connection;
    `stop(deadline)` unsubscribes, waits for the requests in flight until `deadline` (monotonic),
    and disconnects. `status()` and `collect()` (Prometheus) read the counters.
    """

    def __init__(self, config: MqttInferenceConfig, device_id: str, group: str, app: App) -> None:
        self.config = config
        self.prefix = config.prefix_for(device_id, group)
        self.client_id = f"outpost-infer-{device_id}"
        self._app = app
        self.counters = Counters()
        self.inflight = 0
        self.connected = False
        self.subscribed = False
        self.last_error = ""
        self._stopping = False
        self._warned_no_response_topic = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: paho.Client | None = None
        self._unacked: list[paho.MQTTMessageInfo] = []  # QoS > 0 answers not yet acknowledged
        self._sub_mid: int | None = None
        self._password = ""
        if config.password_file:
            try:
                self._password = Path(config.password_file).read_text().strip()
            except OSError as exc:
                raise ConfigError(
                    f"mqtt_inference.password_file: cannot read {config.password_file} ({exc.strerror})"
                ) from exc

    # -- the paho adapter (paho's thread: hand over, nothing else) ------------------------------

    def _make_client(self) -> paho.Client:
        import ssl

        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        from agent.telemetry.messages import parse_broker_url

        cfg = self.config
        try:
            self._address = parse_broker_url(cfg.url)
        except ValueError as exc:
            raise ConfigError(f"mqtt_inference.url: {exc}") from exc
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=paho.MQTTv5,
            reconnect_on_failure=True,
        )
        if cfg.username:
            client.username_pw_set(cfg.username, self._password or None)
        if self._address.tls or cfg.ca_file:
            try:
                client.tls_set(
                    ca_certs=cfg.ca_file or None,
                    cert_reqs=ssl.CERT_REQUIRED,
                    tls_version=ssl.PROTOCOL_TLS_CLIENT,
                )
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"mqtt_inference.ca_file: cannot load it ({exc})") from exc
        # paho takes ints in its annotations; it only compares, doubles and sleeps on them.
        client.reconnect_delay_set(cfg.reconnect_min_s, cfg.reconnect_max_s)  # type: ignore[arg-type]
        # Answers wait in paho's memory while the connection is down; bounded (unlimited by default).
        client.max_queued_messages_set(4 * cfg.max_inflight + 64)
        client.enable_logger(logging.getLogger(__name__ + ".paho"))
        client.on_socket_open = _no_delay
        client.on_connect = self._cb_connect
        client.on_connect_fail = self._cb_connect_fail
        client.on_disconnect = self._cb_disconnect
        client.on_subscribe = self._cb_subscribe
        client.on_message = self._cb_message
        return client

    def _hand_over(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed in between: the agent stopped
            loop.call_soon_threadsafe(fn, *args)

    def _cb_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._hand_over(self._on_connect, reason.is_failure, str(reason))

    def _cb_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        self._hand_over(self._on_connect_fail)

    def _cb_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._hand_over(self._on_disconnect, str(reason), reason.value != 0)

    def _cb_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        self._hand_over(self._on_subscribed, mid, [str(r) for r in reasons if r.is_failure])

    def _cb_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        props = msg.properties
        response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        user = getattr(props, "UserProperty", None) if props is not None else None
        self._hand_over(
            self._on_request, msg.topic, bytes(msg.payload), response_topic, correlation, user or []
        )

    # -- the loop thread ---------------------------------------------------------------------

    def _on_connect(self, failed: bool, reason: str) -> None:
        if failed:
            self.last_error = f"the broker refused the connection: {reason}"
            log.warning("inference over MQTT: %s", self.last_error)
            return
        self.connected = True
        self.counters.connections += 1
        self.last_error = ""
        log.info(
            "inference over MQTT: connected to %s; requests on %s/models/...", self.config.url, self.prefix
        )
        if self._stopping or self._client is None:
            return
        # A clean start each time: the broker forgets the subscriptions with the connection.
        qos = self.config.qos
        rc, mid = self._client.subscribe([(topic, qos) for topic in subscriptions(self.prefix)])
        if rc == 0:
            self._sub_mid = mid
        else:
            self.last_error = f"could not subscribe (paho error {rc})"

    def _on_connect_fail(self) -> None:
        self.last_error = f"cannot connect to {self.config.url}; retrying"

    def _on_disconnect(self, reason: str, unexpected: bool) -> None:
        was = self.connected
        self.connected = self.subscribed = False
        if unexpected:
            self.last_error = f"disconnected: {reason}"
            if was and not self._stopping:
                log.warning("inference over MQTT: disconnected from %s (%s)", self.config.url, reason)

    def _on_subscribed(self, mid: int, failures: list[str]) -> None:
        if mid != self._sub_mid:
            return
        if failures:
            self.last_error = f"the broker refused the subscriptions: {', '.join(failures)}"
            log.error("inference over MQTT: %s", self.last_error)
            return
        self.subscribed = True

    def _on_request(
        self,
        topic: str,
        payload: bytes,
        response_topic: str | None,
        correlation: bytes | None,
        user: list[tuple[str, str]],
    ) -> None:
        counters = self.counters
        counters.requests += 1
        if not response_topic:
            counters.no_response_topic += 1
            if not self._warned_no_response_topic:  # once: a misbehaving app must not flood the log
                self._warned_no_response_topic = True
                log.warning(
                    "inference over MQTT: a request on %s has no response topic; dropped "
                    "(such requests are counted in status, no_response_topic)",
                    topic,
                )
            return
        reply = _Reply(self, response_topic, correlation)
        if self._stopping:
            reply.error(503, "the agent is stopping")
            return
        route = infer_route(self.prefix, topic)
        if route is None:
            reply.error(404, f"not an inference topic: {topic}")
            return
        if len(payload) > self.config.max_payload_bytes:
            reply.error(
                413,
                f"the request has {len(payload)} bytes; mqtt_inference.max_payload_bytes is "
                f"{self.config.max_payload_bytes}",
            )
            return
        if self.inflight >= self.config.max_inflight:
            counters.busy += 1
            reply.error(503, "busy")
            return
        try:
            header_length = header_length_of(user)
            result = self._app.infer(route[0], route[1], payload, header_length)
        except ValueError as exc:
            reply.error(400, str(exc))
            return
        except AgentError as exc:
            reply.error(getattr(exc, "status", 500), str(exc))
            return
        except Exception:
            log.exception("inference over MQTT: the request on %s failed", topic)
            reply.error(500, "internal error; see the agent's log")
            return
        if isinstance(result, Deferred):
            self.inflight += 1
            reply.deferred = result
            result.when_ready(reply.done)
        else:
            reply.send(result)

    def publish(
        self, topic: str, payload: bytes, correlation: bytes | None, status: int, header_length: int | None
    ) -> None:
        """Send one answer (loop thread). Counted in `not_sent` when paho cannot take it."""
        from paho.mqtt.enums import MQTTErrorCode
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        client = self._client
        if client is None:
            self.counters.not_sent += 1
            return
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        if correlation is not None:
            props.CorrelationData = correlation
        props.ContentType = _JSON if header_length is None else _BINARY
        user = [("status", str(status))]
        if header_length is not None:
            user.append(("Inference-Header-Content-Length", str(header_length)))
        props.UserProperty = user
        try:
            info = client.publish(topic, payload, qos=self.config.qos, properties=props)
        except ValueError as exc:  # a response topic paho refuses (wildcards, too long)
            self.counters.not_sent += 1
            log.warning("inference over MQTT: cannot answer on %r: %s", topic[:200], exc)
            return
        if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            if self.config.qos > 0:
                if len(self._unacked) > 64:
                    self._unacked = [i for i in self._unacked if not _acknowledged(i)]
                self._unacked.append(info)
            return
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and self.config.qos > 0:
            return  # kept in paho's (bounded) queue and sent once the connection is back
        # QoS 0 without a connection, or paho's queue is full: this answer is gone.
        self.counters.not_sent += 1
        log.warning("inference over MQTT: an answer on %s was not sent (paho error %d)", topic, info.rc)

    # -- the API ------------------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background (on the event loop's thread); returns at once."""
        if self._client is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._client = self._make_client()
        self._client.connect_async(
            self._address.host, self._address.port, keepalive=self.config.keepalive_s, clean_start=True
        )
        self._client.loop_start()

    async def stop(self, deadline: float) -> None:
        """Take no more requests, finish those in flight (until `deadline`, time.monotonic()),
        wait for their answers' acknowledgements, disconnect. Idempotent."""
        client = self._client
        self._stopping = True
        if client is None:
            return
        if self.connected:
            client.unsubscribe(subscriptions(self.prefix))
        while self.inflight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(_STOP_POLL_S)
        if self.inflight:
            log.warning("inference over MQTT: stopping with %d request(s) unanswered", self.inflight)
        # At least a moment for the last answers' PUBACKs, even past a spent deadline.
        ack_deadline = max(deadline, time.monotonic() + 1.0)
        while self.connected and time.monotonic() < ack_deadline:
            if all(_acknowledged(i) for i in self._unacked):
                break
            await asyncio.sleep(_STOP_POLL_S)
        self._client = None
        client.disconnect()
        await asyncio.get_running_loop().run_in_executor(None, client.loop_stop)
        self.connected = self.subscribed = False

    def status(self) -> dict[str, Any]:
        c = self.counters
        return {
            "enabled": True,
            "url": self.config.url,
            "topic_prefix": self.prefix,
            "connected": self.connected,
            "subscribed": self.subscribed,
            "inflight": self.inflight,
            "max_inflight": self.config.max_inflight,
            "requests": c.requests,
            "answered": c.answered,
            "errors": c.errors,
            "busy": c.busy,
            "no_response_topic": c.no_response_topic,
            "not_sent": c.not_sent,
            "connections": c.connections,
            "last_error": self.last_error,
        }

    def collect(self) -> Iterator[Metric]:
        """Prometheus metric families (for agent.metrics; prometheus_client is loaded by then)."""
        from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

        c = self.counters
        yield GaugeMetricFamily(
            "outpost_mqtt_inference_connected",
            "1 when connected to the inference broker",
            value=self.connected,
        )
        yield GaugeMetricFamily(
            "outpost_mqtt_inference_inflight", "MQTT inference requests being answered", value=self.inflight
        )
        for name, doc, value in (
            ("requests", "MQTT inference requests received", c.requests),
            ("answered", "MQTT inference requests answered with a prediction", c.answered),
            ("errors", "MQTT inference requests answered with an error (busy included)", c.errors),
            ("busy", "MQTT inference requests refused as busy (max_inflight reached)", c.busy),
            ("dropped", "MQTT inference requests dropped: no response topic", c.no_response_topic),
            ("not_sent", "MQTT inference answers paho could not queue", c.not_sent),
        ):
            yield CounterMetricFamily(f"outpost_mqtt_inference_{name}", doc, value=value)


def _no_delay(client: paho.Client, userdata: Any, sock: Any) -> None:
    # paho leaves Nagle's algorithm on. A request's PUBACK and then its answer are two small writes:
    # the answer would wait for the broker's delayed ACK, ~40 ms per request on Linux.
    with contextlib.suppress(OSError, AttributeError):  # not a TCP socket (a test double)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _acknowledged(info: paho.MQTTMessageInfo) -> bool:
    try:
        return info.is_published()
    except (ValueError, RuntimeError):  # paho gave up on it: nothing more to wait for
        return True


class _Reply:
    """Where one request's answer goes; sends it once."""

    __slots__ = ("correlation", "deferred", "owner", "topic")

    def __init__(self, owner: MqttInference, topic: str, correlation: bytes | None) -> None:
        self.owner = owner
        self.topic = topic
        self.correlation = correlation
        self.deferred: Deferred | None = None

    def error(self, status: int, message: str) -> None:
        self.owner.counters.errors += 1
        self.owner.publish(self.topic, error_payload(status, message), self.correlation, status, None)

    def send(self, response: Response) -> None:
        counters = self.owner.counters
        if response.status == 200:
            counters.answered += 1
        else:
            counters.errors += 1
        payload, header_length = answer_of(response)
        self.owner.publish(self.topic, payload, self.correlation, response.status, header_length)

    def done(self) -> None:
        assert self.deferred is not None and self.deferred.response is not None
        self.owner.inflight -= 1
        self.send(self.deferred.response)


__all__ = ["Counters", "MqttInference"]
