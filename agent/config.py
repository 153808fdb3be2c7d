"""The agent's configuration: TOML into frozen dataclasses.

Unknown keys and wrong types are errors that name the key (`server.socket`),
because a typo in a device's config must not silently fall back to a default.
Limits (sizes, timeouts, queue bounds) are named defaults here.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/outpost/agent.toml")
MAX_BUSY_POLL_US = 10_000  # past this, polling is a busy loop, not a bridge to the next request


@dataclass(frozen=True)
class ServerConfig:
    socket: str = "/run/outpost/agent.sock"
    socket_mode: int = 0o660
    socket_group: str = ""  # empty: the agent's own group
    tcp: str = ""  # "HOST:PORT"; empty = off
    max_body_bytes: int = 64 * 1024 * 1024
    max_header_bytes: int = 64 * 1024
    max_connections: int = 1024
    max_pipelined: int = 64  # queued requests per connection before reading pauses
    idle_timeout_s: float = 60.0  # keep-alive connection with no request
    request_timeout_s: float = 30.0  # from a request's first byte to its last
    drain_timeout_s: float = 20.0  # SIGTERM: how long in-flight requests may take
    # After an answer, poll for the next request up to this long instead of letting the CPU
    # idle (adaptive: agent.serving.busypoll); 0 = off.
    busy_poll_us: int = 100


@dataclass(frozen=True)
class ModelServingConfig:
    """Per-model overrides under [runtime.models.NAME]."""

    max_batch_size: int | None = None
    max_queue_delay_ms: float | None = None
    batching: bool | None = None
    # The response cache (agent.runtime.cache); unset: [runtime]'s cache_* keys.
    cache_ttl_s: float | None = None
    cache_max_entries: int | None = None
    cache_max_bytes: int | None = None
    # Execution providers for this model, in order of preference; None: [runtime] providers.
    providers: tuple[str, ...] | None = None


@dataclass(frozen=True)
class RuntimeConfig:
    intra_op_threads: int = 1
    inter_op_threads: int = 1
    # The CPU arena can grow a small model's RSS to gigabytes (onnxruntime#11627).
    cpu_mem_arena: bool = False
    workers: int = 1  # threads running onnxruntime sessions
    batching: bool = True
    max_batch_size: int = 64
    max_queue_delay_ms: float = 0.0  # extra wait to fill a batch; 0 = batch what is queued
    # A model whose single-row run takes less than this (measured at load) runs on
    # the event loop: handing it to a worker thread and back would cost more than
    # the run itself. 0 = always use the worker threads.
    inline_max_ms: float = 0.5
    # The response cache: identical inputs within cache_ttl_s seconds get the answer the version
    # gave before (per model version, bounded by entries and bytes). 0 = off; per model in
    # [runtime.models.NAME]. See agent.runtime.cache.
    cache_ttl_s: float = 0.0
    cache_max_entries: int = 1024
    cache_max_bytes: int = 16 * 1024 * 1024
    # onnxruntime execution providers in order of preference, e.g. ["OpenVINOExecutionProvider",
    # "CPUExecutionProvider"]; those this onnxruntime build lacks are skipped (status says so)
    # and CPU is always the last resort (agent.runtime.providers).
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    # Hardware tags (agent.runtime.hardware) used instead of the detected ones when not empty:
    # an override for a device whose detection is wrong, e.g. ["arch:x86_64", "cpu:avx2", "ep:cpu"].
    hardware_tags: tuple[str, ...] = ()
    # The memory budget (agent.runtime.budget): the agent's resident set, as the budget counts it
    # (its own baseline + each loaded version's larger of estimated and measured cost), may not
    # pass this many MiB; a version that would is refused before loading, or least recently used
    # versions nothing pins are unloaded to make room. 0 = no budget.
    memory_budget_mb: int = 0
    models: dict[str, ModelServingConfig] = field(default_factory=dict)

    def providers_for(self, model: str) -> tuple[str, ...]:
        """The execution providers of a model, in order of preference."""
        per = self.models.get(model)
        return self.providers if per is None or per.providers is None else per.providers

    def cache_settings(self, model: str) -> tuple[float, int, int]:
        """(ttl_s, max_entries, max_bytes) of a model's response cache; ttl_s 0 = off."""
        per = self.models.get(model)
        if per is None:
            return self.cache_ttl_s, self.cache_max_entries, self.cache_max_bytes
        return (
            self.cache_ttl_s if per.cache_ttl_s is None else per.cache_ttl_s,
            self.cache_max_entries if per.cache_max_entries is None else per.cache_max_entries,
            self.cache_max_bytes if per.cache_max_bytes is None else per.cache_max_bytes,
        )


