"""The rollout controller, pure: from a rollout's plan, its current step, the time and the
evidence gathered from telemetry, one decision (hold, advance, complete or halt) with the reason
and the numbers it rests on. No I/O, no clock.

Order of the checks (the first that applies decides):

1. fall-backs: more candidate devices in the group fell back from the candidate since the
   rollout started than `max_fallbacks` -> halt (gate "fallbacks");
2. drift: a drift alert on the candidate in the group since the rollout started, when
   `halt_on_drift` -> halt (gate "drift");
3. once the candidate has `min_requests` requests in the step: error rate (gate "error_rate")
   and p95 latency (gate "latency") against the stable baseline -> halt when over;
4. not yet `min_seconds` in the step or `min_requests` candidate requests -> hold, saying what
   is missing (the reason names what, the numbers are in the evidence, so a hold's reason
   changes only when what it waits for does);
5. otherwise advance to the next percent, or complete after the last step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from hub.rollouts.plan import Action, Gates


@dataclass(frozen=True)
class Sums:
    """A version's summed summary windows over a span: requests, errors, p95 latency (ms)."""

    requests: int = 0
    errors: int = 0
    p95_ms: float | None = None
    devices: int = 0

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None


@dataclass(frozen=True)
class Evidence:
    """What the controller judges: the candidate's and the stable version's sums since the step
    started (and the stable's since the rollout started, a baseline for steps where stable
    traffic is thin), candidate devices, fall-backs and drift alerts on the candidate."""

    candidate: Sums
    stable: Sums
    stable_rollout: Sums = field(default_factory=Sums)
    step_seconds: float = 0.0
    candidate_devices: int = 0
    fallbacks: tuple[dict[str, Any], ...] = ()  # one per device: device_id, transition, reason
    drift_alerts: tuple[dict[str, Any], ...] = ()  # device_id, message

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        for key in ("candidate", "stable", "stable_rollout"):
            sums: Sums = getattr(self, key)
            doc[key]["error_rate"] = sums.error_rate
        doc["fallbacks"] = list(self.fallbacks)
        doc["drift_alerts"] = list(self.drift_alerts)
        return doc


@dataclass(frozen=True)
class Decision:
    action: Action  # HOLD, ADVANCE, COMPLETE or HALT
    reason: str
    gate: str | None = None  # the gate that halted
    checks: dict[str, Any] = field(default_factory=dict)  # each gate's numbers and verdict


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2%}"


def _baseline(ev: Evidence, gates: Gates) -> tuple[Sums | None, str]:
    if ev.stable.requests >= gates.min_baseline_requests:
        return ev.stable, "step"
    if ev.stable_rollout.requests >= gates.min_baseline_requests:
        return ev.stable_rollout, "rollout"
    return None, "none"


def error_rate_check(ev: Evidence, gates: Gates) -> dict[str, Any]:
    base, span = _baseline(ev, gates)
    cand = ev.candidate.error_rate or 0.0
    if base is None:
        limit = gates.max_error_rate
        rule = f"no stable baseline: at most {_pct(limit)}"
    else:
        stable = base.error_rate or 0.0
        limit = max(stable * gates.max_error_ratio, stable + gates.max_error_increase)
        rule = (
            f"at most max({_pct(stable)} x {gates.max_error_ratio:g}, "
            f"{_pct(stable)} + {_pct(gates.max_error_increase)}) = {_pct(limit)}"
        )
    return {
        "candidate": cand,
        "stable": None if base is None else base.error_rate or 0.0,
        "baseline": span,
        "limit": limit,
        "rule": rule,
        "passed": cand <= limit + 1e-12,
    }


def latency_check(ev: Evidence, gates: Gates) -> dict[str, Any]:
    base, span = _baseline(ev, gates)
    cand = ev.candidate.p95_ms
    if base is None or base.p95_ms is None or cand is None:
        return {"candidate_p95_ms": cand, "stable_p95_ms": None, "baseline": span, "passed": True,
                "rule": "no stable baseline: not judged"}  # fmt: skip
    limit = base.p95_ms * gates.max_latency_ratio
    return {
        "candidate_p95_ms": cand,
        "stable_p95_ms": base.p95_ms,
        "baseline": span,
        "limit_ms": limit,
        "rule": f"p95 at most {gates.max_latency_ratio:g} x stable",
        "passed": cand <= limit + 1e-9,
    }


def decide(
    steps: tuple[int, ...],
    step: int,
    min_seconds: float,
    min_requests: int,
    gates: Gates,
    ev: Evidence,
) -> Decision:
    """The controller's decision for a running rollout at step index `step`."""
    percent = steps[step]
    where = f"step {step + 1} of {len(steps)} ({percent}%)"
    checks: dict[str, Any] = {}
    fell = len(ev.fallbacks)
    checks["fallbacks"] = {"devices": fell, "max": gates.max_fallbacks, "passed": fell <= gates.max_fallbacks}
    if fell > gates.max_fallbacks:
        who = ", ".join(f"{f.get('device_id')} ({f.get('transition')})" for f in ev.fallbacks[:5])
        return Decision(
            Action.HALT,
            f"gate fallbacks: {fell} candidate device(s) fell back (max {gates.max_fallbacks}): {who}",
            "fallbacks",
            checks,
        )
    drifting = len(ev.drift_alerts)
    checks["drift"] = {"alerts": drifting, "halt_on_drift": gates.halt_on_drift,
                       "passed": not (drifting and gates.halt_on_drift)}  # fmt: skip
    if drifting and gates.halt_on_drift:
        who = ", ".join(str(a.get("device_id")) for a in ev.drift_alerts[:5])
        return Decision(
            Action.HALT, f"gate drift: {drifting} drift alert(s) on the candidate ({who})", "drift", checks
        )
    enough_traffic = ev.candidate.requests >= min_requests
    if enough_traffic and ev.candidate.requests > 0:
        err = checks["error_rate"] = error_rate_check(ev, gates)
        if not err["passed"]:
            return Decision(
                Action.HALT,
                f"gate error_rate: candidate {_pct(err['candidate'])} of {ev.candidate.requests} requests "
                f"({ev.candidate.errors} errors) vs stable {_pct(err['stable'])}; {err['rule']}",
                "error_rate",
                checks,
            )
        lat = checks["latency"] = latency_check(ev, gates)
        if not lat["passed"]:
            return Decision(
                Action.HALT,
                f"gate latency: candidate p95 {lat['candidate_p95_ms']:.3g} ms vs stable "
                f"{lat['stable_p95_ms']:.3g} ms (at most {gates.max_latency_ratio:g} x = "
                f"{lat['limit_ms']:.3g} ms)",
                "latency",
                checks,
            )
    missing = []
    if ev.step_seconds < min_seconds:
        missing.append(f"{min_seconds:g} s in the step")
    if not enough_traffic:
        missing.append(f"{min_requests} candidate requests")
    if missing:
        return Decision(Action.HOLD, f"{where}: waiting for {' and '.join(missing)}", None, checks)
    if step + 1 >= len(steps):
        return Decision(Action.COMPLETE, f"{where}: gates passed; the candidate becomes stable", None, checks)
    return Decision(Action.ADVANCE, f"{where}: gates passed; advancing to {steps[step + 1]}%", None, checks)
