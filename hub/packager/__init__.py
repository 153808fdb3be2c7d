"""Turns a fitted scikit-learn pipeline into an Outpost model package (int8 ONNX + manifest).

One module per step: `sample` (reading the sample data), `estimator` (what the model is),
`convert` (to ONNX), `quantize` (int8), `session` (onnxruntime), `evaluate` (scores and the
int8 decision), `profile` (the drift reference), `selftest` (test vectors) and `build`
(the whole run and the files). Only `session`, `quantize`, `estimator.load_estimator`,
`sample.load_sample` and `build.write_package` touch the runtime or the disk.
"""

from hub.packager.build import PackageOptions, PackageReport, build_package, package_paths
from hub.packager.evaluate import DEFAULT_TOLERANCE, FP32, INT8

__all__ = [
    "DEFAULT_TOLERANCE",
    "FP32",
    "INT8",
    "PackageOptions",
    "PackageReport",
    "build_package",
    "package_paths",
]
