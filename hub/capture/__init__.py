"""Data capture for retraining, the hub's side: what devices send, where it is kept, how it leaves.

A deployment may ask its devices for data capture (`"capture": {"sample_bp": S,
"max_rows_per_min": R}` in the signed assignment; hub.registry.deployments). Devices then publish
sampled requests with their predictions, and labels fed back for them, on
`outpost/v1/{group}/{device_id}/capture`; the fleet consumer stores them here, and operators
export a model version's captured rows as CSV or Parquet.

Modules: `rules` (pure: the message, its limits, the policy's wording), `tables` (the schema),
`store` (writes in the fleet consumer's transaction: dedupe, limits, retention), `columns`
(pure: a version's export columns and how a captured request becomes lines), `export` (CSV and
Parquet streams), `queries` (the API's answers), `cli` (`outpost capture ...`).

This package's `__init__` imports nothing: hub.fleet imports `rules`, and `store` imports
hub.fleet, so an import here would make a cycle.
"""
