"""Capture messages into the capture tables (hub.capture.tables), in the fleet consumer's
transaction, and their retention.

    store = CaptureStore(max_rows_per_version=1_000_000, retention_s=30 * 86400)
    FleetStore(db, capture=store)          # the consumer hands it every capture message
    store.create_tables(db)

Invariants:
- A message is stored once: (device_id, seq) is unique in capture_batches and inserted first
  (ON CONFLICT DO NOTHING); a redelivery, or the same message through another hub worker,
  changes nothing.
- A version never holds more than `max_rows_per_version` captured requests: the rest are
  dropped and counted (capture_drops, reason "limit"). The running count is capture_counts,
  read under a row lock (PostgreSQL) or the write lock (SQLite), so two workers never both
  take the last places.
- Labels are kept by (device_id, prediction id), the latest wins, whether the row came before
  or after it (the export joins them).
- Everything received (hub clock) before now - retention_s is deleted by `expire`, which the
  fleet store runs on its expiry cadence; the counts follow.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from hub.capture.rules import CaptureMsg
from hub.capture.tables import (
    CaptureBase,
    CaptureBatchRow,
    CaptureCountRow,
    CaptureDropRow,
    CaptureLabelRow,
    CaptureRow,
)
from hub.registry import Database
from hub.registry.db import insert_ignore

DEFAULT_MAX_ROWS_PER_VERSION = 1_000_000
DEFAULT_RETENTION_S = 30 * 86400.0
LIMIT = "limit"  # the drop reason of rows over the per-version limit


@dataclass
class CaptureReport:
    batches: int = 0  # capture messages stored
    duplicates: int = 0  # capture messages seen before
    rows: int = 0
    labels: int = 0
    dropped_limit: int = 0


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


class CaptureStore:
    def __init__(
        self,
        max_rows_per_version: int = DEFAULT_MAX_ROWS_PER_VERSION,
        retention_s: float = DEFAULT_RETENTION_S,
    ) -> None:
        if max_rows_per_version < 1:
            raise ValueError("capture_max_rows_per_version must be at least 1")
        if not retention_s > 0:
            raise ValueError("capture_retention_s must be positive")
        self.max_rows_per_version = max_rows_per_version
        self.retention = timedelta(seconds=retention_s)

    @staticmethod
    def create_tables(db: Database) -> None:
        CaptureBase.metadata.create_all(db.engine)

    def record(self, session: Session, msg: CaptureMsg, now: datetime) -> CaptureReport:
        """Store one capture message (the caller's transaction holds the device's row lock)."""
        report = CaptureReport()
        batch = {
            "device_id": msg.device_id,
            "seq": msg.seq,
            "group": msg.group,
            "model": msg.model,
            "ts": msg.ts,
            "received": now,
            "rows": 0,
            "labels": len(msg.labels),
        }
        if not insert_ignore(session, CaptureBatchRow, batch):
            report.duplicates += 1
            return report
        report.batches += 1
        by_version: dict[int, list[int]] = {}
        for i, row in enumerate(msg.rows):
            by_version.setdefault(row.version, []).append(i)
        for version, indexes in sorted(by_version.items()):
            room = self._room(session, msg.model, version)
            kept, over = indexes[:room], len(indexes) - min(room, len(indexes))
            for i in kept:
                row = msg.rows[i]
                session.add(
                    CaptureRow(
                        device_id=msg.device_id,
                        group=msg.group,
                        model=msg.model,
                        version=version,
                        prediction_id=row.prediction_id,
                        ts=row.ts,
                        received=now,
                        inputs=_json(row.inputs),
                        outputs=_json(row.outputs),
                    )
                )
            if kept:
                session.execute(
                    update(CaptureCountRow)
                    .where(CaptureCountRow.model == msg.model, CaptureCountRow.version == version)
                    .values(rows=CaptureCountRow.rows + len(kept))
                )
            report.rows += len(kept)
            if over:
                report.dropped_limit += over
                self._drop(session, msg, version, LIMIT, over, now)
        for reason, count in msg.dropped.items():
            self._drop(session, msg, None, reason, count, now)
        latest = {label.prediction_id: label for label in msg.labels}  # within a message, the last wins
        for pid, label in latest.items():
            stored = session.get(CaptureLabelRow, (msg.device_id, pid))
            if stored is None:
                session.add(
                    CaptureLabelRow(
                        device_id=msg.device_id,
                        prediction_id=pid,
                        label=_json(label.label),
                        ts=label.ts,
                        received=now,
                    )
                )
            else:
                stored.label, stored.ts, stored.received = _json(label.label), label.ts, now
        report.labels += len(latest)
        session.execute(
            update(CaptureBatchRow)
            .where(CaptureBatchRow.device_id == msg.device_id, CaptureBatchRow.seq == msg.seq)
            .values(rows=report.rows)
        )
        session.flush()
        return report

    def _room(self, session: Session, model: str, version: int) -> int:
        """How many more rows the version may take; its count row exists (locked) afterwards."""
        query = (
            select(CaptureCountRow.rows)
            .where(CaptureCountRow.model == model, CaptureCountRow.version == version)
            .with_for_update()
        )
        stored = session.scalar(query)
        if stored is None:
            session.add(CaptureCountRow(model=model, version=version, rows=0))
            session.flush()
            stored = 0
        return max(0, self.max_rows_per_version - int(stored))

    @staticmethod
    def _drop(
        session: Session, msg: CaptureMsg, version: int | None, reason: str, count: int, now: datetime
    ) -> None:
        session.add(
            CaptureDropRow(
                device_id=msg.device_id,
                group=msg.group,
                model=msg.model,
                version=version,
                reason=reason,
                count=count,
                received=now,
            )
        )

    def expire(self, session: Session, now: datetime) -> int:
        """Delete what was received before now - retention; the number of rows deleted."""
        cutoff = now - self.retention
        gone = session.execute(
            select(CaptureRow.model, CaptureRow.version, func.count())
            .where(CaptureRow.received < cutoff)
            .group_by(CaptureRow.model, CaptureRow.version)
        ).all()
        for model, version, count in gone:
            session.execute(
                update(CaptureCountRow)
                .where(CaptureCountRow.model == model, CaptureCountRow.version == version)
                .values(rows=CaptureCountRow.rows - int(count))
            )
        deleted = 0
        for table in (CaptureRow, CaptureLabelRow, CaptureBatchRow, CaptureDropRow):
            result: Any = session.execute(delete(table).where(table.received < cutoff))
            deleted += int(result.rowcount or 0)
        return deleted
