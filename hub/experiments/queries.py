"""Experiments as plain dicts, for the API, the CLI and the dashboard.

An experiment lives in the deployments table (hub.registry: the `experiment` column of a group's
deployment rows). One experiment is a run of consecutive rows of a group with the same model,
stable version, candidate, experiment (mode and weight or sample) and salt (a change of the canary
percent keeps it going): it started when the first of them was created and stopped when the
group's next deployment (without it, or with another one) was. Its evidence is each arm's
windows received in between (hub.experiments.evidence), from the devices in the canary bucket
at the experiment's current percent (every device at 100), and the tests on them
(hub.experiments.stats).

    experiments(db, model=None, group=None, live=None, thresholds=Thresholds())
        every experiment, newest first, each with its arms, tests and verdict
    group_experiment(db, group, thresholds) -> the group's live experiment (NotFoundError if none)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from hub.errors import NotFoundError
from hub.experiments import stats
from hub.experiments.evidence import arm_totals, empty_arm
from hub.registry import Database, in_canary
from hub.registry import queries as q
from hub.registry.db import DeploymentRow, GroupRow, ModelRow


@dataclass(frozen=True)
class Run:
    """One experiment: the rows it spans in its group's deployment history."""

    first: DeploymentRow
    last: DeploymentRow
    group: str
    model: str
    stopped: datetime | None  # the next deployment's creation; None while live


def _identity(row: DeploymentRow) -> tuple[Any, ...]:
    # A new salt puts other devices in the canary: another experiment.
    return (row.model_id, row.stable_version, row.candidate_version, row.experiment, row.salt)


def runs(s: Session, model: str | None = None, group: str | None = None) -> list[Run]:
    """Every experiment in the deployment history, newest first."""
    query = (
        select(DeploymentRow, GroupRow.name, ModelRow.name)
        .join(GroupRow, GroupRow.id == DeploymentRow.group_id)
        .join(ModelRow, ModelRow.id == DeploymentRow.model_id)
        .order_by(DeploymentRow.group_id, DeploymentRow.id)
    )
    if group is not None:
        query = query.where(GroupRow.name == group)
    found: list[Run] = []
    by_group: dict[str, list[tuple[DeploymentRow, str]]] = {}
    for row, group_name, model_name in s.execute(query):
        by_group.setdefault(group_name, []).append((row, model_name))
    for group_name, history in by_group.items():
        i = 0
        while i < len(history):
            row, model_name = history[i]
            if row.experiment is None:
                i += 1
                continue
            j = i
            while j + 1 < len(history) and _identity(history[j + 1][0]) == _identity(row):
                j += 1
            stopped = history[j + 1][0].created if j + 1 < len(history) else None
            found.append(Run(row, history[j][0], group_name, model_name, stopped))
            i = j + 1
    if model is not None:
        found = [r for r in found if r.model == model]
    return sorted(found, key=lambda r: r.first.id, reverse=True)


def _profile(s: Session, model: str, version: int) -> Mapping[str, Any] | None:
    model_row = s.scalar(select(ModelRow).where(ModelRow.name == model))
    row = q.find_version(s, model_row.id, version) if model_row is not None else None
    if row is None:
        return None  # deleted: its windows cannot be checked against a profile
    return dict(q.to_version_info(model, row).manifest.reference_profile)


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.astimezone(UTC).isoformat()


def describe(s: Session, run: Run, thresholds: stats.Thresholds) -> dict[str, Any]:
    """One experiment with its arms, tests and verdict."""
    experiment = q.experiment_from_text(run.first.experiment)
    assert experiment is not None and run.first.candidate_version is not None  # a run has both
    stable, candidate = run.first.stable_version, run.first.candidate_version
    salt, percent = run.last.salt, run.last.percent

    def in_experiment(device_id: str) -> bool:
        return in_canary(salt, device_id, percent)

    device_ok = None if percent >= 100 else in_experiment
    arms: dict[str, dict[str, Any]] = {}
    for name, version in (("stable", stable), ("candidate", candidate)):
        profile = _profile(s, run.model, version)
        arms[name] = (
            empty_arm(version)
            if profile is None
            else arm_totals(
                s, run.group, run.model, version, run.first.created, run.stopped, profile, device_ok
            )
        )
    judged = stats.verdict(arms, thresholds)
    doc: dict[str, Any] = {
        "id": run.first.id,  # the serial of the deployment that started it
        "group": run.group,
        "model": run.model,
        "stable": stable,
        "candidate": candidate,
        "experiment": experiment.to_json(),
        "mode": experiment.mode,
        "percent": run.last.percent,
        "serial": run.last.id,
        "started": _iso(run.first.created),
        "started_by": run.first.created_by,
        "stopped": _iso(run.stopped),
        "live": run.stopped is None,
        "arms": arms,
        "tests": judged["tests"],
        "verdict": judged["verdict"],
        "alpha": thresholds.alpha,
        "thresholds": {
            "min_labelled": thresholds.min_labelled,
            "min_requests": thresholds.min_requests,
            "min_compared": thresholds.min_compared,
        },
        "agreement": None,
    }
    if experiment.mode == "shadow":
        shadow = arms["candidate"]["shadow"]
        if not shadow["compared"]:  # an agent may report the comparison on the stable's window
            shadow = arms["stable"]["shadow"]
        doc["agreement"] = stats.agreement(shadow["compared"], shadow["agreed"], thresholds)
    return doc


def experiments(
    db: Database,
    model: str | None = None,
    group: str | None = None,
    live: bool | None = None,
    thresholds: stats.Thresholds | None = None,
) -> list[dict[str, Any]]:
    """Every experiment (of a model, in a group; only live or only stopped ones), newest first,
    as plain dicts: the dashboard's and `GET /api/v1/experiments`'s read."""
    thresholds = thresholds or stats.Thresholds()
    with db.session() as s:
        found = runs(s, model, group)
        if live is not None:
            found = [r for r in found if (r.stopped is None) == live]
        return [describe(s, r, thresholds) for r in found]


def group_experiment(db: Database, group: str, thresholds: stats.Thresholds | None = None) -> dict[str, Any]:
    """The group's live experiment; NotFoundError when it runs none."""
    found = experiments(db, group=group, live=True, thresholds=thresholds)
    if not found:
        raise NotFoundError(
            f"group {group!r} runs no experiment (outpost experiment start MODEL STABLE CANDIDATE --group G)"
        )
    return found[0]
