"""An on-device experiment on one model: which version answers a request, and how a shadow agrees.

The update runner starts one when the signed assignment names an experiment for this device
(`agent.update.canary`): the committed (stable) version stays the model's default and the candidate
is loaded beside it as the experiment's arm. Requests that name no version are then routed here:

- "ab": the candidate answers `weight`% of them, sticky by the request's `parameters.key` when it
  sends one (`canary.ab_arm`), at random otherwise; the response's `model_version` says which.
- "shadow": the stable version answers every request; `sample`% of them are then copied to the
  candidate, never before the stable answer is delivered, and dropped (counted) when the candidate
  already has `max_inflight` requests to work through. Its answers are compared with the stable ones
  (`agreement`), never returned.

Requests that name a version (`/versions/{v}`) bypass the experiment.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from agent.update.canary import ab_arm

if TYPE_CHECKING:
    from agent.runtime.registry import LoadedVersion

SHADOW_MAX_INFLIGHT = 8  # copies waiting for the candidate before more are dropped


@dataclass(eq=False)
class ExperimentRoute:
    mode: Literal["ab", "shadow"]
    arm: LoadedVersion  # the candidate
    salt: str
    weight: int = 0  # ab: % of requests the candidate answers
    sample: int = 0  # shadow: % of requests copied to the candidate
    max_inflight: int = SHADOW_MAX_INFLIGHT
    counts: dict[str, int] = field(default_factory=lambda: {"stable": 0, "candidate": 0, "dropped": 0})
    _random: random.Random = field(default_factory=random.Random)

    def picks_arm(self, key: Any) -> bool:
        """A/B: whether the candidate answers a request with this `parameters.key` (None: none)."""
        chosen = ab_arm(self.salt, None if key is None else str(key), self.weight, self._random.random())
        self.counts["candidate" if chosen else "stable"] += 1
        return chosen

    def shadow_wanted(self) -> bool:
        """Shadow: whether to copy this request to the candidate now (sampled, and not too busy)."""
        if self._random.random() * 100.0 >= self.sample:
            return False
        if self.arm.batcher.outstanding >= self.max_inflight:
            self.counts["dropped"] += 1
            return False
        self.counts["candidate"] += 1
        return True

    def status(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"mode": self.mode, "candidate": self.arm.version}
        if self.mode == "ab":
            doc.update(weight=self.weight, answered=dict(self.counts))
        else:
            doc.update(sample=self.sample, copied=self.counts["candidate"], dropped=self.counts["dropped"])
        return doc


def _rows(outputs: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    arr = np.asarray(outputs[name])
    # Not reshape(n, -1): numpy cannot infer the -1 of an empty array (a request of 0 rows).
    return arr.reshape(arr.shape[0], int(np.prod(arr.shape[1:]))) if arr.ndim else arr.reshape(1, 1)


def agreement(primary: Mapping[str, np.ndarray], shadow: Mapping[str, np.ndarray]) -> tuple[int, int]:
    """(rows compared, rows where the shadow agrees with the primary). Classes by their label (or
    the argmax of probabilities); anything else by value, to a relative 1e-3 (quantized versions of
    one model differ in the last bits)."""
    for name in ("label", "probabilities"):
        if name in primary and name in shadow:
            a, b = _rows(primary, name), _rows(shadow, name)
            if a.shape[0] != b.shape[0] or a.size == 0 or b.size == 0:
                return 0, 0
            if name == "probabilities":
                a, b = a.argmax(axis=1), b.argmax(axis=1)
            else:
                a, b = a[:, 0], b[:, 0]
            return int(a.shape[0]), int(np.count_nonzero(a == b))
    common = [n for n in primary if n in shadow]
    if not common:
        return 0, 0
    a, b = _rows(primary, common[0]), _rows(shadow, common[0])
    if a.shape != b.shape or a.size == 0:
        return 0, 0
    if a.dtype.kind not in "biuf" or b.dtype.kind not in "biuf":  # text (BYTES): equal or not
        same = (a == b).all(axis=1)
        return int(same.shape[0]), int(np.count_nonzero(same))
    same = np.isclose(a.astype(np.float64), b.astype(np.float64), rtol=1e-3, atol=1e-6).all(axis=1)
    return int(same.shape[0]), int(np.count_nonzero(same))
