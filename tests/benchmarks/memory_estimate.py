"""The memory budget's estimate against the RSS a load really adds (agent.runtime.memory's table).

    python -m tests.benchmarks.memory_estimate [--out bench-results]

Each package is loaded in a fresh process as the agent loads it: onnxruntime started first with
its warm-up session (the baseline), then ModelRegistry.load (session, self-test, batching check
up to max_batch_size rows); the RSS added is printed beside the estimate. Packages: the wine
example, the benchmark's bench-tabular and bench-conv (tests.benchmarks.models), and MatMul
chains of distinct weights (and one with a single weight shared by every node: the case the
estimate cannot see). Two runs each: RSS deltas are noisy.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

MIB = 1024 * 1024


def _matmul_chain(out: Path, width: int, depth: int, shared: bool = False) -> Path:
    from onnx import TensorProto, helper, numpy_helper

    from agent.package.manifest import TensorSpec
    from tests.support.packages import OPSET, write_package

    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, width])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, width])
    nodes, inits, prev = [], [], "x"
    for i in range(depth):
        name = "w" if shared else f"w{i}"
        if not shared or i == 0:
            w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
            inits.append(numpy_helper.from_array(w, name))
        result = "y" if i == depth - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, name], [result]))
        prev = result
    graph = helper.make_graph(nodes, "chain", [x], [y], inits)
    label = f"matmul-{width}x{depth}{'-shared' if shared else ''}"
    return write_package(
        out / label,
        helper.make_model(graph, opset_imports=OPSET),
        name=label,
        version=1,
        inputs=[TensorSpec("x", "FP32", (-1, width))],
        outputs=[TensorSpec("y", "FP32", (-1, width))],
    )


def _one(directory: Path) -> dict[str, object]:
    """In this (fresh) process: start the runtime, then load the package as the agent does."""
    from concurrent.futures import ThreadPoolExecutor

    from agent.config import RuntimeConfig
    from agent.metrics import Metrics
    from agent.package.store import InstalledVersion, read_manifest
    from agent.runtime.memory import estimate
    from agent.runtime.process import read_rss_bytes, start_runtime
    from agent.runtime.registry import ModelRegistry

    config = RuntimeConfig()
    start_runtime()
    manifest = read_manifest(directory)
    registry = ModelRegistry(config, ThreadPoolExecutor(1), Metrics())
    before = read_rss_bytes() or 0
    registry.load(InstalledVersion(manifest, directory))
    after = read_rss_bytes() or 0
    return {
        "package": directory.name,
        "file_bytes": manifest.model.size,
        "measured_bytes": after - before,
        "estimate_bytes": estimate(manifest, config.max_batch_size).total,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(_one(args.one)))
        return 0
    from tests.benchmarks.models import build_packages
    from tests.support.packages import wine_versions

    bench = build_packages(args.out / "packages", log=lambda *_: None)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        wine = wine_versions(root / "wine", (1,))[1].with_suffix("")
        packages = [wine, bench.tabular, bench.conv]
        packages += [_matmul_chain(root, w, d) for w, d in ((512, 4), (1024, 4), (2048, 2))]
        packages.append(_matmul_chain(root, 1024, 8, shared=True))
        print(f"{'package':28} {'file MiB':>9} {'estimate':>9} {'measured':>18}")
        for directory in packages:
            runs = []
            for _ in range(args.runs):
                proc = subprocess.run(
                    [sys.executable, "-m", "tests.benchmarks.memory_estimate", "--one", str(directory)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            first = runs[0]
            measured = " / ".join(f"{int(r['measured_bytes']) / MIB:.1f}" for r in runs)
            name = "wine" if directory == wine else directory.name
            print(
                f"{name:28} {int(first['file_bytes']) / MIB:9.2f} "
                f"{int(first['estimate_bytes']) / MIB:9.1f} {measured:>18}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
