"""The fleet API's answers: the store's windows and alerts, the registry's profiles, the pure
aggregation (`hub.fleet.aggregate`) in between.

Times in a query: epoch seconds, ISO 8601, or a duration back from now ("90s", "15m", "1h",
"2d", "1w"). `since` defaults to 24 hours ago, `until` to now; window times are the devices'
clocks, alert times the hub's. A missing version means the model's latest in the registry.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from agent.monitor.drift import Method
from hub.errors import InvalidRequestError
from hub.fleet import aggregate
from hub.fleet.alerts import KINDS
from hub.fleet.rules import Invalid, parse_ts
from hub.fleet.store import FleetStore
from hub.registry import Registry

DEFAULT_RANGE_S = 86400.0
MAX_WINDOWS = 200_000  # per fleet sum: beyond it, ask for a shorter range
MAX_ALERTS = 1000
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


def parse_when(text: str | None, now: float, default: float) -> float:
    """Epoch seconds from a query's time: a number, ISO 8601 or a duration ago ("1h")."""
    if text is None or text == "":
        return default
    text = text.strip()
    match = _DURATION.fullmatch(text)
    if match:
        return now - float(match.group(1)) * _UNITS[match.group(2)]
    try:
        value = float(text)
    except ValueError:
        try:
            parsed = parse_ts(text)
        except Invalid:
            parsed = None
        if parsed is None:
            raise InvalidRequestError(
                f"time {text!r}: expected epoch seconds, ISO 8601 or a duration such as 15m, 1h, 2d"
            ) from None
        return parsed
    if not math.isfinite(value):
        raise InvalidRequestError(f"time {text!r} is not finite")
    return value


@dataclass(frozen=True)
class TimeRange:
    since: float
    until: float

    @classmethod
    def parse(cls, since: str | None, until: str | None, now: float) -> TimeRange:
        end = parse_when(until, now, now)
        start = parse_when(since, now, end - DEFAULT_RANGE_S)
        if start >= end:
            raise InvalidRequestError(
                f"empty time range: since ({start:.0f}) is not before until ({end:.0f})"
            )
        return cls(start, end)

    def to_json(self) -> dict[str, Any]:
        return {
            "since": self.since,
            "until": self.until,
            "since_iso": datetime.fromtimestamp(self.since, UTC).isoformat(),
            "until_iso": datetime.fromtimestamp(self.until, UTC).isoformat(),
        }


@dataclass(frozen=True)
class DriftSettings:
    alpha: float = aggregate.DEFAULT_ALPHA
    method: Method = aggregate.DEFAULT_METHOD
    min_rows: int = aggregate.DEFAULT_MIN_ROWS

    def __post_init__(self) -> None:
        if self.method not in ("bh", "bonferroni") or not 0.0 < self.alpha < 1.0 or self.min_rows < 1:
            raise ValueError("fleet drift: method must be bh or bonferroni, alpha in (0, 1), min_rows >= 1")


class FleetQueries:
    def __init__(
        self,
        store: FleetStore,
        registry: Registry,
        drift: DriftSettings | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        import time

        self.store = store
        self.registry = registry
        self.drift_settings = drift or DriftSettings()
        self.clock = clock or time.time

    def _version(self, model: str, version: int | None) -> tuple[int, dict[str, Any]]:
        """The version (latest when None) and its reference profile; NotFoundError if unknown."""
        if version is None:
            latest = self.registry.get_model(model).latest_version
            if latest is None:
                raise InvalidRequestError(f"model {model!r} has no versions; name one")
            version = latest
        info = self.registry.get_version(model, version)
        return version, dict(info.manifest.reference_profile)

    def _sum(
        self, model: str, version: int, profile: dict[str, Any], span: TimeRange, group: str | None
    ) -> aggregate.FleetSum:
        count = self.store.count_windows("summary", model, version, span.since, span.until, group)
        if count > MAX_WINDOWS:
            raise InvalidRequestError(
                f"{count} summary windows in that range (at most {MAX_WINDOWS}): ask for a shorter one"
            )
        windows = self.store.windows("summary", model, version, span.since, span.until, group)
        return aggregate.sum_windows(((w.device_id, w.seq, w.body) for w in windows), profile)

    def summary(
        self,
        model: str,
        version: int | None,
        since: str | None = None,
        until: str | None = None,
        group: str | None = None,
    ) -> dict[str, Any]:
        span = TimeRange.parse(since, until, self.clock())
        version, profile = self._version(model, version)
        total = self._sum(model, version, profile, span, group)
        return {
            "model": model,
            "version": version,
            "group": group,
            **span.to_json(),
            "devices": len(total.devices),
            "windows": sum(d["windows"] for d in total.devices.values()),
            "derived": aggregate.derived(total.window),
            "per_device": [{"device_id": d, **v} for d, v in sorted(total.devices.items())],
            "skipped": total.skipped[:50],
            "skipped_count": len(total.skipped),
            "summary": total.window,
        }

    def drift(
        self,
        model: str,
        version: int | None,
        since: str | None = None,
        until: str | None = None,
        group: str | None = None,
    ) -> dict[str, Any]:
        span = TimeRange.parse(since, until, self.clock())
        version, profile = self._version(model, version)
        total = self._sum(model, version, profile, span, group)
        cfg = self.drift_settings
        fleet = aggregate.fleet_drift(
            total.window, profile, alpha=cfg.alpha, method=cfg.method, min_rows=cfg.min_rows
        )
        latest = self.store.latest_windows("drift", model, version, span.since, span.until, group)
        devices = [
            {
                "device_id": w.device_id,
                "group": w.group,
                "seq": w.seq,
                "start": w.start,
                "end": w.end,
                "rows": w.body.get("rows"),
                "alert": w.body.get("alert") is True,
                "alerting": w.body.get("alerting") or [],
                "drifted": w.body.get("drifted") or [],
                "streak": w.body.get("streak"),
            }
            for w in latest
        ]
        return {
            "model": model,
            "version": version,
            "group": group,
            **span.to_json(),
            "devices_summed": len(total.devices),
            "fleet": fleet,
            "devices": devices,
            "alerting_devices": [d["device_id"] for d in devices if d["alert"]],
        }

    def alerts(
        self,
        since: str | None = None,
        kind: str | None = None,
        model: str | None = None,
        version: int | None = None,
        device_id: str | None = None,
        limit: int = 200,
    ) -> list[dict[str, Any]]:
        if kind is not None and kind not in KINDS:
            raise InvalidRequestError(f"alert kind {kind!r}: expected one of {', '.join(KINDS)}")
        now = self.clock()
        start = parse_when(since, now, now - 7 * DEFAULT_RANGE_S)
        found = self.store.alerts(
            datetime.fromtimestamp(start, UTC),
            kind,
            model,
            version,
            device_id,
            max(1, min(limit, MAX_ALERTS)),
        )
        return [a.to_json() for a in found]
