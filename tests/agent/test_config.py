"""agent.config: TOML into frozen dataclasses; every mistake is a ConfigError naming its key.

A typo on a device must not fall back to a default silently, so most of this file is a
table of wrong documents and the key each error message must name.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from agent.config import (
    AgentConfig,
    ModelServingConfig,
    RuntimeConfig,
    ServerConfig,
    load_config,
    parse_config,
)
from agent.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_empty_document_gives_the_defaults() -> None:
    cfg = parse_config({})
    assert cfg == AgentConfig()
    assert cfg.server.socket == "/run/outpost/agent.sock"
    assert cfg.server.tcp == ""
    assert cfg.runtime.models == {}
    assert cfg.data_path == Path("/var/lib/outpost")


def test_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")) == AgentConfig()


def test_config_is_frozen() -> None:
    cfg = parse_config({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.device_id = "other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.server.socket = "/tmp/x"  # type: ignore[misc]


def test_contract_keys_from_the_architecture_parse(tmp_path: Path) -> None:
    # The example in architecture.md, verbatim: these names are a contract with operators.
    path = write(
        tmp_path,
        """
device_id = "dev-001"
group = "default"
data_dir = "/var/lib/outpost"
[server]
socket = "/run/outpost/agent.sock"
tcp = ""                       # e.g. "127.0.0.1:8601"; empty = off
[hub]
url = "http://127.0.0.1:8700"  # empty = no hub: serve sideloaded packages only
trusted_root = "/etc/outpost/root.json"
poll_interval_s = 30
[mqtt]
url = "mqtt://127.0.0.1:1883"  # empty = no telemetry publishing (still buffered on disk)
""",
    )
    cfg = load_config(path)
    assert cfg.device_id == "dev-001"
    assert cfg.group == "default"
    assert cfg.data_dir == "/var/lib/outpost"
    assert cfg.server.socket == "/run/outpost/agent.sock"
    assert cfg.hub.url == "http://127.0.0.1:8700"
    assert cfg.hub.trusted_root == "/etc/outpost/root.json"
    # An integer where a float is expected is fine (TOML writes 30, people mean 30.0).
    assert cfg.hub.poll_interval_s == 30.0
    assert isinstance(cfg.hub.poll_interval_s, float)
    assert cfg.mqtt.url == "mqtt://127.0.0.1:1883"


def test_shipped_default_config_parses_to_the_defaults() -> None:
    # packaging/agent.toml shows every key with its default; it must stay in step with the code.
    shipped = REPO / "packaging" / "agent.toml"
    if not shipped.is_file():
        pytest.skip("packaging/agent.toml is not in this checkout")
    assert load_config(shipped) == AgentConfig()


def test_every_key_is_read(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
device_id = "pump-7"
group = "canary"
data_dir = "/srv/outpost"
log_level = "debug"
[server]
socket = "/tmp/a.sock"
socket_mode = 0o600
socket_group = "apps"
tcp = "127.0.0.1:8601"
max_body_bytes = 1024
max_header_bytes = 512
max_connections = 3
max_pipelined = 2
idle_timeout_s = 1.5
request_timeout_s = 2
drain_timeout_s = 3.0
[runtime]
intra_op_threads = 2
inter_op_threads = 3
cpu_mem_arena = true
workers = 4
batching = false
max_batch_size = 8
max_queue_delay_ms = 1.5
inline_max_ms = 0
[runtime.models.iris]
batching = true
max_batch_size = 16
max_queue_delay_ms = 2
[runtime.models."wine-v2"]
batching = false
[hub]
url = "https://hub.example.net"
trusted_root = "/etc/outpost/r.json"
poll_interval_s = 5.5
[mqtt]
url = "mqtt://broker:1883"
""",
    )
    cfg = load_config(path)
    assert cfg.server == ServerConfig(
        socket="/tmp/a.sock",
        socket_mode=0o600,
        socket_group="apps",
        tcp="127.0.0.1:8601",
        max_body_bytes=1024,
        max_header_bytes=512,
        max_connections=3,
        max_pipelined=2,
        idle_timeout_s=1.5,
        request_timeout_s=2.0,
        drain_timeout_s=3.0,
    )
    assert cfg.runtime == RuntimeConfig(
        intra_op_threads=2,
        inter_op_threads=3,
        cpu_mem_arena=True,
        workers=4,
        batching=False,
        max_batch_size=8,
        max_queue_delay_ms=1.5,
        inline_max_ms=0.0,
        models={
            "iris": ModelServingConfig(max_batch_size=16, max_queue_delay_ms=2.0, batching=True),
            "wine-v2": ModelServingConfig(batching=False),
        },
    )
    assert (cfg.device_id, cfg.group, cfg.log_level) == ("pump-7", "canary", "debug")
    assert cfg.hub.poll_interval_s == 5.5
    assert cfg.mqtt.url == "mqtt://broker:1883"


