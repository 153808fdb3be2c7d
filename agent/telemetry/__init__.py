"""Telemetry: the device's MQTT reports, stored on disk first and sent when the broker is reachable.

- `messages`: topics and JSON payloads (pure).
- `outbox`: the bounded, crash-safe store-and-forward queue (SQLite).
- `mqtt`: the paho-mqtt adapter and the publisher thread that drains the outbox.
"""

from agent.telemetry.messages import (
    COMMANDS,
    Command,
    cmd_topic,
    envelope,
    parse_broker_url,
    parse_command,
    state_topic,
    topic_prefix,
)
from agent.telemetry.mqtt import TelemetryClient, on_loop
from agent.telemetry.outbox import Message, Outbox

__all__ = [
    "COMMANDS",
    "Command",
    "Message",
    "Outbox",
    "TelemetryClient",
    "cmd_topic",
    "envelope",
    "on_loop",
    "parse_broker_url",
    "parse_command",
    "state_topic",
    "topic_prefix",
]
