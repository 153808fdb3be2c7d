"""agent.telemetry.mqtt against a real Mosquitto (tests/support/broker.py), on loopback.

Birth/will/death with bd_seq (a kill -9 of a real process), store-and-forward across a
broker outage and an agent restart, the outbox bounds, commands, and the rule that only
the publisher thread publishes.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import MqttConfig
from agent.telemetry import Command, Outbox, TelemetryClient
from tests.support.broker import Mosquitto, mosquitto_available

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed (make sysdeps)"),
    pytest.mark.timeout(60),
]

ROOT = Path(__file__).parents[2]


def config(url: str, **kw: Any) -> MqttConfig:
    return MqttConfig(url=url, reconnect_min_s=0.1, reconnect_max_s=0.5, publish_timeout_s=5.0, **kw)


def wait_for(pred: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class Subscriber:
    """A test-side paho client that records what arrives on `topic`."""

    def __init__(self, broker: Mosquitto, topic: str, client_id: str = "", persistent: bool = False) -> None:
        self.topic = topic
        self.messages: list[tuple[str, dict[str, Any], bool]] = []
        self._lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.subscribed.set()
        self.client.on_message = self._on_message
        props = None
        if persistent:  # the broker keeps the session (and queues QoS 1 messages) while we are away
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 300
        self.client.connect("127.0.0.1", broker.port, clean_start=not persistent, properties=props)
        self.client.loop_start()
        assert self.subscribed.wait(10), "subscription not acknowledged"

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, json.loads(msg.payload), bool(msg.retain)))

    def bodies(self, suffix: str = "") -> list[dict[str, Any]]:
        with self._lock:
            return [m for t, m, _ in self.messages if t.endswith(suffix)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    b = Mosquitto(tmp_path / "broker").start()
    yield b
    b.kill()


@pytest.fixture
def cleanup() -> Iterator[list[Callable[[], None]]]:
    todo: list[Callable[[], None]] = []
    yield todo
    for fn in reversed(todo):
        fn()


AGENT = textwrap.dedent(
    """
    import sys, time
    from agent.config import MqttConfig
    from agent.telemetry import Outbox, TelemetryClient
    url, path = sys.argv[1], sys.argv[2]
    box = Outbox(path)
    cfg = MqttConfig(url=url, reconnect_min_s=0.1, reconnect_max_s=0.5, keepalive_s=5)
    client = TelemetryClient(cfg, "dev-k", "g", box, state_fields=lambda: {"versions": {"wine": 3}})
    client.start()
    while True:
        time.sleep(1)
    """
)


def test_birth_retained_will_on_kill_and_a_higher_bd_seq_after_restart(
    broker: Mosquitto, tmp_path: Path, cleanup: list[Callable[[], None]]
) -> None:
    sub = Subscriber(broker, "outpost/v1/g/dev-k/state")
    cleanup.append(sub.close)
    procs: list[subprocess.Popen[bytes]] = []

    def agent() -> subprocess.Popen[bytes]:
        p = subprocess.Popen([sys.executable, "-c", AGENT, broker.url, str(tmp_path / "o.db")], cwd=ROOT)
        procs.append(p)
        return p

    def reap() -> None:
        for p in procs:
            p.kill()
            p.wait(10)

    cleanup.append(reap)

    first = agent()
    birth = wait_for(lambda: next((m for m in sub.bodies() if m["online"]), None), "the birth")
    assert birth["device_id"] == "dev-k" and birth["versions"] == {"wine": 3}
    assert isinstance(birth["seq"], int) and isinstance(birth["ts"], float)
    bd1 = birth["bd_seq"]

    # Retained: a subscriber that comes later still sees the device online.
    late = Subscriber(broker, "outpost/v1/g/dev-k/state")
    cleanup.append(late.close)
    retained = wait_for(lambda: late.messages, "the retained state")
    assert retained[0][2] is True and retained[0][1]["online"] and retained[0][1]["bd_seq"] == bd1

    os.kill(first.pid, signal.SIGKILL)  # no DISCONNECT: the broker publishes the will
    first.wait(10)
    will = wait_for(lambda: next((m for m in sub.bodies() if not m["online"]), None), "the will")
    assert will["bd_seq"] == bd1 and will["device_id"] == "dev-k"

    agent()
    reborn = wait_for(
        lambda: next((m for m in sub.bodies() if m["online"] and m["bd_seq"] > bd1), None), "the rebirth"
    )
    assert reborn["seq"] > birth["seq"]  # seq continues across the restart too


def test_clean_stop_publishes_death_with_the_same_bd_seq(
    broker: Mosquitto, tmp_path: Path, cleanup: list[Callable[[], None]]
) -> None:
    sub = Subscriber(broker, "outpost/v1/g/dev-s/state")
    cleanup.append(sub.close)
    box = Outbox(tmp_path / "o.db")
    cleanup.append(box.close)
    client = TelemetryClient(config(broker.url), "dev-s", "g", box)
    client.start()
    birth = wait_for(sub.bodies, "the birth")[0]
    assert birth["online"] and client.status()["connected"]
    client.stop()
    death = wait_for(lambda: [m for m in sub.bodies() if not m["online"]], "the death")
    assert death == [{"device_id": "dev-s", "seq": death[0]["seq"], "ts": death[0]["ts"],
                      "online": False, "bd_seq": birth["bd_seq"]}]  # fmt: skip
    assert not client.status()["connected"]
    client.stop()  # idempotent


def test_store_and_forward_across_a_broker_outage_and_an_agent_restart(
    tmp_path: Path, cleanup: list[Callable[[], None]]
) -> None:
    broker = Mosquitto(tmp_path / "broker", persistence=True).start()
    cleanup.append(broker.kill)
    # A persistent session: the broker queues what arrives for it while it is away.
    sub = Subscriber(broker, "outpost/v1/g/dev-f/summary", client_id="test-sub", persistent=True)
    sub.close()
    broker.stop()  # saves the session; the broker is down from here on

    path = tmp_path / "o.db"
    seqs: list[int] = []
    for part in range(2):  # the agent restarts half-way, with everything still queued
        box = Outbox(path)
        client = TelemetryClient(config(broker.url), "dev-f", "g", box)
        client.start()
        seqs += [client.publish("summary", {"i": part * 25 + i}) for i in range(25)]
        time.sleep(0.3)  # a few connection attempts fail meanwhile
        status = client.status()
        assert status["connected"] is False and status["queued"] == len(seqs)
        assert "cannot connect" in status["last_error"]
        if part == 0:
            client.stop()
            box.close()
    cleanup.append(box.close)
    cleanup.append(client.stop)
    assert seqs == sorted(set(seqs)) and seqs[25] > seqs[24]  # continues after the restart

    broker.start()
    wait_for(lambda: client.status()["queued"] == 0, "the outbox to drain", timeout=15)
    assert client.status()["connected"]

    sub = Subscriber(broker, "outpost/v1/g/dev-f/summary", client_id="test-sub", persistent=True)
    cleanup.append(sub.close)
    got = wait_for(lambda: len(sub.bodies()) >= 50 and sub.bodies(), "50 summaries")
    time.sleep(0.2)  # a duplicate, were one coming, has had its chance
    got = sub.bodies()
    assert [m["i"] for m in got] == list(range(50))
    assert [m["seq"] for m in got] == seqs
    assert all(m["device_id"] == "dev-f" for m in got)


def test_broker_killed_while_connected_then_back(
    broker: Mosquitto, tmp_path: Path, cleanup: list[Callable[[], None]]
) -> None:
    # The hub's stand-in: paho reconnects it after the broker's restart, and it subscribes again.
    hub = Subscriber(broker, "outpost/v1/g/dev-r/summary")
    cleanup.append(hub.close)
    box = Outbox(tmp_path / "o.db")
    cleanup.append(box.close)
    client = TelemetryClient(config(broker.url), "dev-r", "g", box)
    cleanup.append(client.stop)
    client.start()
    client.publish("summary", {"i": 0})
    wait_for(lambda: client.status()["queued"] == 0 and client.status()["connected"], "the first summary")
    bd1 = client.status()["bd_seq"]

    broker.kill()
    wait_for(lambda: not client.status()["connected"], "the disconnect")
    for i in range(1, 11):
        client.publish("summary", {"i": i})
    time.sleep(0.3)
    assert client.status()["queued"] == 10  # nothing deleted without a PUBACK

    broker.start()
    wait_for(lambda: client.status()["queued"] == 0, "the outbox to drain", timeout=30)
    assert sorted(m["i"] for m in hub.bodies()) == list(range(11))
    late = Subscriber(broker, "outpost/v1/g/dev-r/state")
    cleanup.append(late.close)
    state = wait_for(late.bodies, "the retained birth")[0]
    assert state["online"] and state["bd_seq"] == client.status()["bd_seq"] > bd1


def test_unheard_messages_stay_until_a_subscriber_takes_them(
    broker: Mosquitto, tmp_path: Path, cleanup: list[Callable[[], None]]
) -> None:
    """After a broker restart the hub's shared subscription is gone until the hub is back: the
    broker acknowledges with "no matching subscribers" and gives the message to nobody. The
    outbox keeps such messages and sends them again, so they reach the hub once it listens."""
    box = Outbox(tmp_path / "o.db")
    cleanup.append(box.close)
    client = TelemetryClient(config(broker.url), "dev-u", "g", box)
    cleanup.append(client.stop)
    client.start()
    for i in range(3):
        client.publish("summary", {"i": i})
    wait_for(lambda: client.status()["unheard"] >= 1, "the broker's 'no matching subscribers'")
    time.sleep(0.5)
    assert client.status()["queued"] == 3
    hub = Subscriber(broker, "outpost/v1/g/dev-u/summary")
    cleanup.append(hub.close)
    wait_for(lambda: client.status()["queued"] == 0, "the kept messages", timeout=15)
    assert sorted(m["i"] for m in hub.bodies()) == [0, 1, 2]
    client.publish("summary", {"i": 3})  # heard at once now
    wait_for(lambda: len(hub.bodies()) == 4, "the next message")


def test_full_outbox_keeps_the_newest_and_reports_the_drops(
    broker: Mosquitto, tmp_path: Path, cleanup: list[Callable[[], None]]
) -> None:
    sub = Subscriber(broker, "outpost/v1/g/dev-b/#")
    cleanup.append(sub.close)
    box = Outbox(tmp_path / "o.db", max_messages=10)
    cleanup.append(box.close)
    client = TelemetryClient(config(broker.url), "dev-b", "g", box)
    cleanup.append(client.stop)
    for i in range(25):  # not started yet: offline
        client.publish("summary", {"i": i})
    assert client.status()["dropped"] == 15 and client.status()["queued"] == 10

    client.start()
    wait_for(lambda: len(sub.bodies("/summary")) >= 10 and client.status()["queued"] == 0, "the 10 newest")
    assert [m["i"] for m in sub.bodies("/summary")] == list(range(15, 25))
    report = wait_for(lambda: sub.bodies("/event"), "the drop report")
    assert report[0]["event"] == "telemetry_dropped" and report[0]["dropped_total"] == 15
    birth = sub.bodies("/state")[0]
    assert birth["telemetry"]["dropped_total"] == 15
    assert client.status()["dropped"] == 15
    assert box.counters()["reported_lost"] == 15  # reported once, not again at the next connection


def test_commands_and_only_the_publisher_thread_publishes(
    broker: Mosquitto, tmp_path: Path, cleanup: list[Callable[[], None]], caplog: pytest.LogCaptureFixture
) -> None:
    sub = Subscriber(broker, "outpost/v1/g/dev-c/state")
    cleanup.append(sub.close)
    box = Outbox(tmp_path / "o.db")
    cleanup.append(box.close)
    received: list[tuple[Command, str]] = []
    client = TelemetryClient(
        config(broker.url),
        "dev-c",
        "g",
        box,
        on_command=lambda c: received.append((c, threading.current_thread().name)),
    )
    assert client._paho is not None
    callers: list[threading.Thread] = []
    real_publish, real_subscribe = client._paho.publish, client._paho.subscribe

    def spy_publish(*a: Any, **kw: Any) -> paho.MQTTMessageInfo:
        callers.append(threading.current_thread())
        return real_publish(*a, **kw)

    def spy_subscribe(*a: Any, **kw: Any) -> Any:
        callers.append(threading.current_thread())
        return real_subscribe(*a, **kw)

    client._paho.publish = spy_publish  # type: ignore[method-assign]
    client._paho.subscribe = spy_subscribe  # type: ignore[method-assign]
    cleanup.append(client.stop)
    events = Subscriber(broker, "outpost/v1/g/dev-c/event")
    cleanup.append(events.close)
    client.start()
    birth = wait_for(sub.bodies, "the birth")[0]
    client.publish("event", {"kind": "install"})  # from this (a foreign) thread: only queued
    wait_for(lambda: client.status()["queued"] == 0, "the event")

    cmd = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    cmd.connect("127.0.0.1", broker.port)
    cmd.loop_start()
    cleanup.append(cmd.loop_stop)
    cleanup.append(cmd.disconnect)
    topic = "outpost/v1/g/dev-c/cmd"
    with caplog.at_level(logging.WARNING, logger="agent.telemetry.mqtt"):
        for payload in (b"not json", b'{"command": "format-disk"}', b'{"command": "update", "id": "c1"}'):
            cmd.publish(topic, payload, qos=1).wait_for_publish(5)
        wait_for(lambda: received, "the command")
        time.sleep(0.3)  # a second delivery, were one coming
    assert [c for c, _ in received] == [Command("update", "c1")]
    assert received[0][1].startswith("paho-mqtt-client")  # handed over as is: the handler must not block
    assert sum("malformed command" in r.getMessage() for r in caplog.records) == 2

    # rebirth on request: the state again, with the same bd_seq
    cmd.publish(topic, b'{"command": "rebirth"}', qos=1).wait_for_publish(5)
    again = wait_for(lambda: sub.bodies()[1:], "the rebirth")[0]
    assert again["online"] and again["bd_seq"] == birth["bd_seq"] and again["seq"] > birth["seq"]

    assert callers and {t.name for t in callers} == {"outpost-telemetry-dev-c"}
    assert all(t is client._publisher for t in callers)


def test_without_a_broker_url_it_only_buffers(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as box:
        client = TelemetryClient(MqttConfig(url=""), "dev-n", "g", box)
        client.start()
        assert client.publish("drift", {"psi": 0.1}) == 1
        status = client.status()
        assert status["enabled"] is False and status["connected"] is False and status["queued"] == 1
        client.stop()
        with pytest.raises(ValueError, match="state"):
            client.publish("state", {})