def test_model_override_leaves_unset_fields_none() -> None:
    cfg = parse_config({"runtime": {"models": {"iris": {"max_batch_size": 4}}}})
    assert cfg.runtime.models["iris"] == ModelServingConfig(max_batch_size=4)
    assert cfg.runtime.models["iris"].batching is None  # None: use the runtime-wide setting


@pytest.mark.parametrize(
    "tcp",
    [
        pytest.param("127.0.0.1:8601", id="ipv4"),
        pytest.param("localhost:1", id="name-low-port"),
        pytest.param("[::1]:65535", id="ipv6-high-port"),
        pytest.param("0.0.0.0:80", id="any"),
    ],
)
def test_good_tcp_addresses(tcp: str) -> None:
    assert parse_config({"server": {"tcp": tcp}}).server.tcp == tcp


ERRORS = [
    # unknown keys, at every level
    pytest.param({"device": "x"}, "unknown key device;", id="unknown-top-level"),
    pytest.param({"server": {"sockett": "/x"}}, "unknown key server.sockett", id="unknown-in-server"),
    pytest.param({"runtime": {"thread": 2}}, "unknown key runtime.thread", id="unknown-in-runtime"),
    pytest.param({"hub": {"URL": "x"}}, "unknown key hub.URL", id="unknown-case-differs"),
    pytest.param({"mqtt": {"port": 1883}}, "unknown key mqtt.port", id="unknown-in-mqtt"),
    pytest.param(
        {"runtime": {"models": {"iris": {"max_batch": 4}}}},
        "unknown key runtime.models.iris.max_batch",
        id="unknown-in-model-table",
    ),
    pytest.param({"telemetry": {}}, "unknown key telemetry", id="unknown-table"),
    # wrong types
    pytest.param({"server": {"max_connections": "10"}}, "server.max_connections", id="string-for-int"),
    pytest.param({"server": {"max_connections": True}}, "server.max_connections", id="bool-for-int"),
    pytest.param({"server": {"max_connections": 10.0}}, "server.max_connections", id="float-for-int"),
    pytest.param({"runtime": {"batching": 1}}, "runtime.batching", id="int-for-bool"),
    pytest.param({"runtime": {"cpu_mem_arena": "false"}}, "runtime.cpu_mem_arena", id="string-for-bool"),
    pytest.param({"server": {"idle_timeout_s": "60"}}, "server.idle_timeout_s", id="string-for-float"),
    pytest.param({"hub": {"poll_interval_s": True}}, "hub.poll_interval_s", id="bool-for-float"),
    pytest.param({"device_id": 7}, "device_id", id="int-for-string"),
    pytest.param({"server": {"socket": ["/a", "/b"]}}, "server.socket", id="list-for-string"),
    pytest.param({"server": "/run/x.sock"}, "server: expected a table", id="string-for-table"),
    pytest.param({"runtime": {"models": ["iris"]}}, "runtime.models: expected a table", id="list-for-models"),
    pytest.param(
        {"runtime": {"models": {"iris": 4}}}, "runtime.models.iris: expected a table", id="model-int"
    ),
    pytest.param(
        {"runtime": {"models": {"iris": {"batching": "yes"}}}},
        "runtime.models.iris.batching",
        id="model-string-for-bool",
    ),
    pytest.param(
        {"runtime": {"models": {"iris": {"max_batch_size": 1.5}}}},
        "runtime.models.iris.max_batch_size",
        id="model-float-for-int",
    ),
    # values out of range
    pytest.param({"log_level": "verbose"}, "log_level", id="bad-log-level"),
    pytest.param(
        {"server": {"socket": "", "tcp": ""}}, "server.socket and server.tcp", id="nothing-to-serve"
    ),
    pytest.param({"server": {"socket_mode": 0o1777}}, "server.socket_mode", id="socket-mode-too-big"),
    pytest.param({"server": {"socket_mode": -1}}, "server.socket_mode", id="socket-mode-negative"),
    pytest.param({"server": {"max_body_bytes": 0}}, "server.max_body_bytes", id="zero-body-limit"),
    pytest.param({"server": {"max_pipelined": -1}}, "server.max_pipelined", id="negative-pipelined"),
    pytest.param({"server": {"idle_timeout_s": 0}}, "server.idle_timeout_s", id="zero-idle-timeout"),
    pytest.param({"server": {"drain_timeout_s": -1.0}}, "server.drain_timeout_s", id="negative-drain"),
    pytest.param({"server": {"busy_poll_us": -1}}, "server.busy_poll_us", id="negative-busy-poll"),
    pytest.param({"server": {"busy_poll_us": 10_001}}, "server.busy_poll_us", id="busy-poll-too-long"),
    pytest.param({"server": {"busy_poll_us": 50.5}}, "server.busy_poll_us", id="busy-poll-float"),
    pytest.param({"runtime": {"workers": 0}}, "runtime.workers", id="zero-workers"),
    pytest.param({"runtime": {"max_batch_size": 0}}, "runtime.max_batch_size", id="zero-batch"),
    pytest.param(
        {"runtime": {"max_queue_delay_ms": -0.5}}, "runtime.max_queue_delay_ms", id="negative-delay"
    ),
    pytest.param({"runtime": {"inline_max_ms": -1}}, "runtime.inline_max_ms", id="negative-inline"),
    pytest.param({"hub": {"poll_interval_s": 0}}, "hub.poll_interval_s", id="zero-poll"),
    # bad TCP addresses
    pytest.param({"server": {"tcp": "8601"}}, "server.tcp", id="tcp-no-host"),
    pytest.param({"server": {"tcp": ":8601"}}, "server.tcp", id="tcp-empty-host"),
    pytest.param({"server": {"tcp": "localhost:"}}, "server.tcp", id="tcp-empty-port"),
    pytest.param({"server": {"tcp": "localhost:http"}}, "server.tcp", id="tcp-named-port"),
    pytest.param({"server": {"tcp": "localhost:0"}}, "server.tcp", id="tcp-port-zero"),
    pytest.param({"server": {"tcp": "localhost:65536"}}, "server.tcp", id="tcp-port-too-big"),
    pytest.param({"server": {"tcp": "localhost:-1"}}, "server.tcp", id="tcp-port-negative"),
    # Known defects (see the reasons).
    pytest.param(
        {"server": {"tcp": "localhost:²"}},
        "server.tcp",
        id="tcp-port-superscript-digit",
    ),
    pytest.param(
        {"server": {"request_timeout_s": float("nan")}},
        "server.request_timeout_s",
        id="nan-timeout",
    ),
    pytest.param(
        {"runtime": {"max_queue_delay_ms": float("nan")}},
        "runtime.max_queue_delay_ms",
        id="nan-delay",
    ),
    pytest.param(
        {"runtime": {"models": {"iris": {"max_batch_size": 0}}}},
        "runtime.models.iris.max_batch_size",
        id="model-zero-batch",
    ),
    pytest.param(
        {"runtime": {"models": {"iris": {"max_queue_delay_ms": -5.0}}}},
        "runtime.models.iris.max_queue_delay_ms",
        id="model-negative-delay",
    ),
    pytest.param({"monitor": {"window_s": 0}}, "monitor.window_s", id="monitor-zero-window"),
    pytest.param({"monitor": {"window_requests": -1}}, "monitor.window_requests", id="monitor-neg-requests"),
    pytest.param({"monitor": {"drift_k": 0}}, "monitor.drift_k", id="monitor-zero-k"),
    pytest.param({"monitor": {"drift_alpha": 1.0}}, "monitor.drift_alpha", id="monitor-alpha-one"),
    pytest.param({"monitor": {"drift_correction": "holm"}}, "monitor.drift_correction", id="monitor-method"),
    pytest.param({"monitor": {"psi_threshold": float("nan")}}, "monitor.psi_threshold", id="monitor-nan-psi"),
    pytest.param({"monitor": {"feedback_ids": -5}}, "monitor.feedback_ids", id="monitor-neg-ids"),
    pytest.param({"monitor": {"window": 5}}, "monitor.window", id="monitor-unknown-key"),
]


