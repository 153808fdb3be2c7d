"""packaging/mosquitto/ against a real Mosquitto on loopback: logins, the ACL, add-device.

The broker runs the packaged `acl` file itself and a configuration derived from the packaged
`outpost.conf` line by line: only the listener, the file paths and the log destination are
changed (pointed at tmp_path); every other line, the security ones included, is as shipped.
Credentials are made by the packaged `add-device` script.

Proving that something was NOT delivered needs no sleep: MQTT delivers one client's messages
to one subscriber in order, so a forbidden message is published first, an allowed one after
it, and once the allowed one has arrived the forbidden one would have arrived before it.
"""

from __future__ import annotations

import json
import signal
import stat
import subprocess
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from agent.config import MqttConfig
from agent.telemetry import Outbox, TelemetryClient
from tests.support.broker import Mosquitto, mosquitto_available

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed (make sysdeps)"),
    pytest.mark.timeout(90),
]

PKG = Path(__file__).parents[2] / "packaging" / "mosquitto"
ADD_DEVICE = str(PKG / "add-device")
HUB = "outpost-hub"
PASSWORDS = {"dev-a": "a-secret", "dev-b": "b-secret", HUB: "hub-secret"}
NOT_AUTHORIZED = 135
REFUSED_LOGIN = (134, 135)  # Bad user name or password / Not authorized: Mosquitto sends 135
SHARED = f"$share/{HUB}/outpost/v1/#"  # what the hub's fleet consumer subscribes to
STATES = "outpost/v1/+/+/state"  # and this, directly (retained states skip shared subscriptions)


def topic(device: str, kind: str, group: str = "default") -> str:
    return f"outpost/v1/{group}/{device}/{kind}"


