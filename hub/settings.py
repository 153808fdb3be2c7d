"""The hub's settings and the layout of its data directory.

DATA/hub.toml          settings written by `outpost-hub init` (edit to change)
DATA/hub.db            the registry (SQLite) unless database_url points elsewhere
DATA/blobs/            content-addressed package files
DATA/tuf/              the signed TUF repository served under /tuf/
DATA/keys/online/      keys the running hub signs with (snapshot, timestamp, models, deploy)
DATA/keys/offline/     root and targets keys: move them off the hub after init
DATA/operator.token    the first operator token (mode 0600), as printed by init
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from hub.alerting.webhooks import Webhook, WebhookConfigError, parse_webhooks
from hub.errors import HubError
from hub.signing import ExpiryPolicy

SETTINGS_FILE = "hub.toml"
DEFAULT_LISTEN = "127.0.0.1:8700"


class SettingsError(HubError):
    """The hub's settings file is missing or invalid."""


@dataclass(frozen=True)
class HubSettings:
    data_dir: Path
    database_url: str = ""  # empty: SQLite at DATA/hub.db
    offline_keys_dir: str = ""  # empty: DATA/keys/offline
    max_upload_bytes: int = 256 * 1024 * 1024
    refresh_interval_s: float = 60.0  # how often expiring TUF metadata is checked and re-signed
    # Expiry of online metadata, in seconds (short in tests, days in production).
    timestamp_expiry_s: float = 86400.0
    snapshot_expiry_s: float = 7 * 86400.0
    delegated_expiry_s: float = 90 * 86400.0
    # Fleet telemetry over MQTT (hub.fleet). Empty URL: no MQTT (`serve --mqtt URL` overrides).
    mqtt_url: str = ""
    # Empty: outpost-hub-<hostname>-<hash of the data dir>, stable across restarts so the
    # broker keeps the hub's session (and its QoS 1 messages) for mqtt_session_expiry_s.
    # Several hub workers on one broker need distinct ids (they share the load by the
    # shared subscription, not by the id).
    mqtt_client_id: str = ""
    mqtt_session_expiry_s: int = 3600
    mqtt_queue_size: int = 10_000  # messages waiting for the database writer; beyond: dropped, counted
    fleet_keep_messages_per_device: int = 1000  # retention of summaries/drift/events per device
    # Summary and drift windows indexed for fleet sums, and alerts, are kept this long (seconds).
    fleet_window_retention_s: float = 30 * 86400.0
    # Fleet alerts (hub.fleet.alerts): a model version's errors / requests over the summary
    # windows ending in one bucket of alert_error_window_s seconds, once it has at least
    # alert_error_min_requests requests; critical at alert_error_rate_critical.
    alert_error_rate: float = 0.05
    alert_error_rate_critical: float = 0.25
    alert_error_min_requests: int = 100
    alert_error_window_s: float = 300.0
    # Fleet drift on summed counts (GET /api/v1/fleet/drift): level, correction ("bh" or
    # "bonferroni") and the fewest summed rows that get a verdict.
    fleet_drift_alpha: float = 0.05
    fleet_drift_method: str = "bh"
    fleet_drift_min_rows: int = 100
    # Rollouts (hub.rollouts): how often the controller evaluates running rollouts (seconds).
    rollout_interval_s: float = 10.0
    # Experiments (hub.experiments): the level of the tests, and the fewest labelled predictions,
    # requests (per arm) and shadow comparisons before a verdict or an agreement rate counts.
    experiment_alpha: float = 0.05
    experiment_min_labelled: int = 100
    experiment_min_requests: int = 500
    experiment_min_compared: int = 100
    # Data capture (hub.capture): captured requests kept per model version (beyond: dropped and
    # counted), and how long captured rows, labels and counts are kept (seconds).
    capture_max_rows_per_version: int = 1_000_000
    capture_retention_s: float = 30 * 86400.0
    # Alerts out (hub.alerting): where links in alerts point (empty: http://<serve --listen>, the
    # machine's name for 0.0.0.0), alerts for devices offline longer than alert_offline_after_s
    # (0: none), the loop's period, the request timeout, and retries (backoff doubling from
    # alert_backoff_s up to alert_backoff_max_s; given up after alert_max_attempts or alert_max_age_s).
    public_url: str = ""
    alert_offline_after_s: float = 900.0
    alert_interval_s: float = 5.0
    alert_timeout_s: float = 10.0
    alert_max_attempts: int = 8
    alert_backoff_s: float = 2.0
    alert_backoff_max_s: float = 300.0
    alert_max_age_s: float = 86400.0
    # [[webhooks]] tables at the end of hub.toml (hub.alerting.webhooks): name, url, format, ...
    webhooks: tuple[Webhook, ...] = ()

    @property
    def mqtt_client_name(self) -> str:
        if self.mqtt_client_id:
            return self.mqtt_client_id
        import hashlib
        import socket

        digest = hashlib.sha256(str(self.data_dir.resolve()).encode()).hexdigest()[:8]
        return f"outpost-hub-{socket.gethostname()}-{digest}"

    def expiry_policy(self) -> ExpiryPolicy:
        from datetime import timedelta

        delegated = timedelta(seconds=self.delegated_expiry_s)
        return ExpiryPolicy(
            models=delegated,
            deploy=delegated,
            group=delegated,
            snapshot=timedelta(seconds=self.snapshot_expiry_s),
            timestamp=timedelta(seconds=self.timestamp_expiry_s),
        )

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'hub.db'}"

    @property
    def blobs_dir(self) -> Path:
        return self.data_dir / "blobs"

    @property
    def tuf_dir(self) -> Path:
        return self.data_dir / "tuf"

    @property
    def online_keys(self) -> Path:
        return self.data_dir / "keys" / "online"

    @property
    def offline_keys(self) -> Path:
        return Path(self.offline_keys_dir) if self.offline_keys_dir else self.data_dir / "keys" / "offline"

    @property
    def token_file(self) -> Path:
        return self.data_dir / "operator.token"

    def to_toml(self) -> str:
        lines = ["# outpost-hub settings (written by outpost-hub init)"]
        for f in fields(self):
            if f.name in ("data_dir", "webhooks"):
                continue
            value = getattr(self, f.name)
            rendered = f'"{value}"' if isinstance(value, str) else repr(value)
            lines.append(f"{f.name} = {rendered}")
        lines += [w.to_toml() for w in self.webhooks]  # tables come after every top-level key
        return "\n".join(lines) + "\n"


def load_settings(data_dir: Path) -> HubSettings:
    path = data_dir / SETTINGS_FILE
    if not path.is_file():
        raise SettingsError(f"{path} not found: run `outpost-hub init --data {data_dir}` first")
    try:
        doc: dict[str, Any] = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{path}: not valid TOML ({exc})") from exc
    known = {f.name: f for f in fields(HubSettings) if f.name != "data_dir"}
    for key, value in doc.items():
        if key == "webhooks":
            try:
                doc[key] = parse_webhooks(value)
            except WebhookConfigError as exc:
                raise SettingsError(f"{path}: {exc}") from exc
            continue
        if key not in known:
            raise SettingsError(f"{path}: unknown key {key}; known keys: {', '.join(sorted(known))}")
        default = getattr(HubSettings(data_dir), key)
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            doc[key] = float(value)
        elif type(value) is not type(default):
            raise SettingsError(f"{path}: {key} must be a {type(default).__name__}")
    return HubSettings(data_dir=data_dir, **doc)
