"""The capture API's answers: what was captured per model version and group, each group's live
capture policy, and a version's captured requests for export (read in chunks, never all at once).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from hub.capture import export
from hub.capture.columns import Captured, Layout, guessed_layout, layout
from hub.capture.tables import CaptureDropRow, CaptureLabelRow, CaptureRow
from hub.errors import InvalidRequestError, NotFoundError
from hub.fleet.queries import parse_when
from hub.registry import Database, Registry

READ_CHUNK = 1000


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()


def _label(text: str | None) -> Any:
    return None if text is None else json.loads(text)


@dataclass(frozen=True)
class ExportRequest:
    model: str
    version: int
    format: str = "csv"
    group: str | None = None
    labelled_only: bool = False
    since: str | None = None
    until: str | None = None
    limit: int | None = None


@dataclass(frozen=True)
class Export:
    filename: str
    media_type: str
    chunks: Iterator[bytes]


class CaptureQueries:
    def __init__(self, db: Database, registry: Registry, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.registry = registry
        self.clock = clock

    # -- the listing ----------------------------------------------------------------------------

    def listing(self, model: str | None = None) -> dict[str, Any]:
        """{"versions": per (model, version, group): rows, labelled, devices, first/last ts,
        rows dropped by the hub's limit; "groups": per (group, model): the live capture policy
        (null: off) and the requests devices dropped (rate, size, full)}."""
        with self.db.session() as s:
            versions = self._versions(s, model)
            drops = self._drops(s, model)
        for entry in versions:
            entry["dropped"] = {
                "limit": drops.get((entry["model"], entry["version"], entry["group"], "limit"), 0)
            }
        groups: dict[tuple[str, str], dict[str, Any]] = {}
        for info in self.registry.list_groups():
            d = info.deployment
            if d is not None and (model is None or d.model == model):
                capture = d.capture.to_json() if d.capture is not None else None
                groups[(info.name, d.model)] = {"group": info.name, "model": d.model, "capture": capture}
        for (m, version, group, reason), count in sorted(drops.items()):
            if version is None:
                entry = groups.setdefault((group, m), {"group": group, "model": m, "capture": None})
                entry.setdefault("dropped", {"rate": 0, "size": 0, "full": 0})[reason] = count
        for entry in groups.values():
            entry.setdefault("dropped", {"rate": 0, "size": 0, "full": 0})
        return {"versions": versions, "groups": [groups[k] for k in sorted(groups)]}

    @staticmethod
    def _versions(s: Session, model: str | None) -> list[dict[str, Any]]:
        query = (
            select(
                CaptureRow.model,
                CaptureRow.version,
                CaptureRow.group,
                func.count(),
                func.count(CaptureLabelRow.prediction_id),
                func.count(CaptureRow.device_id.distinct()),
                func.min(CaptureRow.ts),
                func.max(CaptureRow.ts),
            )
            .outerjoin(CaptureLabelRow, _label_join())
            .group_by(CaptureRow.model, CaptureRow.version, CaptureRow.group)
            .order_by(CaptureRow.model, CaptureRow.version, CaptureRow.group)
        )
        if model is not None:
            query = query.where(CaptureRow.model == model)
        return [
            {
                "model": m,
                "version": int(v),
                "group": g,
                "rows": int(rows),
                "labelled": int(labelled),
                "devices": int(devices),
                "first_ts": _iso(first),
                "last_ts": _iso(last),
            }
            for m, v, g, rows, labelled, devices, first, last in s.execute(query)
        ]

    @staticmethod
    def _drops(s: Session, model: str | None) -> dict[tuple[str, int | None, str, str], int]:
        query = select(
            CaptureDropRow.model,
            CaptureDropRow.version,
            CaptureDropRow.group,
            CaptureDropRow.reason,
            func.sum(CaptureDropRow.count),
        ).group_by(CaptureDropRow.model, CaptureDropRow.version, CaptureDropRow.group, CaptureDropRow.reason)
        if model is not None:
            query = query.where(CaptureDropRow.model == model)
        return {(m, v, g, r): int(n or 0) for m, v, g, r, n in s.execute(query)}

    # -- the export -----------------------------------------------------------------------------

    def export(self, req: ExportRequest) -> Export:
        """A version's captured requests as CSV or Parquet; every check runs before the first
        byte, so an error is still a proper HTTP answer."""
        if req.format not in export.FORMATS:
            raise InvalidRequestError(f"format must be csv or parquet, not {req.format!r}")
        if req.format == "parquet":
            export.check_parquet()
        if req.limit is not None and req.limit < 1:
            raise InvalidRequestError("limit must be at least 1")
        now = self.clock()
        since = parse_when(req.since, now, float("-inf"))
        until = parse_when(req.until, now, float("inf"))
        columns = self._layout(req.model, req.version)
        captured = self._captured(req, since, until)
        stream = export.csv_stream if req.format == "csv" else export.parquet_stream
        filename = f"{req.model}-v{req.version}-capture.{req.format}"
        return Export(filename, export.MEDIA_TYPES[req.format], stream(columns, captured))

    def _layout(self, model: str, version: int) -> Layout:
        try:
            return layout(self.registry.get_version(model, version).manifest)
        except NotFoundError:
            pass
        with self.db.session() as s:  # the version was deleted: columns from what was captured
            first = s.execute(
                select(CaptureRow.inputs, CaptureRow.outputs)
                .where(CaptureRow.model == model, CaptureRow.version == version)
                .limit(1)
            ).first()
        if first is None:
            raise NotFoundError(f"nothing was captured for {model} version {version}")
        return guessed_layout(json.loads(first[0]), json.loads(first[1]))

    def _captured(self, req: ExportRequest, since: float, until: float) -> Iterator[Captured]:
        query = select(
            CaptureRow.ts,
            CaptureRow.device_id,
            CaptureRow.group,
            CaptureRow.version,
            CaptureRow.prediction_id,
            CaptureRow.inputs,
            CaptureRow.outputs,
            CaptureLabelRow.label,
        ).where(CaptureRow.model == req.model, CaptureRow.version == req.version)
        if req.labelled_only:
            query = query.join(CaptureLabelRow, _label_join())
        else:
            query = query.outerjoin(CaptureLabelRow, _label_join())
        if req.group is not None:
            query = query.where(CaptureRow.group == req.group)
        if since > float("-inf"):
            query = query.where(CaptureRow.ts > since)
        if until < float("inf"):
            query = query.where(CaptureRow.ts <= until)
        query = query.order_by(CaptureRow.ts, CaptureRow.id)
        if req.limit is not None:
            query = query.limit(req.limit)
        with self.db.session() as s:
            for ts, device, group, version, pid, inputs, outputs, label in s.execute(
                query.execution_options(yield_per=READ_CHUNK)
            ):
                yield Captured(
                    ts,
                    device,
                    group,
                    int(version),
                    pid,
                    json.loads(inputs),
                    json.loads(outputs),
                    _label(label),
                )


def _label_join() -> Any:
    return and_(
        CaptureLabelRow.device_id == CaptureRow.device_id,
        CaptureLabelRow.prediction_id == CaptureRow.prediction_id,
    )