def wait_for(pred: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def derived_config(broker: Mosquitto, passwd: Path) -> str:
    """packaging/mosquitto/outpost.conf with its listener, paths and log pointed at the test's."""
    replace = {
        "listener": f"listener {broker.port} 127.0.0.1",
        "password_file": f"password_file {passwd}",
        "acl_file": f"acl_file {PKG / 'acl'}",
        "persistence_location": f"persistence_location {broker.dir}/",
        "log_dest": f"log_dest file {broker.log_path}",
    }
    lines = []
    for line in (PKG / "outpost.conf").read_text().splitlines():
        key = line.split(" ", 1)[0]
        lines.append(replace.pop(key) if key in replace else line)
    assert not replace, f"outpost.conf no longer has these lines: {sorted(replace)}"
    lines.append("log_type debug")  # "Denied PUBLISH" lines, for a failing test's broker.log()
    return "\n".join(lines)


def add_device(passwd: Path, name: str, password: str, *args: str, url: str = "mqtt://127.0.0.1:1883") -> str:
    result = subprocess.run(
        [ADD_DEVICE, "-f", str(passwd), "-a", str(PKG / "acl"), "-u", url, *args, name],
        input=password + "\n",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def add_hub(passwd: Path, password: str) -> str:
    result = subprocess.run(
        [ADD_DEVICE, "-f", str(passwd), "--hub"],
        input=password + "\n",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


class Peer:
    """A test-side paho 2.x MQTT 5 client that records CONNACK, PUBACK and SUBACK reason codes
    and the messages it receives. It never reconnects on its own."""

    def __init__(
        self, broker: Mosquitto, username: str | None, password: str | None = None, client_id: str = ""
    ):
        self.port = broker.port
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5, reconnect_on_failure=False
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        self._lock = threading.Lock()
        self.connack: ReasonCode | None = None
        self.disconnected = threading.Event()
        self.pubacks: dict[int, ReasonCode] = {}
        self.subacks: dict[int, list[ReasonCode]] = {}
        self.messages: list[tuple[str, bytes, bool]] = []
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda c, u, f, rc, p: self.disconnected.set()
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def _on_connect(self, c: paho.Client, u: Any, f: Any, reason: ReasonCode, p: Any) -> None:
        self.connack = reason

    def _on_publish(self, c: paho.Client, u: Any, mid: int, reason: ReasonCode, p: Any) -> None:
        with self._lock:
            self.pubacks[mid] = reason

    def _on_subscribe(self, c: paho.Client, u: Any, mid: int, reasons: list[ReasonCode], p: Any) -> None:
        with self._lock:
            self.subacks[mid] = reasons

    def _on_message(self, c: paho.Client, u: Any, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def connect(self) -> ReasonCode:
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        connack: ReasonCode = wait_for(lambda: self.connack, "CONNACK")
        return connack

    def publish(self, topic: str, payload: bytes = b"{}", retain: bool = False) -> int:
        """Publish at QoS 1; the PUBACK's reason code (0: accepted)."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        assert info.rc == paho.MQTT_ERR_SUCCESS, info.rc
        return int(wait_for(lambda: self.pubacks.get(info.mid), f"PUBACK of {topic}").value)

    def subscribe(self, filter_: str) -> int:
        """Subscribe at QoS 1; the SUBACK's reason code (1: granted QoS 1, >= 128: refused)."""
        rc, mid = self.client.subscribe(filter_, qos=1)
        assert rc == paho.MQTT_ERR_SUCCESS and mid is not None, rc
        return int(wait_for(lambda: self.subacks.get(mid), f"SUBACK of {filter_}")[0].value)

    def topics(self) -> list[str]:
        with self._lock:
            return [t for t, _, _ in self.messages]

    def got(self, topic: str) -> list[bytes]:
        with self._lock:
            return [m for t, m, _ in self.messages if t == topic]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def passwd(tmp_path: Path) -> Path:
    path = tmp_path / "outpost.passwd"
    for device in ("dev-a", "dev-b"):
        add_device(path, device, PASSWORDS[device])
    add_hub(path, PASSWORDS[HUB])
    return path


@pytest.fixture
def broker(tmp_path: Path, passwd: Path) -> Iterator[Mosquitto]:
    b = Mosquitto(tmp_path / "broker", config=lambda m: derived_config(m, passwd)).start()
    yield b
    b.kill()


@pytest.fixture
def connect(broker: Mosquitto) -> Iterator[Callable[..., Peer]]:
    """connect(username, password=its own, client_id="", ok=True) -> a connected Peer."""
    peers: list[Peer] = []

    def make(username: str, password: str | None = None, client_id: str = "", ok: bool = True) -> Peer:
        peer = Peer(broker, username, PASSWORDS.get(username) if password is None else password, client_id)
        peers.append(peer)
        reason = peer.connect()
        if ok:
            assert not reason.is_failure, f"{username} refused: {reason}\n{broker.log()}"
        return peer

    yield make
    for peer in reversed(peers):
        peer.close()


@pytest.fixture
def hub(connect: Callable[..., Peer]) -> Peer:
    """The hub's two subscriptions, as hub.fleet.consumer makes them."""
    peer = connect(HUB)
    assert peer.subscribe(SHARED) == 1 and peer.subscribe(STATES) == 1
    return peer


# -- the packaged files -----------------------------------------------------------------------


def test_the_packaged_config_keeps_its_security_lines_in_the_test_broker(broker: Mosquitto) -> None:
    running = broker.conf_path.read_text().splitlines()
    for line in ("allow_anonymous false", "use_username_as_clientid true", "per_listener_settings false",
                 "persistence true", f"acl_file {PKG / 'acl'}"):  # fmt: skip
        assert line in running


def test_add_device_prints_the_agents_mqtt_table_and_keeps_the_password_out_of_reach(tmp_path: Path) -> None:
    path = tmp_path / "pw"
    out = add_device(path, "dev-x", 'tricky "pass\\word"', url="mqtts://broker.example.net:8883")
    mqtt = tomllib.loads(out)["mqtt"]
    assert mqtt == {
        "url": "mqtts://broker.example.net:8883",
        "username": "dev-x",
        "password": 'tricky "pass\\word"',
    }
    MqttConfig(**mqtt)  # the agent accepts it as it is
    text = path.read_text()
    assert text.startswith("dev-x:$") and "tricky" not in text  # hashed
    assert stat.S_IMODE(path.stat().st_mode) & 0o007 == 0  # not readable by others
    generated = tomllib.loads(add_device(path, "dev-y", "", "--generate"))["mqtt"]["password"]
    assert len(generated) == 32 and len(path.read_text().splitlines()) == 2


@pytest.mark.parametrize(
    ("name", "password", "error"),
    [
        (HUB, "x", "is a user of the broker's ACL"),
        ("a:b", "x", "cannot be a device id"),
        ("a/+", "x", "cannot be a device id"),
        ("dev-z", "", "empty password"),
    ],
    ids=["hub-name", "colon", "wildcard", "no-password"],
)
def test_add_device_refuses(tmp_path: Path, name: str, password: str, error: str) -> None:
    result = subprocess.run(
        [ADD_DEVICE, "-f", str(tmp_path / "pw"), "-a", str(PKG / "acl"), name],
        input=password,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2 and error in result.stderr and result.stdout == ""
    assert not (tmp_path / "pw").exists()


# -- logins -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("username", "password"),
    [("dev-a", "b-secret"), (None, None), ("dev-c", "a-secret")],
    ids=["wrong-password", "anonymous", "unknown-user"],
)
def test_a_login_without_valid_credentials_is_refused(
    broker: Mosquitto, username: str | None, password: str | None
) -> None:
    peer = Peer(broker, username, password)
    try:
        assert peer.connect().value in REFUSED_LOGIN
    finally:
        peer.close()


def test_add_device_changes_a_password_and_a_reload_applies_it(
    broker: Mosquitto, passwd: Path, connect: Callable[..., Peer]
) -> None:
    add_device(passwd, "dev-a", "a-new-secret")
    assert broker.proc is not None
    broker.proc.send_signal(signal.SIGHUP)  # what `systemctl reload mosquitto` does

    def old_password_refused() -> bool:
        return connect("dev-a", "a-secret", ok=False).connack.is_failure  # type: ignore[union-attr]

    wait_for(old_password_refused, "the reload")
    connect("dev-a", "a-new-secret")


# -- what a device may publish ----------------------------------------------------------------


def test_a_device_publishes_its_own_topics_and_the_hubs_shared_subscription_receives_them(
    hub: Peer, connect: Callable[..., Peer]
) -> None:
    dev_a = connect("dev-a")
    for kind in ("summary", "drift", "event", "capture"):
        assert dev_a.publish(topic("dev-a", kind), json.dumps({"kind": kind}).encode()) == 0
    assert dev_a.publish(topic("dev-a", "state"), b'{"online": true}', retain=True) == 0
    wait_for(lambda: len(hub.topics()) >= 6, "the device's messages at the hub")
    assert hub.got(topic("dev-a", "summary")) == [b'{"kind": "summary"}']
    assert hub.got(topic("dev-a", "drift")) == [b'{"kind": "drift"}']
    assert hub.got(topic("dev-a", "event")) == [b'{"kind": "event"}']
    assert hub.got(topic("dev-a", "capture")) == [b'{"kind": "capture"}']
    # The state comes twice: through the shared subscription and the direct one.
    assert hub.got(topic("dev-a", "state")) == [b'{"online": true}'] * 2


@pytest.mark.parametrize(
    ("target", "retain"),
    [
        (topic("dev-b", "summary"), False),
        (topic("dev-b", "drift"), False),
        (topic("dev-b", "event"), False),
        (topic("dev-b", "capture"), False),
        (topic("dev-b", "state"), True),
        (topic("dev-b", "state", group="other"), True),
        (topic("dev-b", "cmd"), False),
        (topic("dev-a", "cmd"), False),  # commands come from the hub only
        ("outpost/v1/default/dev-a/other", False),
        ("elsewhere/dev-a", False),
    ],
    ids=[
        "summary",
        "drift",
        "event",
        "capture",
        "retained-state",
        "other-group",
        "cmd",
        "own-cmd",
        "kind",
        "outside",
    ],
)
def test_a_device_cannot_publish_as_another(
    broker: Mosquitto, hub: Peer, connect: Callable[..., Peer], target: str, retain: bool
) -> None:
    dev_a = connect("dev-a")
    assert dev_a.publish(target, b'{"online": false}', retain=retain) == NOT_AUTHORIZED, broker.log()
    assert dev_a.publish(topic("dev-a", "state"), b"after", retain=True) == 0
    wait_for(lambda: hub.got(topic("dev-a", "state")), "the allowed message after the refused one")
    assert target not in hub.topics()
    if retain:  # nor kept for later subscribers: only dev-a's own retained state is there
        late = connect(HUB, client_id="late")
        assert late.subscribe(STATES) == 1
        wait_for(late.topics, "the retained states")
        assert late.topics() == [topic("dev-a", "state")]


@pytest.mark.parametrize(("owner", "delivered"), [("dev-a", True), ("dev-b", False)], ids=["own", "other"])
def test_a_devices_last_will_is_delivered_only_on_its_own_topic(
    broker: Mosquitto, hub: Peer, connect: Callable[..., Peer], owner: str, delivered: bool
) -> None:
    will_topic = topic(owner, "state")
    first = Peer(broker, "dev-a", PASSWORDS["dev-a"])
    first.client.will_set(will_topic, b'{"online": false, "will": true}', qos=1, retain=True)
    try:
        reason = first.connect()
        if not reason.is_failure:
            # A second login as dev-a takes over (the client id is the username): the broker ends
            # the first connection without a DISCONNECT and so publishes its will.
            second = connect("dev-a")
            wait_for(first.disconnected.is_set, "the takeover")
            assert second.publish(topic("dev-a", "summary"), b"after") == 0
            wait_for(lambda: hub.got(topic("dev-a", "summary")), "the message after the will")
    finally:
        first.close()
    assert (b'{"online": false, "will": true}' in hub.got(will_topic)) is delivered


def test_a_device_cannot_disconnect_another_by_taking_its_client_id(
    hub: Peer, connect: Callable[..., Peer]
) -> None:
    dev_b = connect("dev-b", client_id="outpost-dev-b")  # the agent's client id
    connect("dev-a", client_id="outpost-dev-b")
    # Without use_username_as_clientid the broker would have closed dev-b's connection before
    # answering dev-a's CONNECT; dev-b's next publish would then never be acknowledged.
    assert dev_b.publish(topic("dev-b", "summary"), b"still here") == 0
    assert not dev_b.disconnected.is_set()
    wait_for(lambda: hub.got(topic("dev-b", "summary")), "dev-b's message")


def test_known_limit_a_device_may_publish_as_itself_under_another_group(
    hub: Peer, connect: Callable[..., Peer]
) -> None:
    # Stated in packaging/mosquitto/acl: the group level is a wildcard; the device id is not.
    dev_a = connect("dev-a")
    assert dev_a.publish(topic("dev-a", "summary", group="other"), b"x") == 0
    wait_for(lambda: hub.got(topic("dev-a", "summary", group="other")), "the message")


# -- what a device may read -------------------------------------------------------------------


def test_a_device_receives_only_its_own_commands(hub: Peer, connect: Callable[..., Peer]) -> None:
    dev_a, dev_b = connect("dev-a"), connect("dev-b")
    assert dev_b.subscribe(topic("dev-b", "cmd")) == 1
    assert dev_a.subscribe(topic("dev-a", "cmd")) == 1
    # Mosquitto's acl_file never refuses a subscription (it filters each delivery instead), so
    # these are granted or refused; either way nothing but dev-a's own commands may arrive.
    for filter_ in (topic("dev-b", "cmd"), "outpost/v1/#", "#", "$share/spy/outpost/v1/#"):
        assert dev_a.subscribe(filter_) in (1, NOT_AUTHORIZED)

    assert dev_b.publish(topic("dev-b", "summary"), b"b's summary") == 0
    assert dev_b.publish(topic("dev-b", "state"), b"b's state", retain=True) == 0
    wait_for(lambda: hub.got(topic("dev-b", "summary")), "dev-b's summary at the hub")
    assert hub.publish(topic("dev-b", "cmd"), b'{"command": "update"}') == 0
    wait_for(lambda: dev_b.got(topic("dev-b", "cmd")), "dev-b's command")
    assert hub.publish(topic("dev-a", "cmd"), b'{"command": "rebirth"}') == 0
    wait_for(lambda: dev_a.got(topic("dev-a", "cmd")), "dev-a's command")
    assert set(dev_a.topics()) == {topic("dev-a", "cmd")}


def test_the_hub_commands_devices_but_cannot_forge_their_telemetry(
    hub: Peer, connect: Callable[..., Peer]
) -> None:
    dev_a = connect("dev-a")
    assert dev_a.subscribe(topic("dev-a", "cmd")) == 1
    assert hub.publish(topic("dev-a", "cmd"), b'{"command": "update", "id": "c1"}') == 0
    command = wait_for(lambda: dev_a.got(topic("dev-a", "cmd")), "the command")
    assert command == [b'{"command": "update", "id": "c1"}']
    for kind in ("summary", "state", "event"):
        assert hub.publish(topic("dev-a", kind), b"forged") == NOT_AUTHORIZED


@pytest.mark.xfail(
    strict=True,
    reason="Mosquitto's acl_file cannot refuse a subscription: a device may join the hub's shared "
    "subscription, and the broker drops the messages whose turn falls on it (packaging/mosquitto/acl)",
)
def test_known_gap_a_device_in_the_hubs_share_group_takes_messages_from_the_hub(
    hub: Peer, connect: Callable[..., Peer]
) -> None:
    dev_a, dev_b = connect("dev-a"), connect("dev-b")
    dev_a.subscribe(SHARED)
    for i in range(10):
        assert dev_b.publish(topic("dev-b", "summary"), str(i).encode()) == 0
    # The state also reaches the hub's direct subscription, after every summary before it.
    assert dev_b.publish(topic("dev-b", "state"), b"after") == 0
    wait_for(lambda: hub.got(topic("dev-b", "state")), "the state after the summaries")
    assert len(hub.got(topic("dev-b", "summary"))) == 10


# -- the agent's own client -------------------------------------------------------------------


def agent_config(broker: Mosquitto, passwd: Path, device: str) -> MqttConfig:
    """The [mqtt] table add-device prints, as the agent reads it (fast reconnects for the test)."""
    printed = tomllib.loads(add_device(passwd, device, PASSWORDS[device], url=broker.url))["mqtt"]
    return MqttConfig(**printed, reconnect_min_s=0.1, reconnect_max_s=0.5, publish_timeout_s=5.0)


def test_the_agents_telemetry_client_reports_through_the_acl(
    broker: Mosquitto, passwd: Path, hub: Peer, tmp_path: Path
) -> None:
    box = Outbox(tmp_path / "outbox.db")
    client = TelemetryClient(agent_config(broker, passwd, "dev-a"), "dev-a", "default", box)
    client.start()
    try:
        births = wait_for(lambda: hub.got(topic("dev-a", "state")), "the birth")
        birth = json.loads(births[0])
        assert birth["online"] is True and birth["device_id"] == "dev-a"
        client.publish("summary", {"requests": 3})
        summary = json.loads(wait_for(lambda: hub.got(topic("dev-a", "summary")), "the summary")[0])
        assert summary["requests"] == 3 and summary["device_id"] == "dev-a"
        wait_for(lambda: client.status()["queued"] == 0, "the outbox to empty")
        status = client.status()
        assert status["connected"] and status["rejected"] == 0 and status["last_error"] == ""
    finally:
        client.stop()
        box.close()
    wait_for(lambda: any(not json.loads(m)["online"] for m in hub.got(topic("dev-a", "state"))), "the death")


def test_an_agent_with_another_devices_credentials_is_refused_and_does_not_wedge(
    broker: Mosquitto, passwd: Path, hub: Peer, connect: Callable[..., Peer], tmp_path: Path
) -> None:
    # dev-b's agent.toml given dev-a's [mqtt] table by mistake (or by someone who stole it).
    box = Outbox(tmp_path / "outbox.db")
    client = TelemetryClient(agent_config(broker, passwd, "dev-a"), "dev-b", "default", box)
    client.start()
    try:
        client.publish("summary", {"requests": 1})
        # The broker refuses it (PUBACK 135); the agent drops it instead of re-sending it forever.
        wait_for(lambda: client.status()["rejected"] == 1 and client.status()["queued"] == 0, "the refusal")
    finally:
        client.stop()
        box.close()
    dev_b = connect("dev-b")
    assert dev_b.publish(topic("dev-b", "summary"), b"the real dev-b") == 0
    wait_for(lambda: hub.got(topic("dev-b", "summary")), "the real dev-b's summary")
    assert hub.got(topic("dev-b", "summary")) == [b"the real dev-b"]
    assert hub.got(topic("dev-b", "state")) == []
