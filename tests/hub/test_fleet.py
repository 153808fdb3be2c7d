"""The hub's fleet consumer against a real Mosquitto: the rules pure, the store in-process, and
the real `outpost-hub serve --mqtt` process with a paho client publishing as devices would."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from hub.fleet import FleetStore, Incoming, Invalid, StateMsg, parse_message, state_applies
from hub.registry import Database
from tests.support.broker import Mosquitto
from tests.support.hubproc import HubProcess

pytestmark = pytest.mark.e2e

WAIT_S = 15.0


def wait_for(check: Callable[[], Any], what: str, timeout: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# -- pure rules ---------------------------------------------------------------------------------


def state(online: bool, bd_seq: int, **extra: Any) -> StateMsg:
    return StateMsg("g", "d", online, bd_seq, {"online": online, "bd_seq": bd_seq, **extra})


def test_state_order_follows_bd_seq() -> None:
    assert state_applies(None, state(False, 0))
    assert state_applies((True, 5), state(True, 6))  # rebirth
    assert state_applies((True, 5), state(True, 5))  # same session, republished versions
    assert state_applies((True, 5), state(False, 5))  # the will of the current session
    assert not state_applies((True, 5), state(False, 4))  # a late will of an older session
    assert not state_applies((False, 5), state(True, 5))  # a birth after its own session's will
    assert not state_applies((True, 5), state(True, 4))


def test_parse_message() -> None:
    msg = parse_message("outpost/v1/g1/dev-1/event", b'{"device_id": "dev-1", "seq": 3, "ts": 1.5, "x": 1}')
    assert msg is not None and msg.device_id == "dev-1" and msg.group == "g1"
    assert parse_message("outpost/v1/g1/dev-1/cmd", b"{}") is None  # the hub's own commands
    iso = parse_message("outpost/v1/g/d/summary", b'{"seq": 1, "ts": "2024-01-01T00:00:00Z"}')
    assert iso is not None and getattr(iso, "ts", None) == 1704067200.0
    for topic, payload in [
        ("outpost/v1/g/d/event", b"not json"),
        ("outpost/v1/g/d/event", b'{"seq": -1}'),
        ("outpost/v1/g/d/event", b'{"seq": true}'),
        ("outpost/v1/g/d/event", b'{"seq": 1, "device_id": "other"}'),
        ("outpost/v1/g/d/state", b'{"online": "yes", "bd_seq": 1}'),
        ("outpost/v1/g/d/state", b'{"online": true}'),
        ("outpost/v1/g/d/weird", b'{"seq": 1}'),
        ("outpost/v2/g/d/event", b'{"seq": 1}'),
    ]:
        with pytest.raises(Invalid):
            parse_message(topic, payload)


# -- the store, in-process ----------------------------------------------------------------------


def incoming(topic: str, doc: dict[str, Any], retained: bool = False) -> Incoming:
    msg = parse_message(topic, json.dumps(doc).encode())
    assert msg is not None
    return Incoming(msg, retained)


def test_store_dedupe_will_and_retention(database_url: str) -> None:
    db = Database(database_url)
    db.create_all()
    store = FleetStore(db, keep_per_device=5)
    store.create_tables()
    birth = {"online": True, "bd_seq": 2, "versions": {"wine": 3}}
    report = store.apply([incoming("outpost/v1/g/d1/state", birth)])
    assert report.states_applied == 1
    ev = incoming("outpost/v1/g/d1/event", {"device_id": "d1", "seq": 1, "ts": 1.0, "kind": "install"})
    report = store.apply([ev, ev])
    assert (report.stored, report.duplicates) == (1, 1)
    assert store.apply([ev]).duplicates == 1
    assert (
        store.apply([incoming("outpost/v1/g/d1/state", {"online": False, "bd_seq": 1})]).states_ignored == 1
    )
    assert store.device("d1").online
    store.apply([incoming("outpost/v1/g/d1/state", {"online": False, "bd_seq": 2})])
    d1 = store.device("d1")
    assert not d1.online and d1.state["versions"] == {"wine": 3}  # the will keeps the last versions
    # retention: the newest 5 stay; an old seq arriving afterwards is not stored again
    store.apply([incoming("outpost/v1/g/d1/summary", {"seq": s}) for s in range(2, 12)])
    assert [m.seq for m in store.messages("d1")] == [11, 10, 9, 8, 7]
    report = store.apply([incoming("outpost/v1/g/d1/summary", {"seq": 3})])
    assert (report.stored, report.too_old) == (0, 1)
    # a retained state replayed on subscribe does not count as seen
    seen = store.device("d1").last_seen
    store.apply([incoming("outpost/v1/g/d1/state", {"online": False, "bd_seq": 2}, retained=True)])
    assert store.device("d1").last_seen == seen
    db.dispose()


# -- the real hub process and a real broker ------------------------------------------------------


class Device:
    """A paho client publishing as devices do (one connection for many device ids)."""

    def __init__(self, broker: Mosquitto, client_id: str = "test-devices") -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5
        )
        self.received: list[mqtt.MQTTMessage] = []
        self.subscribed = threading.Event()
        self.client.on_message = lambda _c, _u, m: self.received.append(m)
        self.client.on_subscribe = lambda *_a: self.subscribed.set()
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()

    def publish(self, group: str, device: str, kind: str, doc: dict[str, Any], retain: bool = False) -> None:
        info = self.client.publish(
            f"outpost/v1/{group}/{device}/{kind}", json.dumps(doc), qos=1, retain=retain
        )
        info.wait_for_publish(WAIT_S)
        assert info.is_published()

    def birth(self, group: str, device: str, bd_seq: int, **extra: Any) -> None:
        doc = {"device_id": device, "online": True, "bd_seq": bd_seq, **extra}
        self.publish(group, device, "state", doc, retain=True)

    def will(self, group: str, device: str, bd_seq: int) -> None:
        self.publish(group, device, "state", {"online": False, "bd_seq": bd_seq}, retain=True)

    def event(self, group: str, device: str, seq: int, **body: Any) -> None:
        self.publish(group, device, "event", {"device_id": device, "seq": seq, "ts": time.time(), **body})

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    b = Mosquitto(tmp_path_factory.mktemp("mosquitto")).start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory, broker: Mosquitto) -> Iterator[HubProcess]:
    process = HubProcess(tmp_path_factory.mktemp("fleet-hub") / "data").start(mqtt_url=broker.url)
    yield process
    process.kill()


@pytest.fixture
def device(broker: Mosquitto) -> Iterator[Device]:
    d = Device(broker)
    yield d
    d.close()


def fleet(hub: HubProcess) -> dict[str, dict[str, Any]]:
    resp = hub.api("GET", "/api/v1/fleet")
    assert resp.status_code == 200, resp.text
    return {d["device_id"]: d for d in resp.json()}


def detail(hub: HubProcess, device_id: str, limit: int = 50) -> dict[str, Any]:
    resp = hub.api("GET", f"/api/v1/fleet/{device_id}", params={"limit": limit})
    assert resp.status_code == 200, resp.text
    result: dict[str, Any] = resp.json()
    return result


def test_birth_shows_device_online_in_api_and_cli(hub: HubProcess, device: Device) -> None:
    device.birth("plant-a", "dev-001", 1, versions={"wine": 3}, update={"state": "committed"})
    d = wait_for(lambda: fleet(hub).get("dev-001"), "dev-001 in the fleet")
    assert d["online"] and d["group"] == "plant-a" and d["versions"] == {"wine": 3}
    assert d["update"] == {"state": "committed"} and d["last_seen"]
    out = hub.outpost("fleet").stdout
    line = next(line for line in out.splitlines() if line.startswith("dev-001"))
    assert "online" in line and "plant-a" in line and "wine=3" in line and "last seen" in line
    assert hub.api("GET", "/api/v1/fleet", auth=False).status_code == 401
    assert hub.api("GET", "/api/v1/fleet/nope").status_code == 404


def test_event_redelivered_with_same_seq_is_stored_once(hub: HubProcess, device: Device) -> None:
    device.birth("plant-a", "dev-002", 1)
    wait_for(lambda: fleet(hub).get("dev-002"), "dev-002")
    device.event("plant-a", "dev-002", 7, event="install", version=2)
    device.event("plant-a", "dev-002", 7, event="install", version=2)
    device.event("plant-a", "dev-002", 8, event="commit", version=2)
    got = wait_for(lambda: (d := detail(hub, "dev-002"))["last_seq"] == 8 and d, "seq 8")
    time.sleep(0.3)  # a second copy of seq 7, were it coming, has had its chance
    got = detail(hub, "dev-002")
    assert [m["seq"] for m in got["recent"]] == [8, 7] and got["messages"] == 2
    assert got["recent"][1]["body"]["event"] == "install"


def test_late_will_ignored_current_will_takes_device_offline(hub: HubProcess, device: Device) -> None:
    device.birth("plant-b", "dev-003", 4, versions={"wine": 1})
    wait_for(lambda: fleet(hub).get("dev-003", {}).get("bd_seq") == 4, "birth 4")
    device.will("plant-b", "dev-003", 3)  # the will of an older session, delivered late
    device.event("plant-b", "dev-003", 1)  # a marker: messages of one publisher arrive in order
    wait_for(lambda: detail(hub, "dev-003")["last_seq"] == 1, "the marker")
    d = fleet(hub)["dev-003"]
    assert d["online"] and d["bd_seq"] == 4
    device.will("plant-b", "dev-003", 4)
    d = wait_for(lambda: (x := fleet(hub)["dev-003"])["online"] is False and x, "offline")
    assert d["versions"] == {"wine": 1}
    assert "offline" in next(ln for ln in hub.outpost("fleet").stdout.splitlines() if "dev-003" in ln)


def test_200_events_from_20_devices(hub: HubProcess, device: Device) -> None:
    devices = [f"load-{i:02d}" for i in range(20)]
    for name in devices:
        device.birth("load", name, 1)
    for seq in range(10):
        for name in devices:
            device.event("load", name, seq, n=seq)
    wait_for(
        lambda: sum(d["messages"] for d in fleet(hub).values() if d["group"] == "load") == 200, "200 events"
    )
    listed = hub.api("GET", "/api/v1/fleet", params={"group": "load"}).json()
    assert len(listed) == 20 and all(
        d["online"] and d["messages"] == 10 and d["last_seq"] == 9 for d in listed
    )


def test_command_reaches_the_device(hub: HubProcess, broker: Mosquitto, device: Device) -> None:
    device.birth("plant-c", "dev-004", 1)
    wait_for(lambda: fleet(hub).get("dev-004"), "dev-004")
    device.client.subscribe("outpost/v1/plant-c/dev-004/cmd", qos=1)
    assert device.subscribed.wait(WAIT_S)
    resp = hub.api("POST", "/api/v1/fleet/dev-004/command", json={"command": "update"})
    assert resp.status_code == 202, resp.text
    msg = wait_for(lambda: device.received and device.received[0], "the command")
    sent = json.loads(msg.payload)
    assert sent == {"command": "update", "id": resp.json()["id"]} and msg.qos == 1
    bad = hub.api("POST", "/api/v1/fleet/dev-004/command", json={"command": "format-disk"})
    assert bad.status_code == 422


def test_restart_keeps_the_table_and_the_session(hub: HubProcess, device: Device) -> None:
    device.birth("plant-d", "dev-005", 1)
    device.event("plant-d", "dev-005", 1)
    wait_for(lambda: fleet(hub).get("dev-005", {}).get("messages") == 1, "dev-005")
    before = fleet(hub)
    assert hub.stop() in (0, -15)  # uvicorn shuts down cleanly, then re-raises SIGTERM
    assert "fleet: stopped" in hub.log()
    # published while the hub is down: the broker keeps them for the hub's persistent session
    device.event("plant-d", "dev-005", 2)
    device.event("plant-d", "dev-005", 3)
    hub.start(mqtt_url=hub_mqtt_url(hub))
    after = fleet(hub)
    assert set(before) <= set(after)
    for name in ("dev-001", "dev-003", "load-07"):
        if name in before:
            assert after[name]["online"] == before[name]["online"]
            assert after[name]["messages"] == before[name]["messages"]
    wait_for(lambda: detail(hub, "dev-005")["messages"] == 3, "events sent while the hub was down")


def hub_mqtt_url(hub: HubProcess) -> str:
    assert hub.proc is not None
    args = hub.proc.args
    assert isinstance(args, list)
    return str(args[args.index("--mqtt") + 1])


DYING_DEVICE = """
import json, os, sys, paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
port, bd = int(sys.argv[1]), int(sys.argv[2])
topic = "outpost/v1/plant-e/dev-006/state"
c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="dev-006", protocol=MQTTProtocolVersion.MQTTv5)
c.will_set(topic, json.dumps({"online": False, "bd_seq": bd}), qos=1, retain=True)
c.connect("127.0.0.1", port)
c.loop_start()
c.publish(topic, json.dumps({"online": True, "bd_seq": bd}), qos=1, retain=True).wait_for_publish(10)
os.kill(os.getpid(), 9)
"""


def test_a_killed_device_goes_offline_through_its_will(hub: HubProcess, broker: Mosquitto) -> None:
    result = subprocess.run(
        [sys.executable, "-c", DYING_DEVICE, str(broker.port), "9"], timeout=30, capture_output=True
    )
    assert result.returncode == -9, result.stderr
    d = wait_for(
        lambda: (x := fleet(hub).get("dev-006")) and x["bd_seq"] == 9 and not x["online"] and x, "will"
    )
    assert d["group"] == "plant-e"


def test_two_hub_workers_split_the_stream(tmp_path: Path, database_url: str) -> None:
    """Two consumers in one share group: each message reaches one of them, all are stored once.
    (A broker of its own: the module's hub process would take its share of the stream too.)"""
    from hub.fleet import FleetConsumer

    broker = Mosquitto(tmp_path).start()
    device = Device(broker)
    db = Database(database_url)
    db.create_all()
    store = FleetStore(db)
    store.create_tables()
    workers = [FleetConsumer(store, broker.url, f"test-worker-{i}", session_expiry_s=0) for i in (1, 2)]
    try:
        for w in workers:
            w.start()
        for w in workers:
            assert w.subscribed.wait(WAIT_S)
        for seq in range(100):
            device.event("split", f"split-{seq % 4}", seq)
        wait_for(lambda: sum(d.messages for d in store.devices("split")) == 100, "100 events")
        shares = [w.stats["stored"] + w.stats["duplicates"] for w in workers]
        assert sum(shares) == 100 and all(s > 0 for s in shares), shares
    finally:
        for w in workers:
            w.stop()
        device.close()
        broker.stop()
        db.dispose()


def test_a_full_queue_holds_messages_back_instead_of_dropping_them(tmp_path: Path) -> None:
    """A writer slower than the stream with a queue of 4: Mosquitto does not keep to the hub's
    Receive Maximum, so the queue fills; every message must still be stored, none dropped (the
    network thread waits for room and the broker holds the rest)."""
    from hub.fleet import FleetConsumer
    from hub.fleet.store import ApplyReport

    class Slow(FleetStore):
        def apply(self, batch: Any) -> ApplyReport:
            time.sleep(0.01)
            return super().apply(batch)

    broker = Mosquitto(tmp_path).start()
    device = Device(broker)
    db = Database(f"sqlite:///{tmp_path / 'hub.db'}")
    db.create_all()
    store = Slow(db)
    store.create_tables()
    consumer = FleetConsumer(store, broker.url, "test-slow", queue_size=4, batch_size=1, session_expiry_s=0)
    try:
        consumer.start()
        assert consumer.subscribed.wait(WAIT_S)
        for seq in range(300):
            body = json.dumps({"seq": seq, "event": "x"})
            device.client.publish("outpost/v1/slow/dev-s/event", body, qos=1)
        wait_for(lambda: sum(d.messages for d in store.devices("slow")) == 300, "300 events", timeout=60)
        # The consumer counts a batch just after its transaction commits: the rows can be seen
        # a moment before the count (reading it at once raced it: seen failing 299 == 300).
        wait_for(lambda: consumer.stats["stored"] == 300, "the stored count", timeout=10)
        assert consumer.stats["dropped"] == 0 and consumer.stats["backpressure"] > 0, consumer.stats
    finally:
        consumer.stop()
        device.close()
        broker.stop()
        db.dispose()


def test_a_message_the_database_refuses_does_not_wedge_the_stream(tmp_path: Path) -> None:
    from hub.fleet.consumer import FleetConsumer, _Item
    from hub.fleet.store import ApplyReport

    class Refusing(FleetStore):
        def apply(self, batch: Any) -> ApplyReport:
            if any(i.device_id == "bad" for i in batch):
                raise ValueError("refused")
            return ApplyReport(stored=len(batch))

    consumer = FleetConsumer(Refusing(Database("sqlite://")), "mqtt://127.0.0.1:1", "unused")
    items = [
        _Item(f"outpost/v1/g/{name}/event", b'{"seq": 1}', False, mid=0, qos=0, generation=0)
        for name in ("a", "bad", "b")
    ]
    for item in items:
        consumer._queue.put(item)
    consumer._write(consumer._take_batch())
    assert consumer.stats["stored"] == 2 and consumer.stats["failed"] == 1
    assert consumer._queue.unfinished_tasks == 0
    with pytest.raises(Invalid):
        parse_message("outpost/v1/g/d/event", b'{"seq": 9223372036854775808}')