@dataclass(frozen=True)
class HubConfig:
    url: str = ""
    trusted_root: str = "/etc/outpost/root.json"
    poll_interval_s: float = 30.0
    # HTTP to the hub (agent.update.fetcher). Timeouts per request: connecting, and the
    # longest silence while reading.
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0
    # Connection errors, 429 and 5xx are retried (max_attempts tries in all), waiting a random
    # time up to min(retry_max_s, retry_base_s * 2**(n-1)) after the n-th try ("full jitter").
    max_attempts: int = 4
    retry_base_s: float = 0.5
    retry_max_s: float = 10.0
    # Caps on what is read: metadata whose length no signed file states (root, and the
    # snapshot/targets roles if unstated), and any one target file (a model). The timestamp
    # keeps python-tuf's own 16 KiB cap.
    max_metadata_bytes: int = 4 * 1024 * 1024
    max_target_bytes: int = 2 * 1024 * 1024 * 1024
    # Free space kept on the disk after a download, on top of the files themselves.
    min_free_bytes: int = 64 * 1024 * 1024
    proxy: str = ""  # e.g. "http://proxy:3128" for http and https; empty = the environment's
    ca_bundle: str = ""  # PEM file of CAs to trust for https; empty = the system's/certifi's
    tls_verify: bool = True  # false only for testing: https without checking the certificate
    client_cert: str = ""  # PEM certificate (may hold the key too) for mutual TLS; empty = none
    client_key: str = ""  # PEM private key of client_cert when it is a separate file

    def __post_init__(self) -> None:
        for key in ("connect_timeout_s", "read_timeout_s"):
            if not getattr(self, key) > 0:  # `not x > 0` also refuses NaN
                raise ConfigError(f"hub.{key}: must be a positive number")
        for key in ("retry_base_s", "retry_max_s"):
            if not getattr(self, key) >= 0:
                raise ConfigError(f"hub.{key}: must be a number, not negative")
        for key in ("max_attempts", "max_metadata_bytes", "max_target_bytes"):
            if getattr(self, key) < 1:
                raise ConfigError(f"hub.{key}: must be at least 1")
        if self.min_free_bytes < 0:
            raise ConfigError("hub.min_free_bytes: must not be negative")
        if self.client_key and not self.client_cert:
            raise ConfigError("hub.client_key: is set but hub.client_cert is empty")


@dataclass(frozen=True)
class MqttConfig:
    # mqtt://HOST[:PORT] (1883) or mqtts://HOST[:PORT] (TLS, 8883). Empty: nothing is published,
    # telemetry is still buffered in the outbox on disk (within its bounds).
    url: str = ""
    username: str = ""
    password: str = ""
    ca_file: str = ""  # PEM CAs that sign the broker's certificate; empty = the system's (with mqtts)
    cert_file: str = ""  # PEM client certificate for mutual TLS; empty = none
    key_file: str = ""  # its private key, when it is a separate file
    tls_insecure: bool = False  # true only for testing: do not check the broker's host name
    keepalive_s: int = 60
    qos: int = 1  # of summary, drift and event messages (state is always QoS 1)
    # The outbox (SQLite under data_dir): when full, the OLDEST messages are dropped and counted.
    outbox_max_messages: int = 10_000
    outbox_max_bytes: int = 64 * 1024 * 1024
    outbox_max_age_s: float = 7 * 24 * 3600.0
    # Reconnect: wait reconnect_min_s after a failure, doubling up to reconnect_max_s.
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 60.0
    publish_timeout_s: float = 10.0  # waiting for the broker's PUBACK before re-sending
    max_inflight: int = 20  # messages published and not yet acknowledged (also bounds paho's memory queue)

    def __post_init__(self) -> None:
        if self.url and not self.url.startswith(("mqtt://", "mqtts://")):
            raise ConfigError(f"mqtt.url: expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]: {self.url!r}")
        if self.qos not in (0, 1, 2):
            raise ConfigError("mqtt.qos: must be 0, 1 or 2")
        for key in ("keepalive_s", "outbox_max_messages", "outbox_max_bytes", "max_inflight"):
            if getattr(self, key) < 1:
                raise ConfigError(f"mqtt.{key}: must be at least 1")
        for key in ("outbox_max_age_s", "reconnect_min_s", "reconnect_max_s", "publish_timeout_s"):
            if not getattr(self, key) > 0:  # `not x > 0` also refuses NaN
                raise ConfigError(f"mqtt.{key}: must be a positive number")
        if self.reconnect_min_s > self.reconnect_max_s:
            raise ConfigError("mqtt.reconnect_min_s: must not be greater than mqtt.reconnect_max_s")
        if self.key_file and not self.cert_file:
            raise ConfigError("mqtt.key_file: is set but mqtt.cert_file is empty")


