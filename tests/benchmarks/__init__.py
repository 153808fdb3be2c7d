"""`make bench`: Outpost's agent measured side by side with onnxruntime in-process and the
small web app a user would write instead.

Modules: `models` builds the workload packages, `peer` is that web app, `client` is the
load generator, `run` orchestrates one run and writes bench-results/.
"""
