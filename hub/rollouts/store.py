"""The rollouts' tables, on the registry's database (own DeclarativeBase, made by hub.migrations;
`create_tables` is for tests; SQLite and PostgreSQL alike).

    rollouts            id, group, model, stable, candidate, steps (JSON list of percents),
                        step (index into steps), step_started, started, min_seconds,
                        min_requests, gates (JSON), state (running | paused | completed |
                        halted | aborted), reason, revision, updated, created_by,
                        active (the group's name while running or paused, NULL once final:
                        UNIQUE, so a group has at most one live rollout)
    rollout_decisions   id, rollout_id, at, action (start | advance | hold | halt | complete |
                        pause | resume | abort), actor (operator token name or "controller"),
                        step and percent (where the rollout was when it was decided: an advance
                        from 5% to 25% is recorded at 5%), reason, evidence (JSON)

Optimistic concurrency: every change of a rollout is `UPDATE ... WHERE id = ? AND revision = ?`
that also increments the revision, with its decision inserted in the same transaction; whoever
read an older revision changes nothing and learns so (`change` returns None), so two hub
processes evaluating the same rollout never both act on it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Float, ForeignKey, Integer, String, Text, select, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from hub.errors import ConflictError, NotFoundError
from hub.registry import Database
from hub.registry.db import UTCDateTime
from hub.rollouts.plan import FINAL, Gates, State


class RolloutBase(DeclarativeBase):
    """The rollout tables; the registry's and the fleet's are not touched."""


class RolloutRow(RolloutBase):
    __tablename__ = "rollouts"

    id: Mapped[int] = mapped_column(primary_key=True)
    group: Mapped[str] = mapped_column(String(128), index=True)
    model: Mapped[str] = mapped_column(String(128), index=True)
    stable: Mapped[int] = mapped_column(BigInteger)
    candidate: Mapped[int] = mapped_column(BigInteger)
    steps: Mapped[str] = mapped_column(Text)
    step: Mapped[int] = mapped_column(Integer, default=0)
    step_started: Mapped[datetime] = mapped_column(UTCDateTime())
    started: Mapped[datetime] = mapped_column(UTCDateTime())
    min_seconds: Mapped[float] = mapped_column(Float)
    min_requests: Mapped[int] = mapped_column(BigInteger)
    gates: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    revision: Mapped[int] = mapped_column(Integer, default=1)
    updated: Mapped[datetime] = mapped_column(UTCDateTime())
    created_by: Mapped[str] = mapped_column(String(128))
    active: Mapped[str | None] = mapped_column(String(128), unique=True)


class DecisionRow(RolloutBase):
    __tablename__ = "rollout_decisions"

    id: Mapped[int] = mapped_column(primary_key=True)
    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id"), index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    action: Mapped[str] = mapped_column(String(16))
    actor: Mapped[str] = mapped_column(String(128))
    step: Mapped[int] = mapped_column(Integer)
    percent: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text)
    evidence: Mapped[str] = mapped_column(Text, default="{}")


@dataclass(frozen=True)
class Rollout:
    id: int
    group: str
    model: str
    stable: int
    candidate: int
    steps: tuple[int, ...]
    step: int
    step_started: datetime
    started: datetime
    min_seconds: float
    min_requests: int
    gates: Gates
    state: State
    reason: str
    revision: int
    updated: datetime
    created_by: str

    @property
    def percent(self) -> int:
        return self.steps[self.step]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "group": self.group,
            "model": self.model,
            "stable": self.stable,
            "candidate": self.candidate,
            "steps": list(self.steps),
            "step": self.step,
            "percent": self.percent,
            "step_started": self.step_started.isoformat(),
            "started": self.started.isoformat(),
            "min_seconds": self.min_seconds,
            "min_requests": self.min_requests,
            "gates": self.gates.to_json(),
            "state": self.state.value,
            "reason": self.reason,
            "revision": self.revision,
            "updated": self.updated.isoformat(),
            "created_by": self.created_by,
        }


@dataclass(frozen=True)
class DecisionRecord:
    id: int
    rollout_id: int
    at: datetime
    action: str
    actor: str
    step: int
    percent: int
    reason: str
    evidence: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "at": self.at.isoformat(),
            "action": self.action,
            "actor": self.actor,
            "step": self.step,
            "percent": self.percent,
            "reason": self.reason,
            "evidence": self.evidence,
        }


def to_rollout(r: RolloutRow) -> Rollout:
    return Rollout(
        id=r.id,
        group=r.group,
        model=r.model,
        stable=r.stable,
        candidate=r.candidate,
        steps=tuple(json.loads(r.steps)),
        step=r.step,
        step_started=r.step_started,
        started=r.started,
        min_seconds=r.min_seconds,
        min_requests=r.min_requests,
        gates=Gates.from_json(json.loads(r.gates)),
        state=State(r.state),
        reason=r.reason,
        revision=r.revision,
        updated=r.updated,
        created_by=r.created_by,
    )


def to_decision(d: DecisionRow) -> DecisionRecord:
    return DecisionRecord(
        d.id, d.rollout_id, d.at, d.action, d.actor, d.step, d.percent, d.reason, json.loads(d.evidence)
    )


def select_rollouts(
    s: Session, model: str | None = None, group: str | None = None, states: Sequence[State] | None = None
) -> list[Rollout]:
    query = select(RolloutRow).order_by(RolloutRow.id.desc())
    if model is not None:
        query = query.where(RolloutRow.model == model)
    if group is not None:
        query = query.where(RolloutRow.group == group)
    if states is not None:
        query = query.where(RolloutRow.state.in_([st.value for st in states]))
    return [to_rollout(r) for r in s.scalars(query)]


def select_decisions(s: Session, rollout_id: int) -> list[DecisionRecord]:
    rows = s.scalars(select(DecisionRow).where(DecisionRow.rollout_id == rollout_id).order_by(DecisionRow.id))
    return [to_decision(d) for d in rows]


class RolloutStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def create_tables(self) -> None:
        RolloutBase.metadata.create_all(self.db.engine)

    def create(self, rollout: Rollout, evidence: dict[str, Any]) -> Rollout:
        """Insert a running rollout and its start decision; ConflictError when the group has a
        live rollout already."""
        row = RolloutRow(
            group=rollout.group,
            model=rollout.model,
            stable=rollout.stable,
            candidate=rollout.candidate,
            steps=json.dumps(list(rollout.steps)),
            step=rollout.step,
            step_started=rollout.step_started,
            started=rollout.started,
            min_seconds=rollout.min_seconds,
            min_requests=rollout.min_requests,
            gates=json.dumps(rollout.gates.to_json(), sort_keys=True),
            state=rollout.state.value,
            reason=rollout.reason,
            revision=1,
            updated=rollout.updated,
            created_by=rollout.created_by,
            active=rollout.group,
        )
        try:
            with self.db.session(write=True) as s:
                live = s.scalar(select(RolloutRow).where(RolloutRow.active == rollout.group))
                if live is not None:
                    raise ConflictError(
                        f"group {rollout.group!r} has rollout {live.id} {live.state} ({live.model} "
                        f"v{live.stable} -> v{live.candidate}); abort it first"
                    )
                s.add(row)
                s.flush()
                self._decide(s, row, rollout.updated, "start", rollout.created_by, rollout.reason, evidence)
                return to_rollout(row)
        except sa_exc.IntegrityError as exc:
            raise ConflictError(
                f"group {rollout.group!r} has a live rollout already; abort it first"
            ) from exc

    def get(self, rollout_id: int) -> Rollout:
        with self.db.session() as s:
            row = s.get(RolloutRow, rollout_id)
            if row is None:
                raise NotFoundError(f"there is no rollout {rollout_id}")
            return to_rollout(row)

    def live(self) -> list[Rollout]:
        with self.db.session() as s:
            return select_rollouts(s, states=(State.RUNNING, State.PAUSED))

    def ended_since(self, since: datetime) -> list[Rollout]:
        """Rollouts that reached a final state (completed, halted, aborted) at or after `since`."""
        with self.db.session() as s:
            query = (
                select(RolloutRow)
                .where(RolloutRow.state.in_([st.value for st in FINAL]), RolloutRow.updated >= since)
                .order_by(RolloutRow.id)
            )
            return [to_rollout(r) for r in s.scalars(query)]

    def decisions(self, rollout_id: int) -> list[DecisionRecord]:
        with self.db.session() as s:
            return select_decisions(s, rollout_id)

    def last_decision(self, rollout_id: int) -> DecisionRecord | None:
        with self.db.session() as s:
            row = s.scalar(
                select(DecisionRow)
                .where(DecisionRow.rollout_id == rollout_id)
                .order_by(DecisionRow.id.desc())
                .limit(1)
            )
            return None if row is None else to_decision(row)

    def change(
        self,
        seen: Rollout,
        at: datetime,
        action: str,
        actor: str,
        reason: str,
        evidence: dict[str, Any],
        *,
        state: State | None = None,
        step: int | None = None,
        step_started: datetime | None = None,
    ) -> Rollout | None:
        """Record a decision and apply its change if the rollout is still at `seen.revision`;
        None when someone else changed it first (nothing is written then)."""
        new_state = state or seen.state
        values: dict[str, Any] = {
            "revision": seen.revision + 1,
            "updated": at,
            "state": new_state.value,
            "active": None if new_state in FINAL else seen.group,
        }
        if state is not None:
            values["reason"] = reason
        if step is not None:
            values["step"] = step
        if step_started is not None:
            values["step_started"] = step_started
        with self.db.session(write=True) as s:
            result: Any = s.execute(
                update(RolloutRow)
                .where(RolloutRow.id == seen.id, RolloutRow.revision == seen.revision)
                .values(**values)
            )
            if int(result.rowcount or 0) != 1:
                return None
            row = s.get(RolloutRow, seen.id, populate_existing=True)
            assert row is not None
            self._decide(s, row, at, action, actor, reason, evidence, step=seen.step)
            return to_rollout(row)

    @staticmethod
    def _decide(
        s: Session,
        row: RolloutRow,
        at: datetime,
        action: str,
        actor: str,
        reason: str,
        evidence: dict[str, Any],
        step: int | None = None,
    ) -> None:
        steps = json.loads(row.steps)
        at_step = row.step if step is None else step  # the step the decision was taken at
        s.add(
            DecisionRow(
                rollout_id=row.id,
                at=at,
                action=action,
                actor=actor,
                step=at_step,
                percent=steps[at_step],
                reason=reason,
                evidence=json.dumps(evidence, sort_keys=True, default=str),
            )
        )
