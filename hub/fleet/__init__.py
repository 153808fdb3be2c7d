"""The fleet: devices' MQTT state and telemetry, stored by the hub.

    store = FleetStore(db); store.create_tables()          # tables on the registry's database
    consumer = FleetConsumer(store, "mqtt://broker:1883", client_id="outpost-hub-a")
    consumer.start(); ...; consumer.stop()
    store.devices(); store.device("dev-001"); store.messages("dev-001")

Modules: `rules` (pure: topics, payloads, the bd_seq state order), `store` (tables, dedupe,
retention), `consumer` (paho-mqtt 2.x subscriber with a bounded queue and a writer thread).
"""

from hub.fleet.consumer import (
    DEFAULT_QUEUE_SIZE,
    DEFAULT_SESSION_EXPIRY_S,
    BrokerAddress,
    FleetConfigError,
    FleetConsumer,
    FleetUnavailable,
)
from hub.fleet.rules import (
    SHARED_FILTER,
    STATE_FILTER,
    Invalid,
    StateMsg,
    TelemetryMsg,
    cmd_topic,
    parse_message,
    state_applies,
)
from hub.fleet.store import DEFAULT_KEEP_PER_DEVICE, ApplyReport, DeviceInfo, FleetStore, Incoming

__all__ = [
    "DEFAULT_KEEP_PER_DEVICE",
    "DEFAULT_QUEUE_SIZE",
    "DEFAULT_SESSION_EXPIRY_S",
    "SHARED_FILTER",
    "STATE_FILTER",
    "ApplyReport",
    "BrokerAddress",
    "DeviceInfo",
    "FleetConfigError",
    "FleetConsumer",
    "FleetStore",
    "FleetUnavailable",
    "Incoming",
    "Invalid",
    "StateMsg",
    "TelemetryMsg",
    "cmd_topic",
    "parse_message",
    "state_applies",
]
