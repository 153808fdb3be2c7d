"""The hub's settings and the layout of its data directory.

DATA/hub.toml          settings written by `outpost-hub init` (edit to change)
DATA/hub.db            the registry (SQLite) unless database_url points elsewhere
DATA/blobs/            content-addressed package files
DATA/tuf/              the signed TUF repository served under /tuf/
DATA/keys/online/      keys the running hub signs with (snapshot, timestamp, models, deploy)
DATA/keys/offline/     root and targets keys: move them off the hub after init
DATA/operator.token    the first operator token (mode 0600), as printed by init

With `blob_store = "s3"` the package files live in an S3-compatible bucket instead of
DATA/blobs; with `tuf_publish = "s3"` the TUF repository is also published there (see
hub.objectstore). With `tuf_state = "s3"` as well, the bucket is the repository's source of
truth: hub processes on several hosts (own data directories, one PostgreSQL, one bucket) sign
in turn, each pulling the bucket's state first (hub.signing.mirror).
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hub.alerting.webhooks import Webhook, WebhookConfigError, parse_webhooks
from hub.errors import HubError
from hub.signing import ExpiryPolicy

if TYPE_CHECKING:
    from hub.objectstore.s3 import S3Location

SETTINGS_FILE = "hub.toml"
DEFAULT_LISTEN = "127.0.0.1:8700"
BLOB_STORES = ("fs", "s3")
TUF_PUBLISH = ("", "s3")
TUF_STATES = ("local", "s3")
# S3's bucket naming rules (3-63 lowercase letters, digits, '.', '-'), which MinIO follows too.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_PREFIX = re.compile(r"[A-Za-z0-9._/-]*")  # safe in a key and in a URL path, unescaped


class SettingsError(HubError):
    """The hub's settings file is missing or invalid."""


@dataclass(frozen=True)
class HubSettings:
    data_dir: Path
    database_url: str = ""  # empty: SQLite at DATA/hub.db
    offline_keys_dir: str = ""  # empty: DATA/keys/offline
    # Object store (hub.objectstore): "fs" keeps package blobs in DATA/blobs, "s3" in s3_bucket;
    # tuf_publish = "s3" also publishes the TUF repository to <s3_prefix>tuf/ there, for a static
    # host or CDN to serve. Credentials come from boto3's chain (environment, profile, role).
    blob_store: str = "fs"
    tuf_publish: str = ""
    # Where the signed repository's state lives: "local" (DATA/tuf; several hub processes must
    # share that directory) or "s3" (the bucket of tuf_publish: each host keeps a copy in DATA/tuf,
    # pulled under the signing lock before every change and every tuf_sync_interval_s seconds
    # for its /tuf/; needs tuf_publish = "s3", and PostgreSQL for hosts to share the lock).
    tuf_state: str = "local"
    tuf_sync_interval_s: float = 2.0
    s3_bucket: str = ""
    s3_prefix: str = ""  # e.g. "outpost/": every key the hub writes starts with it
    s3_endpoint_url: str = ""  # empty: AWS S3; e.g. http://127.0.0.1:9000 for MinIO
    s3_region: str = ""  # empty: boto3's default (AWS_DEFAULT_REGION or the profile's)
    max_upload_bytes: int = 256 * 1024 * 1024
    # Request limits (hub.api.guard): bodies other than package uploads (413 beyond; uploads
    # may be max_upload_bytes plus 8 MiB of archive), the request line and headers together
    # (refused by the HTTP server beyond), and token buckets: per operator token for /api,
    # per client address for /api requests without a valid token and failed dashboard logins
    # (429 with Retry-After). In memory per hub process: N processes allow N times the rate.
    # A rate of 0 turns that limit off. The TUF files are not rate limited.
    max_request_bytes: int = 1024 * 1024
    max_header_bytes: int = 64 * 1024
    api_rate_per_s: float = 50.0
    api_burst: int = 200
    anon_rate_per_s: float = 1.0
    anon_burst: int = 30
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

    def __post_init__(self) -> None:
        if self.blob_store not in BLOB_STORES:
            raise SettingsError(f'blob_store must be "fs" or "s3", not {self.blob_store!r}')
        if self.tuf_publish not in TUF_PUBLISH:
            raise SettingsError(f'tuf_publish must be "" (off) or "s3", not {self.tuf_publish!r}')
        if self.tuf_state not in TUF_STATES:
            raise SettingsError(f'tuf_state must be "local" or "s3", not {self.tuf_state!r}')
        if self.tuf_state == "s3" and self.tuf_publish != "s3":
            raise SettingsError(
                'tuf_state = "s3" keeps the repository in the bucket it is published to: '
                'set tuf_publish = "s3" too'
            )
        if not 0.1 <= self.tuf_sync_interval_s <= 3600:
            raise SettingsError(
                f"tuf_sync_interval_s must be between 0.1 and 3600 seconds, not {self.tuf_sync_interval_s}"
            )
        uses_s3 = "s3" in (self.blob_store, self.tuf_publish)
        s3_keys = ("s3_bucket", "s3_prefix", "s3_endpoint_url", "s3_region")
        if not uses_s3:
            stray = [k for k in s3_keys if getattr(self, k)]
            if stray:
                raise SettingsError(
                    f'{", ".join(stray)} set but unused: set blob_store = "s3" and/or tuf_publish = "s3"'
                )
            return
        if not _BUCKET.fullmatch(self.s3_bucket):
            raise SettingsError(
                f"s3_bucket {self.s3_bucket!r}: the bucket's name is needed (3-63 lowercase letters, "
                "digits, '.' or '-') when blob_store or tuf_publish is \"s3\""
            )
        if not _PREFIX.fullmatch(self.s3_prefix) or "//" in self.s3_prefix.strip("/"):
            raise SettingsError(
                f"s3_prefix {self.s3_prefix!r}: use letters, digits, '.', '_', '-' and '/' "
                '(e.g. "outpost/")'
            )
        if self.s3_endpoint_url and not re.fullmatch(r"https?://[^/\s]+/?", self.s3_endpoint_url):
            raise SettingsError(
                f"s3_endpoint_url {self.s3_endpoint_url!r}: expected http(s)://HOST[:PORT], "
                "or empty for AWS S3"
            )

    def s3_location(self) -> S3Location:
        from hub.objectstore.s3 import S3Location

        prefix = self.s3_prefix.strip("/")
        return S3Location(
            bucket=self.s3_bucket,
            prefix=prefix + "/" if prefix else "",
            endpoint_url=self.s3_endpoint_url.rstrip("/"),
            region=self.s3_region,
        )

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
    try:
        return HubSettings(data_dir=data_dir, **doc)
    except SettingsError as exc:
        raise SettingsError(f"{path}: {exc}") from exc