@dataclass(frozen=True)
class MqttInferenceConfig:
    """[mqtt_inference]: OIP inference requests through a local broker (agent.serving.mqtt).

    Requests arrive on `{topic_prefix}/models/{model}[/versions/{v}]/infer`; each answer goes to
    the request's MQTT v5 response topic. A broker of its own: not the telemetry [mqtt] one.
    """

    enabled: bool = False
    url: str = "mqtt://127.0.0.1:1883"  # mqtt://HOST[:PORT] or mqtts://HOST[:PORT]
    topic_prefix: str = "outpost/local/{device_id}"  # {device_id} and {group} are filled in
    qos: int = 1  # of the subscriptions and of the answers
    max_inflight: int = 16  # requests being answered at once; more get a 503 "busy" answer
    max_payload_bytes: int = 4 * 1024 * 1024  # larger requests get a 413 answer
    username: str = ""
    password_file: str = ""  # a file holding the password (read at start); empty = none
    ca_file: str = ""  # PEM CAs of the broker's certificate (mqtts://); empty = the system's
    keepalive_s: int = 60
    # Reconnect: wait reconnect_min_s after a failure, doubling up to reconnect_max_s.
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0

    def __post_init__(self) -> None:
        if not self.url.startswith(("mqtt://", "mqtts://")):
            raise ConfigError(
                f"mqtt_inference.url: expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]: {self.url!r}"
            )
        prefix = self.topic_prefix
        if not prefix or prefix.startswith(("/", "$")) or prefix.endswith("/") or "//" in prefix:
            raise ConfigError(
                "mqtt_inference.topic_prefix: expected topic levels such as "
                f'"outpost/local/{{device_id}}" (no leading or trailing "/", no empty level): {prefix!r}'
            )
        if "+" in prefix or "#" in prefix:
            raise ConfigError(f"mqtt_inference.topic_prefix: wildcards (+, #) are not allowed: {prefix!r}")
        try:
            prefix.format(device_id="d", group="g")
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(
                f"mqtt_inference.topic_prefix: only {{device_id}} and {{group}} may be filled in ({exc!r})"
            ) from None
        if self.qos not in (0, 1, 2):
            raise ConfigError("mqtt_inference.qos: must be 0, 1 or 2")
        for key in ("max_inflight", "max_payload_bytes", "keepalive_s"):
            if getattr(self, key) < 1:
                raise ConfigError(f"mqtt_inference.{key}: must be at least 1")
        for key in ("reconnect_min_s", "reconnect_max_s"):
            if not getattr(self, key) > 0:  # `not x > 0` also refuses NaN
                raise ConfigError(f"mqtt_inference.{key}: must be a positive number")
        if self.reconnect_min_s > self.reconnect_max_s:
            raise ConfigError(
                "mqtt_inference.reconnect_min_s: must not be greater than mqtt_inference.reconnect_max_s"
            )
        if self.password_file and not self.username:
            raise ConfigError("mqtt_inference.password_file: is set but mqtt_inference.username is empty")

    def prefix_for(self, device_id: str, group: str) -> str:
        """The topic prefix of this device; ConfigError when the ids do not fit in a topic level."""
        for key, value in (("device_id", device_id), ("group", group)):
            if not value or any(c in value for c in "/+#\0"):
                raise ConfigError(
                    f"mqtt_inference.topic_prefix: {key} {value!r} cannot be a topic level "
                    "(empty, or holds /, +, # or NUL)"
                )
        return self.topic_prefix.format(device_id=device_id, group=group)