def test_monitor_keys_are_read() -> None:
    doc = {
        "monitor": {
            "enabled": False,
            "window_s": 30,
            "window_requests": 500,
            "drift_min_rows": 50,
            "drift_alpha": 0.01,
            "drift_correction": "bonferroni",
            "drift_k": 5,
            "psi_threshold": 0.25,
            "feedback_ids": 0,
        }
    }
    m = parse_config(doc).monitor
    assert (m.enabled, m.window_s, m.window_requests, m.drift_min_rows) == (False, 30.0, 500, 50)
    assert (m.drift_alpha, m.drift_correction, m.drift_k, m.psi_threshold, m.feedback_ids) == (
        0.01,
        "bonferroni",
        5,
        0.25,
        0,
    )


@pytest.mark.parametrize(("doc", "key"), ERRORS)
def test_config_error_names_the_key(doc: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(doc)
    assert key in str(info.value)


def test_unknown_key_message_lists_the_known_keys() -> None:
    # The operator should see the right spelling next to the wrong one.
    with pytest.raises(ConfigError, match=r"unknown key server\.sockett; known keys here: .*\bsocket\b"):
        parse_config({"server": {"sockett": "/x"}})


@pytest.mark.parametrize(
    ("text", "key"),
    [
        pytest.param('[server]\nsockett = "/tmp/x.sock"\n', "server.sockett", id="unknown-nested"),
        pytest.param('[runtime]\nworkers = "2"\n', "runtime.workers", id="string-for-int"),
        pytest.param(
            "[runtime.models.iris]\nbatching = 0\n", "runtime.models.iris.batching", id="model-table"
        ),
        pytest.param('[server]\ntcp = "nowhere"\n', "server.tcp", id="bad-tcp"),
    ],
)
def test_file_errors_name_the_file_and_the_key(tmp_path: Path, text: str, key: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert key in str(info.value)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("device_id = \n", id="missing-value"),
        pytest.param('device_id = "a"\ndevice_id = "b"\n', id="duplicate-key"),
        pytest.param("[server\n", id="unclosed-table"),
        pytest.param("device_id = 'unterminated\n", id="unterminated-string"),
    ],
)
def test_invalid_toml_is_a_config_error(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value.__cause__, Exception)  # the parser's detail is kept for the log


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match="config file not found") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_directory_instead_of_a_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=str(tmp_path)):
        load_config(tmp_path)


def test_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_bytes(b'device_id = "caf\xe9"\n')  # Latin-1, as an editor on a device might save it
    with pytest.raises(ConfigError, match=r"agent\.toml"):
        load_config(path)
