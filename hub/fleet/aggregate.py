"""Fleet figures from devices' windows: sums, derived numbers and drift on the sums. Pure.

Every figure a device publishes is a count (agent.monitor.summary), so the fleet's window over
a range is the sum of its devices' windows (`agent.monitor.summary.merge`), and drift is tested
on the summed counts against the version's signed reference profile with the same statistics
the devices use (`agent.monitor.drift`): the binned two-sample KS for numeric features and
regression predictions (ordered bins), chi-square homogeneity for categories and classes (the
window's "other" as one more bin, empty in the reference; sparse bins merged by
`merge_sparse_bins` inside `chi_square`), PSI for all, and the p-values corrected across the
features and the prediction together (as a device corrects them).

A window that does not fit the profile's layout (feature names, kinds, bin counts, the
prediction's classes) is left out and reported, rather than failing the whole sum.

`feedback` ({"labelled", "correct"} or {"labelled", "abs_error_sum", "sq_error_sum"} or null;
a window without the key counts as null) is summed here, field by field, whatever `merge`
does with it: accuracy over a range is sum(correct) / sum(labelled).

Latency percentiles are estimated from the fixed histogram as Prometheus' histogram_quantile
does: linear within the bucket holding the rank (the first bucket from 0); a rank in the
overflow bucket is reported as the last bound, flagged `above_last_bucket`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.monitor.drift import Method, correct
from agent.monitor.report import window_tests
from agent.monitor.summary import merge

DEFAULT_ALPHA = 0.05
DEFAULT_METHOD: Method = "bh"
DEFAULT_MIN_ROWS = 100  # fewer summed rows than this: no fleet drift verdict
QUANTILES = (0.5, 0.95, 0.99)
PREDICTION = "prediction"


@dataclass
class FleetSum:
    """The sum of the windows that fit, the devices they came from, and what was left out."""

    window: dict[str, Any] | None = None
    devices: dict[str, dict[str, int]] = field(default_factory=dict)  # per device: windows, requests, errors
    skipped: list[dict[str, Any]] = field(default_factory=list)  # device_id, seq, reason


def expected_bins(reference: Mapping[str, Any]) -> int:
    """How many counts a window holds for a profile feature (or regression prediction)."""
    if reference.get("kind", "numeric") == "categorical":
        return len(reference.get("categories", []))
    return max(len(reference.get("bin_edges", [])) - 1, 0)


def layout_problem(window: Mapping[str, Any], profile: Mapping[str, Any]) -> str | None:
    """Why `window` cannot be compared with (or summed under) `profile`; None when it can."""
    features = window.get("features")
    refs = list(profile.get("features", []))
    if not isinstance(features, list) or len(features) != len(refs):
        return f"the window has {len(features or [])} features, the reference profile {len(refs)}"
    for f, ref in zip(features, refs, strict=True):
        if not isinstance(f, dict) or not isinstance(f.get("counts"), list):
            return "a feature entry is not an object with counts"
        name, kind = f.get("name"), f.get("kind", "numeric")
        if name != ref.get("name") or kind != ref.get("kind", "numeric"):
            theirs = f"{ref.get('name')!r} ({ref.get('kind', 'numeric')})"
            return f"feature {name!r} ({kind}) is {theirs} in the profile"
        if len(f["counts"]) != expected_bins(ref):
            return f"feature {name!r} has {len(f['counts'])} bins, the profile {expected_bins(ref)}"
    pred, ref_pred = window.get("prediction"), profile.get("prediction")
    if isinstance(pred, dict) and isinstance(ref_pred, dict) and ref_pred.get("counts") is not None:
        if pred.get("kind") != ref_pred.get("kind"):
            return f"prediction kind {pred.get('kind')!r} is {ref_pred.get('kind')!r} in the profile"
        if len(pred.get("counts", [])) != len(ref_pred["counts"]):
            size = len(pred.get("counts", []))
            return f"the prediction has {size} bins, the profile {len(ref_pred['counts'])}"
    return None


_FEEDBACK_FIELDS = {
    "classification": ("labelled", "correct"),
    "regression": ("labelled", "abs_error_sum", "sq_error_sum"),
}


def _feedback(window: Mapping[str, Any]) -> tuple[str, dict[str, float]] | None:
    doc, pred = window.get("feedback"), window.get("prediction")
    if not isinstance(doc, dict) or not isinstance(pred, dict):
        return None
    kind = str(pred.get("kind"))
    fields = _FEEDBACK_FIELDS.get(kind)
    if fields is None:
        return None
    values = {k: doc.get(k, 0) for k in fields}
    if not all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values.values()
    ):
        return None
    return kind, {k: float(v) for k, v in values.items()}


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _add_feedback(total: dict[str, Any] | None, window: Mapping[str, Any]) -> dict[str, Any] | None:
    found = _feedback(window)
    if found is None:
        return total
    kind, values = found
    if total is None:
        total = dict.fromkeys(_FEEDBACK_FIELDS[kind], 0)
    for k, v in values.items():
        total[k] = total[k] + (int(v) if k in ("labelled", "correct") else v)
    return total


def sum_windows(
    windows: Iterable[tuple[str, int, Mapping[str, Any]]], profile: Mapping[str, Any]
) -> FleetSum:
    """Sum (device_id, seq, window) triples of one model version; windows that do not fit the
    profile or each other are skipped with the reason."""
    result = FleetSum()
    feedback: dict[str, Any] | None = None
    for device_id, seq, window in windows:
        problem = layout_problem(window, profile)
        body = {k: v for k, v in window.items() if k != "feedback"}
        if problem is None:
            try:
                merged = body if result.window is None else merge(result.window, body)
                if result.window is None:
                    merge(body, body)  # the same checks merge makes, on the first window too
            except (ValueError, KeyError, TypeError) as exc:
                problem = str(exc) if isinstance(exc, ValueError) else f"malformed window ({exc!r})"
        if problem is not None:
            result.skipped.append({"device_id": device_id, "seq": seq, "reason": problem})
            continue
        feedback = _add_feedback(feedback, window)
        result.window = dict(merged)
        per = result.devices.setdefault(device_id, {"windows": 0, "requests": 0, "errors": 0})
        per["windows"] += 1
        per["requests"] += int(window.get("requests", 0))
        per["errors"] += int(window.get("errors", 0))
    if result.window is not None:
        result.window["feedback"] = feedback
    return result


def latency_quantile(bounds: Sequence[float], counts: Sequence[int], q: float) -> tuple[float, bool] | None:
    """(seconds, above_last_bucket) at quantile `q` of a histogram; None when it is empty.

    counts[i] holds bounds[i-1] < s <= bounds[i] (from 0 for i = 0); the last count is above the
    last bound.
    """
    if not 0.0 < q <= 1.0:
        raise ValueError("q must be in (0, 1]")
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen = 0.0
    for i, c in enumerate(counts):
        if c > 0 and seen + c >= rank:
            if i >= len(bounds):
                return float(bounds[-1]), True
            lower = float(bounds[i - 1]) if i > 0 else 0.0
            return lower + (float(bounds[i]) - lower) * (rank - seen) / c, False
        seen += c
    return float(bounds[-1]), True  # pragma: no cover - rank <= total always lands above


def derived(window: Mapping[str, Any] | None) -> dict[str, Any]:
    """Error rate, latency (ms: mean and percentiles), accuracy or MAE/RMSE of a summed window."""
    if window is None:
        return {"error_rate": None, "latency_ms": None, "accuracy": None, "labelled": 0}
    requests, errors = int(window["requests"]), int(window["errors"])
    latency = window["latency"]
    lat: dict[str, Any] = {"mean": latency["sum_us"] / requests / 1000.0 if requests else None}
    for q in QUANTILES:
        found = latency_quantile(latency["bounds"], latency["counts"], q)
        key = f"p{round(q * 100)}"
        lat[key] = None if found is None else round(found[0] * 1000.0, 6)
        if found is not None and found[1]:
            lat.setdefault("above_last_bucket", []).append(key)
    out: dict[str, Any] = {
        "error_rate": errors / requests if requests else None,
        "latency_ms": lat,
        "accuracy": None,
        "labelled": 0,
    }
    cache = window.get("cache")  # the devices' response caches (agent.runtime.cache), when on
    if isinstance(cache, dict) and (cache.get("hits") or cache.get("misses")):
        hits, misses = int(cache.get("hits", 0)), int(cache.get("misses", 0))
        out["cache"] = {"hits": hits, "misses": misses, "hit_rate": hits / (hits + misses)}
    fb = window.get("feedback")
    if isinstance(fb, dict) and fb.get("labelled"):
        n = fb["labelled"]
        out["labelled"] = n
        if "correct" in fb:
            out["accuracy"] = fb["correct"] / n
        else:
            out.pop("accuracy")
            out["mae"] = fb["abs_error_sum"] / n
            out["rmse"] = math.sqrt(fb["sq_error_sum"] / n)
    return out


def _entry(
    name: str, kind: str, observed: Mapping[str, Any], tested: Mapping[str, Any] | None
) -> dict[str, Any]:
    rows = sum(int(c) for c in observed["counts"])
    if kind in ("categorical", "classification"):
        rows += int(observed.get("other", 0))  # values the reference never saw are a bin too
    entry: dict[str, Any] = {"name": name, "kind": kind, "test": None, "rows": rows}
    if tested is not None:  # the same statistics as the device's (agent.monitor.report)
        entry.update({k: tested[k] for k in ("test", "statistic", "p_value", "psi")})
    return entry


def fleet_drift(
    window: Mapping[str, Any] | None,
    profile: Mapping[str, Any],
    *,
    alpha: float = DEFAULT_ALPHA,
    method: Method = DEFAULT_METHOD,
    min_rows: int = DEFAULT_MIN_ROWS,
) -> dict[str, Any]:
    """Drift of a summed window against the profile: one entry per feature and the prediction,
    corrected across all of them; no verdict below `min_rows` rows."""
    rows = int(window["rows"]) if window is not None else 0
    features: list[dict[str, Any]] = []
    prediction: dict[str, Any] | None = None
    if window is not None:
        tested_features, tested_prediction = window_tests(window, profile)
        by_name = {t["name"]: t for t in tested_features}
        for f in window["features"]:
            entry = _entry(f["name"], str(f.get("kind", "numeric")), f, by_name.get(f["name"]))
            entry.update(missing=int(f.get("missing", 0)), other=int(f.get("other", 0)))
            features.append(entry)
        pred, ref_pred = window.get("prediction"), profile.get("prediction")
        if isinstance(pred, dict) and isinstance(ref_pred, dict) and ref_pred.get("counts"):
            prediction = _entry(PREDICTION, str(pred["kind"]), pred, tested_prediction)
    enough = rows >= min_rows
    tested = [t for t in [*features, prediction] if t is not None and t["test"] is not None]
    p_values = [math.nan if t["p_value"] is None else t["p_value"] for t in tested]
    verdicts = correct(p_values, method, alpha) if enough else [False] * len(tested)
    for t in [*features, prediction]:
        if t is not None:
            t["drifted"] = False
    for t, drifted in zip(tested, verdicts, strict=True):
        t["drifted"] = drifted
    return {
        "rows": rows,
        "reference_rows": profile.get("n"),
        "min_rows": min_rows,
        "enough_rows": enough,
        "alpha": alpha,
        "method": method,
        "features": features,
        "prediction": prediction,
        "drifted": [t["name"] for t in tested if t["drifted"]],
    }
