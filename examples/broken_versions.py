"""Deliberately broken versions of a package, to show (and test) the agent falling back.

`make_failing_variant(package_dir, out_dir, version)` answers its self-test vectors exactly but
fails (a gather out of bounds inside the graph) on inputs whose first feature is well above
anything in them: the hub accepts it, real traffic makes its probation fail on errors.

`make_slow_variant(package_dir, out_dir, version)` keeps the model's answers exactly but adds a
chain of large matrix products whose result is multiplied by zero into the probabilities: the
hub accepts it (its self-test vectors still reproduce), and on a device it answers correctly but
ten or more times slower than the version before, and over a millisecond slower per row (probation
does not count differences under 0.25 ms), so its probation fails on latency.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np


def _rename_probabilities(graph: object) -> None:
    for node in graph.node:  # type: ignore[attr-defined]
        node.output[:] = ["probabilities_fast" if o == "probabilities" else o for o in node.output]
        node.input[:] = ["probabilities_fast" if i == "probabilities" else i for i in node.input]


def _write_variant(package_dir: Path, out_dir: Path, version: int, raw: bytes, suffix: str) -> Path:
    from agent.package.store import write_package_tar

    out = out_dir / f"{package_dir.name}-{suffix}-v{version}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    (out / "model.onnx").write_bytes(raw)
    manifest = json.loads((package_dir / "manifest.json").read_text())
    manifest["version"] = version
    manifest["model"] = {**manifest["model"], "sha256": hashlib.sha256(raw).hexdigest(), "size": len(raw)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    archive = out.with_suffix(".tar")
    archive.unlink(missing_ok=True)
    write_package_tar(out, archive)
    return archive


def make_failing_variant(package_dir: Path, out_dir: Path, version: int) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(package_dir / "model.onnx"))
    graph = model.graph
    manifest = json.loads((package_dir / "manifest.json").read_text())
    rows = np.array(manifest["self_test"]["inputs"][0]["data"], dtype=np.float32)
    rows = rows.reshape(manifest["self_test"]["inputs"][0]["shape"])
    # Every self-test row maps to index 0; inputs past 1.5x their largest first feature do not.
    scale = float(np.abs(rows[:, 0]).max()) * 1.5 or 1.0
    _rename_probabilities(graph)
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(0, dtype=np.int64), "fail_col"),
            numpy_helper.from_array(np.array(scale, dtype=np.float32), "fail_scale"),
            numpy_helper.from_array(np.zeros(1, dtype=np.float32), "fail_table"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "fail_axis"),
            numpy_helper.from_array(np.array(0.0, dtype=np.float32), "fail_zero"),
        ]
    )
    graph.node.extend(
        [
            helper.make_node("Gather", [graph.input[0].name, "fail_col"], ["fail_x0"], axis=1),
            helper.make_node("Abs", ["fail_x0"], ["fail_abs"]),
            helper.make_node("Div", ["fail_abs", "fail_scale"], ["fail_ratio"]),
            helper.make_node("Floor", ["fail_ratio"], ["fail_floor"]),
            helper.make_node("Cast", ["fail_floor"], ["fail_index"], to=TensorProto.INT64),
            helper.make_node("Gather", ["fail_table", "fail_index"], ["fail_pick"], axis=0),
            helper.make_node("Unsqueeze", ["fail_pick", "fail_axis"], ["fail_column"]),
            helper.make_node("Mul", ["fail_column", "fail_zero"], ["fail_nothing"]),
            helper.make_node("Add", ["probabilities_fast", "fail_nothing"], ["probabilities"]),
        ]
    )
    return _write_variant(package_dir, out_dir, version, model.SerializeToString(), "failing")


def make_slow_variant(
    package_dir: Path, out_dir: Path, version: int, width: int = 768, depth: int = 40
) -> Path:
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(package_dir / "model.onnx"))
    graph = model.graph
    features = graph.input[0].type.tensor_type.shape.dim[1].dim_value
    _rename_probabilities(graph)  # the real probabilities now go by another name, everywhere
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array((rng.standard_normal((features, width)) / 8).astype(np.float32), "slow_w0")
    ]
    nodes = [helper.make_node("MatMul", [graph.input[0].name, "slow_w0"], ["slow_h0"])]
    # One matrix for every layer: the work grows with the depth, the package does not (2.4 MB).
    w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    inits.append(numpy_helper.from_array(w, "slow_w1"))
    for i in range(depth):
        source = f"slow_t{i}" if i else "slow_h0"
        nodes.append(helper.make_node("MatMul", [source, "slow_w1"], [f"slow_m{i}"]))
        nodes.append(helper.make_node("Tanh", [f"slow_m{i}"], [f"slow_t{i + 1}"]))  # bounded: no inf * 0
    inits.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "slow_axis"))
    inits.append(numpy_helper.from_array(np.array(0.0, dtype=np.float32), "slow_zero"))
    nodes += [
        helper.make_node("ReduceSum", [f"slow_t{depth}", "slow_axis"], ["slow_sum"], keepdims=1),
        helper.make_node("Mul", ["slow_sum", "slow_zero"], ["slow_nothing"]),
        helper.make_node("Add", ["probabilities_fast", "slow_nothing"], ["probabilities"]),
    ]
    graph.node.extend(nodes)
    graph.initializer.extend(inits)
    return _write_variant(package_dir, out_dir, version, model.SerializeToString(), "slow")
