"""agent.telemetry.outbox: the on-disk store-and-forward queue, and the pure message helpers.

What matters is what survives: seq never reused (across reopen and a kill -9), nothing put
is lost before ack, the bounds drop the OLDEST and count it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agent.errors import ConfigError, OutboxError
from agent.telemetry import messages
from agent.telemetry.outbox import Outbox


class Clock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_put_peek_ack_in_order(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as box:
        seqs = [box.put("t/a", f"m{i}".encode()) for i in range(5)]
        assert seqs == [1, 2, 3, 4, 5]
        got = box.peek(3)
        assert [m.seq for m in got] == [1, 2, 3]
        assert [m.payload for m in got] == [b"m0", b"m1", b"m2"]
        assert got[0].qos == 1 and got[0].retain is False and got[0].topic == "t/a"
        assert box.ack([1, 2, 99]) == 2
        assert [m.seq for m in box.peek(10)] == [3, 4, 5]
        assert len(box) == 3


def test_payload_built_from_its_seq(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as box:
        seq = box.put("t", lambda s: json.dumps({"seq": s}).encode(), qos=0, retain=True)
        (m,) = box.peek(1)
        assert json.loads(m.payload) == {"seq": seq} and m.qos == 0 and m.retain


def test_failed_build_uses_no_seq(tmp_path: Path) -> None:
    def bad(seq: int) -> bytes:
        raise ValueError("no")

    with Outbox(tmp_path / "o.db") as box:
        assert box.put("t", b"x") == 1
        with pytest.raises(ValueError):
            box.put("t", bad)
        # rolled back: the seq is handed out again, since nobody ever saw it
        assert box.put("t", b"y") == 2
        assert len(box) == 2


def test_seq_survives_reopen_and_is_never_reused(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with Outbox(path) as box:
        for _ in range(3):
            box.put("t", b"x")
        box.ack([1, 2, 3])  # empty again: the counter must not come from max(seq)
        assert box.reserve_seq() == 4
        assert box.next_bd_seq() == 0
        assert box.next_bd_seq() == 1
    with Outbox(path) as box:
        assert box.put("t", b"x") == 5
        assert box.next_bd_seq() == 2


@pytest.mark.parametrize(
    ("max_messages", "max_bytes", "n", "kept", "dropped"),
    [
        pytest.param(10, 10**6, 25, list(range(16, 26)), 15, id="count"),
        pytest.param(1000, 5 * 11, 12, list(range(8, 13)), 7, id="bytes"),  # each row: 10 bytes + topic "t"
        pytest.param(3, 10**6, 3, [1, 2, 3], 0, id="exactly-full"),
    ],
)
def test_bounds_drop_the_oldest_and_count(
    tmp_path: Path, max_messages: int, max_bytes: int, n: int, kept: list[int], dropped: int
) -> None:
    with Outbox(tmp_path / "o.db", max_messages=max_messages, max_bytes=max_bytes) as box:
        for i in range(n):
            box.put("t", b"%010d" % i)
        assert [m.seq for m in box.peek(100)] == kept
        assert box.dropped_total == dropped
    with Outbox(tmp_path / "o.db") as box:
        assert box.dropped_total == dropped  # persisted


def test_message_larger_than_the_bound_is_dropped_and_counted(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", max_bytes=100) as box:
        box.put("t", b"small")
        box.put("t", b"x" * 200)
        assert [m.payload for m in box.peek(10)] == [b"small"]
        assert box.dropped_total == 1


def test_expiry_by_age_is_counted(tmp_path: Path) -> None:
    clock = Clock()
    with Outbox(tmp_path / "o.db", max_age_s=60, clock=clock) as box:
        box.put("t", b"old")
        clock.t += 30
        box.put("t", b"newer")
        clock.t += 31
        assert [m.payload for m in box.peek(10)] == [b"newer"]
        assert box.expired_total == 1 and box.dropped_total == 0
        c = box.counters()
        assert c["queued"] == 1 and c["reported_lost"] == 0
        box.mark_reported(1)
        box.mark_reported(0)  # never goes back
        assert box.counters()["reported_lost"] == 1


def test_durability_settings(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as box:
        assert box._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert box._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_unreadable_file_is_an_outbox_error(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(OutboxError, match=r"o\.db"):
        Outbox(path)


def test_kill_9_loses_nothing_put(tmp_path: Path) -> None:
    """A child puts as fast as it can and reports each seq after put() returned; kill -9 it mid-stream."""
    path = tmp_path / "o.db"
    code = textwrap.dedent(
        f"""
        import sys
        from agent.telemetry.outbox import Outbox
        box = Outbox({str(path)!r})
        while True:
            seq = box.put("t", b"x" * 100)
            sys.stdout.write(f"{{seq}}\\n")
            sys.stdout.flush()
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=Path(__file__).parents[2]
    )
    assert proc.stdout is not None
    confirmed = 0
    for line in proc.stdout:
        confirmed = int(line)
        if confirmed >= 200:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    proc.stdout.close()
    with Outbox(path) as box:
        seqs = [m.seq for m in box.peek(100_000)]
        assert seqs[:confirmed] == list(range(1, confirmed + 1))
        next_seq = box.put("t", b"after")
        assert next_seq == seqs[-1] + 1