@dataclass(frozen=True)
class MonitorConfig:
    """[monitor]: per-version summaries, drift tests and feedback (agent.monitor)."""

    enabled: bool = True
    # A window closes after window_s seconds, or after window_requests requests when that
    # is not 0, whichever comes first. Windows with no traffic publish nothing.
    window_s: float = 300.0
    window_requests: int = 0
    # Drift tests run on a closed window of at least drift_min_rows input rows, against the
    # signed reference profile; p-values are corrected across features ("bh" or
    # "bonferroni") at drift_alpha, and an alert needs the same feature drifted in
    # drift_k windows in a row. psi_threshold > 0 also counts PSI above it as drift.
    drift_min_rows: int = 200
    drift_alpha: float = 0.05
    drift_k: int = 3
    drift_correction: str = "bh"
    psi_threshold: float = 0.0
    # Prediction ids remembered for POST /v1/feedback (the oldest are forgotten first).
    feedback_ids: int = 10_000

    def __post_init__(self) -> None:
        if not self.window_s > 0:
            raise ConfigError("monitor.window_s: must be a positive number")
        for key in ("window_requests", "feedback_ids"):
            if getattr(self, key) < 0:
                raise ConfigError(f"monitor.{key}: must not be negative")
        for key in ("drift_min_rows", "drift_k"):
            if getattr(self, key) < 1:
                raise ConfigError(f"monitor.{key}: must be at least 1")
        if not 0.0 < self.drift_alpha < 1.0:
            raise ConfigError("monitor.drift_alpha: must be between 0 and 1")
        if self.drift_correction not in ("bh", "bonferroni"):
            raise ConfigError('monitor.drift_correction: expected "bh" or "bonferroni"')
        if not self.psi_threshold >= 0:
            raise ConfigError("monitor.psi_threshold: must be a number, not negative")


@dataclass(frozen=True)
class CaptureConfig:
    """[capture]: inputs and predictions kept for retraining when the group's deployment asks for
    them (agent.monitor.capture). The hub's assignment turns capture on, per model, with a sample
    rate and a rate limit; these keys are the device's own ceilings over what the hub asks."""

    # false: this device never captures, whatever the hub asks (the refusal shows in status).
    enabled: bool = True
    max_rows_per_min: int = 600  # the most requests captured per minute, over the hub's own limit
    # A request whose inputs and outputs take more than this as JSON is not captured (counted).
    max_row_bytes: int = 16 * 1024
    # A capture message is sent when it holds batch_rows requests or batch_bytes of JSON, or
    # its oldest request waited flush_s seconds.
    batch_rows: int = 100
    batch_bytes: int = 256 * 1024
    flush_s: float = 60.0
    # Capture messages waiting in the telemetry outbox may take at most this many bytes;
    # beyond, new batches are dropped (counted) so summaries, drift and events keep their room.
    max_outbox_bytes: int = 8 * 1024 * 1024
    # Captured prediction ids remembered, so a label fed back later joins its request.
    label_ids: int = 10_000

    def __post_init__(self) -> None:
        for key in ("max_rows_per_min", "max_row_bytes", "batch_rows", "batch_bytes", "label_ids"):
            if getattr(self, key) < 1:
                raise ConfigError(f"capture.{key}: must be at least 1")
        if self.max_outbox_bytes < 0:
            raise ConfigError("capture.max_outbox_bytes: must not be negative")
        if not self.flush_s > 0:
            raise ConfigError("capture.flush_s: must be a positive number")


