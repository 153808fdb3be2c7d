"""The reference profile: what the sample looked like, for the agent's drift monitor.

Shipped (signed) in the manifest as `reference_profile`. Counts, not statistics, so
the device can compare binned live counts with these and the hub can add counts
across devices. Pure numpy.

Schema (JSON):

    {
      "n": 200,                                 # rows in the sample
      "features": [                             # one per input column, in input order
        {"name": "alcohol",
         "kind": "numeric",
         "bin_edges": [11.03, 12.0, ..., 14.83], # ascending, at most 11 (deciles, deduplicated);
                                                 # first = min, last = max of the sample
         "counts": [20, 20, ..., 20],           # len(bin_edges) - 1 bins
         "missing": 0}                          # NaN values; sum(counts) + missing == n
      ],
      "prediction":                             # of the packaged (kept) model on the sample
        {"kind": "classification",
         "labels": ["0", "1", "2"],             # the manifest's labels, same order
         "counts": [70, 80, 50]}                # sum == n
      or
        {"kind": "regression",
         "bin_edges": [...], "counts": [...],   # as for a feature
         "missing": 0}                          # NaN predictions
    }

Binning rule (the agent must bin live values the same way): with edges e0 < e1 < ... < ek,
bin i holds e_i <= v < e_(i+1), and the last bin is closed (v == ek counts in it). Values
below e0 count in the first bin, above ek in the last. When every value is the same,
the edges are [v, v]: one bin. When every value is missing, edges and counts are empty.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

N_BINS = 10


def bin_edges(values: NDArray[np.floating[Any]], n_bins: int = N_BINS) -> list[float]:
    """Quantile edges of the non-missing values: n_bins + 1 at most, deduplicated."""
    present = values[~np.isnan(values)].astype(np.float64)
    if present.size == 0:
        return []
    edges = np.unique(np.quantile(present, np.linspace(0.0, 1.0, n_bins + 1)))
    if edges.size == 1:
        return [float(edges[0]), float(edges[0])]
    # Quantiles 0 and 1 are exactly the min and max: the ends are data, not infinities,
    # so the edges stay finite JSON numbers.
    return [float(e) for e in edges]


def bin_counts(edges: list[float], values: NDArray[np.floating[Any]]) -> list[int]:
    """Count the non-missing values per bin, by the rule in the module docstring."""
    if len(edges) < 2:
        return []
    present = values[~np.isnan(values)].astype(np.float64)
    n_bins = len(edges) - 1
    index = np.searchsorted(np.asarray(edges), present, side="right") - 1
    index = np.clip(index, 0, n_bins - 1)
    return [int(c) for c in np.bincount(index, minlength=n_bins)]


def numeric_profile(values: NDArray[np.floating[Any]]) -> dict[str, Any]:
    edges = bin_edges(values)
    return {
        "bin_edges": edges,
        "counts": bin_counts(edges, values),
        "missing": int(np.isnan(values).sum()),
    }


def reference_profile(
    x: NDArray[np.float32],
    features: tuple[str, ...],
    prediction: dict[str, Any],
) -> dict[str, Any]:
    """The whole profile from the sample rows and a prediction profile."""
    if x.shape[1] != len(features):
        raise ValueError(f"{x.shape[1]} columns but {len(features)} feature names")
    return {
        "n": int(x.shape[0]),
        "features": [
            {"name": name, "kind": "numeric", **numeric_profile(x[:, i])}
            for i, name in enumerate(features)
        ],
        "prediction": prediction,
    }


def classification_prediction(
    predicted: NDArray[np.int64], labels: tuple[str, ...]
) -> dict[str, Any]:
    """Prediction counts per class; `predicted` holds indices into `labels`."""
    counts = np.bincount(predicted, minlength=len(labels))
    return {"kind": "classification", "labels": list(labels), "counts": [int(c) for c in counts]}


def regression_prediction(predicted: NDArray[np.floating[Any]]) -> dict[str, Any]:
    return {"kind": "regression", **numeric_profile(predicted.astype(np.float64).ravel())}