# -- messages (pure) ---------------------------------------------------------------------


def test_envelope_and_topics() -> None:
    topic, payload = messages.envelope("summary", "dev-1", "g1", 7, 12.34567, {"n": 3})
    assert topic == "outpost/v1/g1/dev-1/summary"
    assert json.loads(payload) == {"device_id": "dev-1", "seq": 7, "ts": 12.346, "n": 3}
    assert messages.state_topic("g1", "dev-1") == "outpost/v1/g1/dev-1/state"
    assert messages.cmd_topic("g1", "dev-1") == "outpost/v1/g1/dev-1/cmd"
    with pytest.raises(ValueError, match="seq"):
        messages.envelope("event", "d", "g", 1, 0.0, {"seq": 2})
    with pytest.raises(ValueError, match="kind"):
        messages.envelope("bogus", "d", "g", 1, 0.0, {})


@pytest.mark.parametrize("bad", ["", "a/b", "a+", "#", "x" * 129, "sp ace"])
def test_topic_levels_are_checked(bad: str) -> None:
    with pytest.raises(ValueError):
        messages.topic_prefix("g", bad)
    with pytest.raises(ValueError):
        messages.topic_prefix(bad, "d")


def test_state_body_keeps_its_own_keys() -> None:
    body = messages.state_body(True, 4, {"online": False, "bd_seq": 1, "seq": 9, "versions": {"m": 2}})
    assert body == {"online": True, "bd_seq": 4, "versions": {"m": 2}}


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        pytest.param(b'{"command": "update"}', messages.Command("update"), id="update"),
        pytest.param(
            b'{"command": "update", "id": "c-1", "args": {"force": true}, "extra": 1}',
            messages.Command("update", "c-1", {"force": True}),
            id="full",
        ),
        pytest.param(b'{"command": "rebirth"}', messages.Command("rebirth"), id="rebirth"),
        pytest.param(b'{"command": "format-disk"}', None, id="unknown"),
        pytest.param(b'{"command": 1}', None, id="not-a-string"),
        pytest.param(b'["update"]', None, id="not-an-object"),
        pytest.param(b"update", None, id="not-json"),
        pytest.param(b"\xff\xfe", None, id="not-utf8"),
        pytest.param(b'{"command": "update", "args": []}', None, id="bad-args"),
        pytest.param(b'{"command": "update", "id": "a b"}', None, id="bad-id"),
        pytest.param(b'{"command": "update", "pad": "' + b"x" * 70_000 + b'"}', None, id="too-big"),
    ],
)
def test_parse_command(payload: bytes, expected: messages.Command | None) -> None:
    assert messages.parse_command(payload) == expected


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://broker", messages.BrokerAddress("broker", 1883, False)),
        ("mqtts://broker", messages.BrokerAddress("broker", 8883, True)),
        ("mqtt://127.0.0.1:1999", messages.BrokerAddress("127.0.0.1", 1999, False)),
        ("mqtt://[::1]:1999/", messages.BrokerAddress("::1", 1999, False)),
    ],
)
def test_parse_broker_url(url: str, expected: messages.BrokerAddress) -> None:
    assert messages.parse_broker_url(url) == expected


@pytest.mark.parametrize("url", ["http://x", "mqtt://", "mqtt://u:p@x", "mqtt://x:99999", "mqtt://x/path"])
def test_parse_broker_url_refuses(url: str) -> None:
    with pytest.raises(ValueError):
        messages.parse_broker_url(url)


def test_config_validation() -> None:
    from agent.config import MqttConfig

    with pytest.raises(ConfigError, match=r"mqtt\.url"):
        MqttConfig(url="http://x")
    with pytest.raises(ConfigError, match=r"mqtt\.qos"):
        MqttConfig(qos=3)
    with pytest.raises(ConfigError, match="reconnect_min_s"):
        MqttConfig(reconnect_min_s=10, reconnect_max_s=1)
    with pytest.raises(ConfigError, match="key_file"):
        MqttConfig(key_file="k.pem")