@dataclass(frozen=True)
class AgentConfig:
    device_id: str = "dev-001"
    group: str = "default"
    data_dir: str = "/var/lib/outpost"
    log_level: str = "info"
    server: ServerConfig = field(default_factory=ServerConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    mqtt_inference: MqttInferenceConfig = field(default_factory=MqttInferenceConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    capture: CaptureConfig = field(default_factory=CaptureConfig)

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _convert(value, args[0], key)
    if origin is dict:
        _, value_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table")
        return {k: _convert(v, value_tp, f"{key}.{k}") for k, v in value.items()}
    if origin is tuple:
        item_tp = typing.get_args(tp)[0]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list")
        return tuple(_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table")
        return _build(tp, value, key + ".")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return value


def _build(cls: Any, doc: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(doc) - names)
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]}; known keys here: {', '.join(sorted(names))}")
    kwargs = {k: _convert(v, hints[k], prefix + k) for k, v in doc.items()}
    return cls(**kwargs)


def _check_cache(prefix: str, ttl_s: float | None, max_entries: int | None, max_bytes: int | None) -> None:
    # `not x >= 0` also refuses NaN, which TOML allows; inf is a cache whose entries never expire.
    if ttl_s is not None and not ttl_s >= 0:
        raise ConfigError(f"{prefix}cache_ttl_s: must be a number of seconds, not negative (0 = no cache)")
    for key, value in (("cache_max_entries", max_entries), ("cache_max_bytes", max_bytes)):
        if value is not None and value < 1:
            raise ConfigError(f"{prefix}{key}: must be at least 1 (turn the cache off with cache_ttl_s = 0)")


def _validate(cfg: AgentConfig) -> None:
    if cfg.log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError("log_level: expected one of debug, info, warning, error")
    if not cfg.server.socket and not cfg.server.tcp:
        raise ConfigError("server.socket and server.tcp are both empty: nothing to serve on")
    if cfg.server.tcp:
        host, sep, port = cfg.server.tcp.rpartition(":")
        if not sep or not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
            raise ConfigError(f"server.tcp: expected HOST:PORT, got {cfg.server.tcp!r}")
    if not 0 <= cfg.server.socket_mode <= 0o777:
        raise ConfigError("server.socket_mode: expected a file mode such as 0o660")
    for key in ("max_body_bytes", "max_header_bytes", "max_connections", "max_pipelined"):
        if getattr(cfg.server, key) <= 0:
            raise ConfigError(f"server.{key}: must be positive")
    if not 0 <= cfg.server.busy_poll_us <= MAX_BUSY_POLL_US:
        raise ConfigError(f"server.busy_poll_us: expected 0 (off) to {MAX_BUSY_POLL_US} microseconds")
    for key in ("idle_timeout_s", "request_timeout_s", "drain_timeout_s"):
        # `not x > 0` also refuses NaN, which TOML allows.
        if not getattr(cfg.server, key) > 0:
            raise ConfigError(f"server.{key}: must be a positive number")
    rt = cfg.runtime
    for key in ("intra_op_threads", "inter_op_threads", "workers", "max_batch_size"):
        if getattr(rt, key) < 1:
            raise ConfigError(f"runtime.{key}: must be at least 1")
    if not rt.providers:
        raise ConfigError('runtime.providers: must name at least one provider, e.g. ["CPUExecutionProvider"]')
    for tag in rt.hardware_tags:
        if ":" not in tag or tag != tag.strip():
            raise ConfigError(f'runtime.hardware_tags: {tag!r} is not a tag such as "cpu:avx2"')
    if not rt.inline_max_ms >= 0:
        raise ConfigError("runtime.inline_max_ms: must be a number, not negative")
    if rt.memory_budget_mb < 0:
        raise ConfigError("runtime.memory_budget_mb: must not be negative (0 = no budget)")
    if not rt.max_queue_delay_ms >= 0:
        raise ConfigError("runtime.max_queue_delay_ms: must be a number, not negative")
    _check_cache("runtime.", rt.cache_ttl_s, rt.cache_max_entries, rt.cache_max_bytes)
    for model, per in rt.models.items():
        if per.providers is not None and not per.providers:
            raise ConfigError(f"runtime.models.{model}.providers: must name at least one provider")
        if per.max_batch_size is not None and per.max_batch_size < 1:
            raise ConfigError(f"runtime.models.{model}.max_batch_size: must be at least 1")
        if per.max_queue_delay_ms is not None and not per.max_queue_delay_ms >= 0:
            raise ConfigError(f"runtime.models.{model}.max_queue_delay_ms: must be a number, not negative")
        _check_cache(f"runtime.models.{model}.", per.cache_ttl_s, per.cache_max_entries, per.cache_max_bytes)
    if not cfg.hub.poll_interval_s > 0:
        raise ConfigError("hub.poll_interval_s: must be a positive number")


def parse_config(doc: dict[str, Any]) -> AgentConfig:
    cfg: AgentConfig = _build(AgentConfig, doc)
    _validate(cfg)
    return cfg


def load_config(path: Path) -> AgentConfig:
    try:
        with path.open("rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror})") from exc
    try:
        return parse_config(doc)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
