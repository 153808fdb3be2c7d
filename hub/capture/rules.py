"""Capture messages, pure: what a device publishes on `outpost/v1/{group}/{device_id}/capture`
and the checks a message passes before the hub stores any of it. No I/O here.

    {"device_id": "...", "seq": 123, "ts": 1764252000.123, "schema": "outpost-capture/1",
     "model": "wine",
     "rows": [{"id": "<prediction id>", "version": 3, "ts": 1764252000.101,
               "inputs": {"input": [[...]]}, "outputs": {"label": [1], "probabilities": [[...]]}}],
     "labels": [{"id": "<prediction id>", "label": <JSON value>, "ts": 1764252100.0}],
     "dropped": {"rate": 0, "size": 0, "full": 0}}

Each row is one request: every tensor keeps the request's shape, rows first, so every input and
output of a row has the same first dimension n >= 1 (the request's rows). Non-finite floats
arrive as null. A label is one fed back for a prediction captured earlier (or, in theory,
later): matched by (device_id, id). `dropped` counts requests the device sampled but did not
send since its previous capture message. A message breaking any rule is refused whole
(InvalidCapture): the consumer counts it and moves on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from agent.package.manifest import NAME_RE

SCHEMA = "outpost-capture/1"
KIND = "capture"
MAX_ROWS_PER_MESSAGE = 1000
MAX_LABELS_PER_MESSAGE = 1000
MAX_ID_CHARS = 128
MAX_TENSORS = 64  # inputs or outputs of one row
MAX_REQUEST_ROWS = 10_000  # first dimension of one captured request
MAX_VERSION = 2**63 - 1
DEVICE_DROPS = ("rate", "size", "full")


class InvalidCapture(ValueError):
    """A capture message the hub refuses (counted and logged, never stored)."""


@dataclass(frozen=True)
class CapturedRow:
    """One captured request: its tensors by name, each a list of the request's n rows."""

    prediction_id: str
    version: int
    ts: float
    inputs: dict[str, list[Any]]
    outputs: dict[str, list[Any]]

    @property
    def n(self) -> int:
        return len(next(iter(self.inputs.values())))


@dataclass(frozen=True)
class FedLabel:
    prediction_id: str
    label: Any  # a JSON value: a class label or number, or a list for a multi-row request
    ts: float | None


@dataclass(frozen=True)
class CaptureMsg:
    group: str
    device_id: str
    seq: int
    ts: float | None
    model: str
    rows: tuple[CapturedRow, ...] = ()
    labels: tuple[FedLabel, ...] = ()
    dropped: dict[str, int] = field(default_factory=dict)  # by DEVICE_DROPS reason, > 0 only
    kind: str = KIND


def _ts(value: Any, what: str, required: bool) -> float | None:
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidCapture(f"{what}: ts must be a finite number (epoch seconds), not {value!r}")
    return float(value)


def _id(value: Any, what: str) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_ID_CHARS:
        raise InvalidCapture(f"{what}: id must be a string of 1 to {MAX_ID_CHARS} characters")
    return value


def _tensors(doc: Any, what: str) -> dict[str, list[Any]]:
    if not isinstance(doc, dict) or not doc or len(doc) > MAX_TENSORS:
        raise InvalidCapture(f"{what} must be an object of 1 to {MAX_TENSORS} tensors by name")
    for name, value in doc.items():
        if not 1 <= len(name) <= MAX_ID_CHARS:
            raise InvalidCapture(f"{what}: a tensor name must have 1 to {MAX_ID_CHARS} characters")
        if not isinstance(value, list) or not 1 <= len(value) <= MAX_REQUEST_ROWS:
            raise InvalidCapture(
                f"{what}[{name!r}] must be a list of the request's rows (1 to {MAX_REQUEST_ROWS})"
            )
    return doc


def parse_row(doc: Any, where: str) -> CapturedRow:
    if not isinstance(doc, dict):
        raise InvalidCapture(f"{where} is not an object")
    version = doc.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_VERSION:
        raise InvalidCapture(f"{where}: version must be a positive integer, not {version!r}")
    inputs = _tensors(doc.get("inputs"), f"{where}.inputs")
    outputs = _tensors(doc.get("outputs"), f"{where}.outputs")
    sizes = {len(t) for t in (*inputs.values(), *outputs.values())}
    if len(sizes) != 1:
        raise InvalidCapture(
            f"{where}: every input and output must have the request's rows first (got {sorted(sizes)})"
        )
    ts = _ts(doc.get("ts"), where, required=True)
    assert ts is not None
    return CapturedRow(_id(doc.get("id"), where), version, ts, inputs, outputs)


def parse_label(doc: Any, where: str) -> FedLabel:
    if not isinstance(doc, dict) or "label" not in doc:
        raise InvalidCapture(f"{where} must be an object with id and label")
    return FedLabel(_id(doc.get("id"), where), doc["label"], _ts(doc.get("ts"), where, required=False))


def _list(doc: dict[str, Any], key: str, limit: int) -> list[Any]:
    value = doc.get(key, [])
    if not isinstance(value, list):
        raise InvalidCapture(f"{key} must be a list")
    if len(value) > limit:
        raise InvalidCapture(f"{len(value)} {key} in one message; at most {limit}")
    return value


def parse_dropped(value: Any) -> dict[str, int]:
    """The device's drop counts (reasons it does not know of are ignored; zeros are left out)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidCapture("dropped must be an object of counts")
    out: dict[str, int] = {}
    for reason in DEVICE_DROPS:
        count = value.get(reason, 0)
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= MAX_VERSION:
            raise InvalidCapture(f"dropped.{reason} must be a non-negative integer, not {count!r}")
        if count:
            out[reason] = count
    return out


def parse_capture(group: str, device_id: str, seq: int, ts: float | None, doc: dict[str, Any]) -> CaptureMsg:
    """A capture message from its JSON object (group, device and seq already checked by the
    fleet's rules); InvalidCapture when any part of it breaks the rules above."""
    if doc.get("schema") != SCHEMA:
        raise InvalidCapture(f"schema must be {SCHEMA!r}, not {doc.get('schema')!r}")
    model = doc.get("model")
    if not isinstance(model, str) or not NAME_RE.fullmatch(model):
        raise InvalidCapture(f"model must be a model name, not {model!r}")
    rows = tuple(parse_row(r, f"rows[{i}]") for i, r in enumerate(_list(doc, "rows", MAX_ROWS_PER_MESSAGE)))
    labels = tuple(
        parse_label(r, f"labels[{i}]") for i, r in enumerate(_list(doc, "labels", MAX_LABELS_PER_MESSAGE))
    )
    return CaptureMsg(group, device_id, seq, ts, model, rows, labels, parse_dropped(doc.get("dropped")))
