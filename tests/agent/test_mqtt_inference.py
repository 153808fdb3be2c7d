"""Inference over MQTT, the pure parts: the [mqtt_inference] config, topics and answer payloads."""

from __future__ import annotations

from typing import Any

import pytest

from agent.config import MqttInferenceConfig, parse_config
from agent.errors import ConfigError


def test_off_by_default() -> None:
    cfg = parse_config({})
    assert cfg.mqtt_inference == MqttInferenceConfig()
    assert cfg.mqtt_inference.enabled is False


def test_every_key_is_read() -> None:
    doc = {
        "enabled": True,
        "url": "mqtts://broker.local:8884",
        "topic_prefix": "plant/{group}/{device_id}/ml",
        "qos": 2,
        "max_inflight": 3,
        "max_payload_bytes": 1000,
        "username": "pump-7",
        "password_file": "/etc/outpost/mqtt-infer.pass",
        "ca_file": "/etc/ssl/local-ca.pem",
        "keepalive_s": 15,
        "reconnect_min_s": 1,
        "reconnect_max_s": 2.5,
    }
    cfg = parse_config({"device_id": "pump-7", "group": "lab", "mqtt_inference": doc})
    assert cfg.mqtt_inference == MqttInferenceConfig(
        enabled=True,
        url="mqtts://broker.local:8884",
        topic_prefix="plant/{group}/{device_id}/ml",
        qos=2,
        max_inflight=3,
        max_payload_bytes=1000,
        username="pump-7",
        password_file="/etc/outpost/mqtt-infer.pass",
        ca_file="/etc/ssl/local-ca.pem",
        keepalive_s=15,
        reconnect_min_s=1.0,
        reconnect_max_s=2.5,
    )
    assert cfg.mqtt_inference.prefix_for("pump-7", "lab") == "plant/lab/pump-7/ml"


CONFIG_ERRORS = [
    pytest.param({"url": "tcp://x:1883"}, "mqtt_inference.url: expected mqtt://", id="url-scheme"),
    pytest.param(
        {"topic_prefix": ""}, "mqtt_inference.topic_prefix: expected topic levels", id="prefix-empty"
    ),
    pytest.param({"topic_prefix": "a/"}, "no leading or trailing", id="prefix-trailing-slash"),
    pytest.param({"topic_prefix": "/a"}, "no leading or trailing", id="prefix-leading-slash"),
    pytest.param({"topic_prefix": "a//b"}, "no empty level", id="prefix-empty-level"),
    pytest.param({"topic_prefix": "$SYS/x"}, "topic_prefix", id="prefix-dollar"),
    pytest.param({"topic_prefix": "a/+/b"}, "wildcards", id="prefix-plus"),
    pytest.param({"topic_prefix": "a/#"}, "wildcards", id="prefix-hash"),
    pytest.param({"topic_prefix": "a/{model}"}, "only {device_id} and {group}", id="prefix-unknown-field"),
    pytest.param({"topic_prefix": "a/{"}, "only {device_id} and {group}", id="prefix-bad-brace"),
    pytest.param({"qos": 3}, "mqtt_inference.qos: must be 0, 1 or 2", id="qos"),
    pytest.param({"max_inflight": 0}, "mqtt_inference.max_inflight: must be at least 1", id="inflight"),
    pytest.param({"max_payload_bytes": 0}, "mqtt_inference.max_payload_bytes", id="payload"),
    pytest.param({"keepalive_s": 0}, "mqtt_inference.keepalive_s", id="keepalive"),
    pytest.param(
        {"reconnect_min_s": 0}, "mqtt_inference.reconnect_min_s: must be a positive", id="reconnect-0"
    ),
    pytest.param({"reconnect_max_s": float("nan")}, "mqtt_inference.reconnect_max_s", id="reconnect-nan"),
    pytest.param(
        {"reconnect_min_s": 5, "reconnect_max_s": 1}, "must not be greater than", id="reconnect-order"
    ),
    pytest.param({"password_file": "/p"}, "mqtt_inference.username is empty", id="password-no-user"),
    pytest.param({"enable": True}, "unknown key mqtt_inference.enable", id="unknown-key"),
    pytest.param({"enabled": "yes"}, "mqtt_inference.enabled: expected bool", id="wrong-type"),
    pytest.param({"max_inflight": 1.5}, "mqtt_inference.max_inflight: expected an integer", id="float-int"),
]


@pytest.mark.parametrize(("section", "message"), CONFIG_ERRORS)
def test_config_errors_name_the_key(section: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        parse_config({"mqtt_inference": section})
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("device_id", "group"),
    [
        pytest.param("a/b", "g", id="slash-in-device"),
        pytest.param("d", "+", id="plus-in-group"),
        pytest.param("d#", "g", id="hash-in-device"),
    ],
)
def test_ids_that_cannot_be_a_topic_level(device_id: str, group: str) -> None:
    cfg = MqttInferenceConfig(topic_prefix="x/{group}/{device_id}")
    with pytest.raises(ConfigError, match="cannot be a topic level"):
        cfg.prefix_for(device_id, group)
