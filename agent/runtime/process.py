"""The process's own memory: its resident set, and starting onnxruntime before any model.

The adapter half of the memory budget (agent.runtime.memory is the pure half).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

_STATM = Path("/proc/self/statm")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

# y = Identity(x), FP32 [1], opset 17: about the smallest model onnxruntime accepts (made with
# onnx.helper; tests/agent/test_memory.py checks that it still loads and answers).
_WARM_UP_MODEL = (
    b'\x08\x08\x12\x00:7\n\x10\n\x01x\x12\x01y"\x08Identity\x12\x01wZ\x0f\n\x01x\x12\n\n\x08\x08\x01'
    b"\x12\x04\n\x02\x08\x01b\x0f\n\x01y\x12\n\n\x08\x08\x01\x12\x04\n\x02\x08\x01B\x04\n\x00\x10\x11"
)


def read_rss_bytes() -> int | None:
    """This process's resident set, from /proc/self/statm; None where there is no /proc."""
    try:
        return int(_STATM.read_bytes().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def start_runtime(intra_op_threads: int = 1, inter_op_threads: int = 1) -> None:
    """Import onnxruntime and make (and drop) one tiny session.

    The first session of a process costs ~10 MiB that no later one pays (thread pools, the
    kernel registry): paid here, it is part of the agent's baseline, not of the first model."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = intra_op_threads
    so.inter_op_num_threads = inter_op_threads
    so.enable_cpu_mem_arena = False
    so.log_severity_level = 4
    session = ort.InferenceSession(_WARM_UP_MODEL, sess_options=so, providers=["CPUExecutionProvider"])
    session.run(None, {"x": np.ones(1, dtype=np.float32)})
