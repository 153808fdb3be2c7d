"""The capture tables, on the registry's database (own declarative base; made by hub.migrations,
like the fleet's tables).

    capture_batches  id, device_id, seq, UNIQUE(device_id, seq) (the dedupe of a capture
                     message), group, model, ts NULL (the device's clock), received (hub clock),
                     rows (stored), labels (stored)
    capture_rows     id, device_id, group, model, version, prediction_id, ts (the device's clock
                     at the request, epoch seconds), received, inputs (JSON text: {name: nested
                     list, rows first}), outputs (JSON text, the same); indexed by
                     (model, version, ts) for exports and (device_id, prediction_id) for labels
    capture_labels   (device_id, prediction_id) PK, label (JSON text), ts NULL, received; the
                     latest label fed back for a prediction wins, whether it came before or
                     after its row
    capture_counts   (model, version) PK, rows: the version's rows stored now (kept by the
                     writes and the expiry, so the per-version limit needs no count(*))
    capture_drops    id, device_id, group, model, version NULL, reason (rate | size | full: the
                     device's, version NULL; limit: the hub's per-version row limit), count,
                     received

Retention is by age of `received` (hub clock) on every table.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Float, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from hub.registry.db import UTCDateTime

MAX_ID_CHARS = 128


class CaptureBase(DeclarativeBase):
    """Every capture table; the registry's and the fleet's tables are not touched."""


class CaptureBatchRow(CaptureBase):
    __tablename__ = "capture_batches"
    __table_args__ = (UniqueConstraint("device_id", "seq", name="uq_capture_batches_device_seq"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    device_id: Mapped[str] = mapped_column(String(MAX_ID_CHARS))
    seq: Mapped[int] = mapped_column(BigInteger)
    group: Mapped[str] = mapped_column(String(MAX_ID_CHARS))
    model: Mapped[str] = mapped_column(String(MAX_ID_CHARS))
    ts: Mapped[float | None] = mapped_column(Float)
    received: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    rows: Mapped[int] = mapped_column(Integer, default=0)
    labels: Mapped[int] = mapped_column(Integer, default=0)


class CaptureRow(CaptureBase):
    __tablename__ = "capture_rows"
    __table_args__ = (
        Index("ix_capture_rows_export", "model", "version", "ts"),
        Index("ix_capture_rows_prediction", "device_id", "prediction_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    device_id: Mapped[str] = mapped_column(String(MAX_ID_CHARS))
    group: Mapped[str] = mapped_column(String(MAX_ID_CHARS))
    model: Mapped[str] = mapped_column(String(MAX_ID_CHARS))
    version: Mapped[int] = mapped_column(BigInteger)
    prediction_id: Mapped[str] = mapped_column(String(MAX_ID_CHARS))
    ts: Mapped[float] = mapped_column(Float)
    received: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    inputs: Mapped[str] = mapped_column(Text)
    outputs: Mapped[str] = mapped_column(Text)


class CaptureLabelRow(CaptureBase):
    __tablename__ = "capture_labels"

    device_id: Mapped[str] = mapped_column(String(MAX_ID_CHARS), primary_key=True)
    prediction_id: Mapped[str] = mapped_column(String(MAX_ID_CHARS), primary_key=True)
    label: Mapped[str] = mapped_column(Text)
    ts: Mapped[float | None] = mapped_column(Float)
    received: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)


class CaptureDropRow(CaptureBase):
    __tablename__ = "capture_drops"
    __table_args__ = (Index("ix_capture_drops_find", "model", "version", "group"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    device_id: Mapped[str] = mapped_column(String(MAX_ID_CHARS))
    group: Mapped[str] = mapped_column(String(MAX_ID_CHARS))
    model: Mapped[str] = mapped_column(String(MAX_ID_CHARS))
    version: Mapped[int | None] = mapped_column(BigInteger)
    reason: Mapped[str] = mapped_column(String(16))
    count: Mapped[int] = mapped_column(BigInteger)
    received: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)


class CaptureCountRow(CaptureBase):
    __tablename__ = "capture_counts"

    model: Mapped[str] = mapped_column(String(MAX_ID_CHARS), primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    rows: Mapped[int] = mapped_column(BigInteger, default=0)
