"""Inference over MQTT, the pure parts: the [mqtt_inference] config, topics and answer payloads.

The adapter runs against a real agent and a real Mosquitto in tests/e2e/test_mqtt_inference.py.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from agent.config import MqttInferenceConfig, parse_config
from agent.errors import ConfigError
from agent.serving.http import Response, error_response
from agent.serving.mqtt_messages import answer_of, error_payload, header_length_of, infer_route, subscriptions


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


PREFIX = "outpost/local/dev-1"


@pytest.mark.parametrize(
    ("topic", "route"),
    [
        pytest.param(f"{PREFIX}/models/wine/infer", ("wine", None), id="default-version"),
        pytest.param(f"{PREFIX}/models/wine/versions/3/infer", ("wine", "3"), id="versioned"),
        pytest.param(f"{PREFIX}/models/wine", None, id="no-infer"),
        pytest.param(f"{PREFIX}/models//infer", None, id="empty-model"),
        pytest.param(f"{PREFIX}/models/wine/versions//infer", None, id="empty-version"),
        pytest.param(f"{PREFIX}/models/wine/versions/3/ready", None, id="not-infer"),
        pytest.param(f"{PREFIX}/models/wine/infer/x", None, id="trailing-level"),
        pytest.param("outpost/local/dev-2/models/wine/infer", None, id="other-device"),
        pytest.param(f"{PREFIX}x/models/wine/infer", None, id="prefix-is-not-a-level"),
    ],
)
def test_infer_route(topic: str, route: tuple[str, str | None] | None) -> None:
    assert infer_route(PREFIX, topic) == route


def test_subscriptions_match_the_routes() -> None:
    assert subscriptions(PREFIX) == [f"{PREFIX}/models/+/infer", f"{PREFIX}/models/+/versions/+/infer"]


def test_answer_of_a_prediction_is_the_body() -> None:
    body = b'{"model_name":"m","outputs":[]}'
    assert answer_of(Response(200, body)) == (body, None)
    binary = Response(
        200, body + b"\x00" * 8, b"application/octet-stream", [(b"inference-header-content-length", b"31")]
    )
    assert answer_of(binary) == (binary.body, 31)


@pytest.mark.parametrize("status", [400, 404, 413, 500, 503])
def test_answer_of_an_error_carries_its_status(status: int) -> None:
    payload, header_length = answer_of(error_response(status, "no model named 'x'"))
    assert header_length is None
    assert orjson.loads(payload) == {"error": "no model named 'x'", "status": status}
    assert orjson.loads(error_payload(503, "busy")) == {"error": "busy", "status": 503}


@pytest.mark.parametrize(
    ("props", "expected"),
    [
        pytest.param([], None, id="none"),
        pytest.param([("other", "1")], None, id="other-property"),
        pytest.param([("Inference-Header-Content-Length", "42")], 42, id="exact-case"),
        pytest.param([("inference-header-content-length", "0")], 0, id="lower-case"),
    ],
)
def test_header_length_of(props: list[tuple[str, str]], expected: int | None) -> None:
    assert header_length_of(props) == expected


@pytest.mark.parametrize("value", ["-1", "x", "1.5", "", "٣"])
def test_header_length_of_refuses_non_integers(value: str) -> None:
    with pytest.raises(ValueError, match="non-negative integer"):
        header_length_of([("Inference-Header-Content-Length", value)])
