"""The fleet: devices' MQTT state and telemetry, stored by the hub.

    store = FleetStore(db); store.create_tables()          # tables on the registry's database
    consumer = FleetConsumer(store, "mqtt://broker:1883", client_id="outpost-hub-a")
    consumer.start(); ...; consumer.stop()
    store.devices(); store.device("dev-001"); store.messages("dev-001")

    queries = FleetQueries(store, registry); queries.summary("wine", 3, since="1h")
    queries.drift("wine", 3); queries.alerts(kind="rollback")

Modules: `rules` (pure: topics, payloads, the bd_seq state order), `batch` (pure: what a batch
of messages writes), `store` (tables, dedupe, retention; a batch in a few statements),
`consumer` (paho-mqtt 2.x subscriber with a bounded queue and a writer thread),
`ledger` (summary/drift windows indexed for aggregation, alerts; kept by age), `buckets` (the
error-rate rule's running sums per model, version and bucket), `alerts` (pure:
which telemetry raises which alert), `aggregate` (pure: sums, derived figures, fleet drift),
`queries` (the API's answers from the store, the registry and `aggregate`).
"""

from hub.fleet.alerts import AlertRules
from hub.fleet.consumer import (
    DEFAULT_QUEUE_SIZE,
    DEFAULT_SESSION_EXPIRY_S,
    BrokerAddress,
    FleetConfigError,
    FleetConsumer,
    FleetUnavailable,
)
from hub.fleet.queries import DriftSettings, FleetQueries, TimeRange
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
    "AlertRules",
    "ApplyReport",
    "BrokerAddress",
    "DeviceInfo",
    "DriftSettings",
    "FleetConfigError",
    "FleetConsumer",
    "FleetQueries",
    "FleetStore",
    "FleetUnavailable",
    "Incoming",
    "Invalid",
    "StateMsg",
    "TelemetryMsg",
    "TimeRange",
    "cmd_topic",
    "parse_message",
    "state_applies",
]
