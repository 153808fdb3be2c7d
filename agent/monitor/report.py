"""A window's drift tests against the signed reference profile, and the `drift` message. Pure.

`window_tests` runs one test per feature and one on the predictions, comparing the window's counts
(agent.monitor.summary) with the profile's counts in the same bins: the binned two-sample KS for
numeric features and regression predictions (ordered bins), chi-square homogeneity for categories
and classes (unordered), and PSI for both. The hub runs the same function on windows summed across
devices, so a device's verdict and the fleet's are computed the same way.

`drift_message` adds the correction across features and the k-in-a-row rule (`DriftDetector`),
which holds state, so it belongs to one version on one device.

Message schema (`SCHEMA`), body of the MQTT `drift` topic:

    {"schema": "outpost-drift/1", "model": "wine", "version": 3, "start": ..., "end": ..., "rows": 470,
     "method": "bh", "alpha": 0.05, "k": 3,
     "features": [{"name": "alcohol", "test": "ks", "statistic": 0.12, "p_value": 0.001, "psi": 0.31,
                   "drifted": true, "streak": 2}],
     "prediction": {... the same fields, name "prediction"} or null,
     "drifted": ["alcohol"],      # significant in this window, after correction
     "alert": true,               # some feature drifted in each of the last k windows (a level)
     "alerting": ["alcohol"], "streak": 2}
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from agent.monitor.drift import DriftDetector, binned_ks, chi_square, psi

__all__ = ["PREDICTION", "SCHEMA", "drift_message", "window_tests"]

SCHEMA = "outpost-drift/1"
PREDICTION = "prediction"
# The prediction's key among the detector's per-feature runs: not a name a feature can have
# by accident, so a feature called "prediction" keeps its own run.
_PREDICTION_KEY = "\x00prediction"


def _round(value: float) -> float | None:
    # JSON has no NaN; six significant digits are plenty for a statistic.
    return None if math.isnan(value) else float(f"{value:.6g}")


def _test(test: str, reference: list[float], observed: list[float], name: str) -> dict[str, Any] | None:
    if len(reference) != len(observed):
        raise ValueError(
            f"{name}: the window has {len(observed)} bins, the reference profile {len(reference)}"
        )
    if sum(reference) <= 0 or sum(observed) <= 0:
        return None  # nothing to compare (no reference data, or no rows in the window)
    if test == "ks":
        statistic, p_value = binned_ks(reference, observed)
    else:
        statistic, _dof, p_value = chi_square(reference, observed)
    return {
        "name": name,
        "test": test,
        "statistic": _round(statistic),
        "p_value": _round(p_value),
        "psi": _round(psi(reference, observed)),
    }


def window_tests(
    window: Mapping[str, Any], profile: Mapping[str, Any]
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The tests of each testable feature, and of the predictions (None when there are none).

    Features are matched to the profile's by position and checked by name. A feature with no
    reference bins, or no values in the window, has no entry. Categories: the window's "other"
    (values the reference never saw) is one more bin, empty in the reference.
    """
    ref_features = list(profile.get("features", []))
    features = list(window.get("features", []))
    if len(features) != len(ref_features):
        raise ValueError(
            f"the window has {len(features)} features, the reference profile {len(ref_features)}"
        )
    results: list[dict[str, Any]] = []
    for feature, ref in zip(features, ref_features, strict=True):
        name = str(feature["name"])
        if str(ref.get("name", name)) != name:
            raise ValueError(f"feature {name!r} is {ref.get('name')!r} in the reference profile")
        reference = [float(c) for c in ref.get("counts", [])]
        observed = [float(c) for c in feature["counts"]]
        if feature.get("kind", "numeric") == "categorical":
            entry = _test("chi2", [*reference, 0.0], [*observed, float(feature.get("other", 0))], name)
        else:
            entry = _test("ks", reference, observed, name)
        if entry is not None:
            results.append(entry)
    prediction = window.get("prediction")
    ref_prediction = profile.get("prediction")
    tested: dict[str, Any] | None = None
    if prediction and ref_prediction and ref_prediction.get("counts"):
        reference = [float(c) for c in ref_prediction["counts"]]
        observed = [float(c) for c in prediction["counts"]]
        if prediction["kind"] == "classification":
            other = float(prediction.get("other", 0))
            tested = _test("chi2", [*reference, 0.0], [*observed, other], PREDICTION)
        else:
            tested = _test("ks", reference, observed, PREDICTION)
    return results, tested


def drift_message(
    window: Mapping[str, Any], profile: Mapping[str, Any], detector: DriftDetector
) -> dict[str, Any]:
    """The `drift` body of a closed window; advances `detector` (one call per window, in order)."""
    features, prediction = window_tests(window, profile)
    keyed = [(t["name"], t) for t in features]
    if prediction is not None:
        keyed.append((_PREDICTION_KEY, prediction))
    p_values = {k: (math.nan if t["p_value"] is None else t["p_value"]) for k, t in keyed}
    psi_values = {k: t["psi"] for k, t in keyed if t["psi"] is not None}
    verdict = detector.update(p_values, psi_values)
    drifted = set(verdict.drifted_features)
    for key, t in keyed:
        t["drifted"] = key in drifted
        t["streak"] = verdict.feature_streaks.get(key, 0)

    def public(names: list[str]) -> list[str]:
        return [PREDICTION if n == _PREDICTION_KEY else n for n in names]

    return {
        "schema": SCHEMA,
        "model": window["model"],
        "version": window["version"],
        "start": window["start"],
        "end": window["end"],
        "rows": window["rows"],
        "method": detector.method,
        "alpha": detector.alpha,
        "k": detector.k,
        "features": features,
        "prediction": prediction,
        "drifted": public(verdict.drifted_features),
        "alert": verdict.alert,
        "alerting": public(verdict.alerting_features),
        "streak": verdict.streak,
    }
