"""On-device experiments between a group's stable version and its candidate, the hub's side.

An experiment is part of a group's deployment (hub.registry: `Experiment`, signed into the
assignment as `"experiment": {"mode": "ab", "weight": W}` or `{"mode": "shadow", "sample": S}`);
devices in the canary bucket run it. The hub sums each arm's summary windows since it started
and compares the arms.

Modules: `stats` (pure: two-proportion z-test, Wilson intervals, the verdict), `evidence` (an
arm's totals from the fleet's windows), `queries` (experiments as plain dicts, for the API, the
CLI and the dashboard), `service` (the checks around starting and stopping), `cli`
(`outpost experiment ...`).
"""

from hub.experiments.queries import experiments, group_experiment
from hub.experiments.stats import Thresholds

__all__ = ["Thresholds", "experiments", "group_experiment"]
