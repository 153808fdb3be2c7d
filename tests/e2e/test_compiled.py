"""The agent's request path compiled (setup.py builds it with mypyc) and as plain Python.

The install the tests run is compiled wherever setup.py could build it, so the whole suite tests
the compiled modules. Here: that it really is compiled, and that the same agent run from a copy
of its sources without the compiled modules (what a machine without a C compiler installs)
answers every request the same, byte for byte but the generated ids.
"""

from __future__ import annotations

import ast
import importlib
import importlib.machinery
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from agent.buildinfo import compiled_modules, stale_extensions
from tests.e2e.test_serving import ERROR_CASES, binary_request
from tests.support.agentproc import AgentProcess, plain_agent_env, running_agent
from tests.support.packages import affine_package, typed_package

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
EXTENSION = tuple(importlib.machinery.EXTENSION_SUFFIXES)


def setup_compiled() -> list[str]:
    """setup.py's COMPILED list, as module names (read, not run: running it would build)."""
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "COMPILED":
            paths: list[str] = ast.literal_eval(node.value)
            return [p.removesuffix(".py").replace("/", ".") for p in paths]
    raise AssertionError("setup.py has no COMPILED list")


def installed_compiled() -> bool:
    return any(p.name.endswith(EXTENSION) for p in (REPO / "agent").rglob("*"))


def test_this_install_runs_the_listed_modules_compiled() -> None:
    if not installed_compiled():
        pytest.skip("installed as plain Python (OUTPOST_PURE_PYTHON set, or no compiler at install)")
    names = setup_compiled()
    assert "agent.serving.http" in names and "agent.serving.oip" in names
    for name in names:
        module = importlib.import_module(name)
        assert (module.__file__ or "").endswith(EXTENSION), f"{name} runs from {module.__file__}"
    assert set(names) <= set(compiled_modules())
    assert stale_extensions(REPO / "agent") == []


def test_a_source_newer_than_its_compiled_module_is_found(tmp_path: Path) -> None:
    suffix = EXTENSION[0]
    (tmp_path / "fresh.py").write_text("")
    (tmp_path / f"fresh{suffix}").write_bytes(b"")
    (tmp_path / "old.py").write_text("")
    (tmp_path / f"old{suffix}").write_bytes(b"")
    (tmp_path / "alone.py").write_text("")  # never compiled: nothing to be stale
    os.utime(tmp_path / "fresh.py", (1000, 1000))
    os.utime(tmp_path / f"old{suffix}", (1000, 1000))
    assert stale_extensions(tmp_path) == [tmp_path / "old.py"]
    # mypyc's shared library holds the code: rebuilt after the edit, nothing is stale.
    (tmp_path / f"group__mypyc{suffix}").write_bytes(b"")
    assert stale_extensions(tmp_path) == []
    os.utime(tmp_path / f"group__mypyc{suffix}", (500, 500))
    assert stale_extensions(tmp_path) == [tmp_path / "old.py"]


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("packages")
    return {"affine": affine_package(root / "affine-1"), "typed": typed_package(root / "typed-1")}


@pytest.fixture(scope="module")
def agents(
    tmp_path_factory: pytest.TempPathFactory, packages: dict[str, Path]
) -> Iterator[tuple[AgentProcess, AgentProcess]]:
    root = tmp_path_factory.mktemp("agents")
    plain_env = plain_agent_env(root)
    with (
        running_agent(root / "compiled", packages["affine"], packages["typed"]) as compiled,
        running_agent(root / "plain", packages["affine"], packages["typed"], env=plain_env) as plain,
    ):
        yield compiled, plain


def without_ids(data: bytes) -> Any:
    doc = orjson.loads(data)
    if isinstance(doc, dict):
        doc.pop("id", None)
    return doc


def test_the_plain_python_agent_says_so_and_answers_as_the_compiled_one(
    agents: tuple[AgentProcess, AgentProcess],
) -> None:
    compiled, plain = agents
    assert plain.json("GET", "/v1/status")[1]["compiled"] == []
    assert "request path in plain Python" in plain.log()
    if installed_compiled():
        assert "agent.serving.http" in compiled.json("GET", "/v1/status")[1]["compiled"]
        assert "request path compiled" in compiled.log()

    rows = np.random.default_rng(5).standard_normal((3, 4)).astype(np.float32)
    json_rows = orjson.dumps(
        {"inputs": [{"name": "x", "shape": [3, 4], "datatype": "FP32", "data": rows.ravel().tolist()}]}
    )
    typed = orjson.dumps(
        {
            "id": "mine",
            "inputs": [
                {"name": "i32", "shape": [1, 2], "datatype": "INT32", "data": [-5, 7]},
                {"name": "f16", "shape": [1, 2], "datatype": "FP16", "data": [0.5, -1.25]},
                {"name": "u8", "shape": [1, 2], "datatype": "UINT8", "data": [0, 255]},
                {"name": "b", "shape": [1, 2], "datatype": "BOOL", "data": [True, False]},
                {"name": "f64", "shape": [1, 2], "datatype": "FP64", "data": [1e-300, -2.5]},
                {"name": "s", "shape": [1, 2], "datatype": "BYTES", "data": ["héllo", ""]},
            ],
        }
    )
    requests: list[tuple[str, bytes, dict[str, str]]] = [
        ("/v2/models/affine/infer", json_rows, {}),
        ("/v2/models/typed/infer", typed, {}),
        ("/v2/models/affine/infer", *binary_request(rows, binary_outputs=False)),
    ]
    requests += [(case.values[0], case.values[1], {}) for case in ERROR_CASES]
    for path, body, headers in requests:
        a = compiled.request("POST", path, body, headers)
        b = plain.request("POST", path, body, headers)
        assert a[0] == b[0] and a[0] in (200, 400, 404), (path, body[:80], a, b)
        assert without_ids(a[2]) == without_ids(b[2]), (path, body[:80])
