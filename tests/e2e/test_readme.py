"""The README's Python client snippet runs as written against a real agent."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from tests.support.agentproc import running_agent

pytestmark = pytest.mark.e2e
README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="module")
def wine_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from examples.train_example import build_example

    return build_example(tmp_path_factory.mktemp("wine"))


def test_python_snippet(tmp_path: Path, wine_package: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    snippet = next(b for b in blocks if "UnixConnection" in b)
    with running_agent(tmp_path, wine_package) as agent:
        code = snippet.replace("/run/outpost/agent.sock", agent.socket)
        scope: dict[str, object] = {}
        exec(compile(code, "README.md", "exec"), scope)
        probabilities = scope["probabilities"]
        assert isinstance(probabilities, np.ndarray)
        assert probabilities.shape == (4, 3)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-3)
        scope["conn"].close()  # type: ignore[attr-defined]


def test_curl_example_request_shape(tmp_path: Path, wine_package: Path) -> None:
    """The curl example's body is a valid request for the example model."""
    import json

    text = README.read_text()
    body = re.search(r"/infer -d '(\{.*?\})'", text, re.S)
    assert body is not None
    with running_agent(tmp_path, wine_package) as agent:
        status, doc = agent.json("POST", "/v2/models/wine/infer", json.loads(body.group(1)))
        assert status == 200, doc
        assert [o["name"] for o in doc["outputs"]] == ["label", "probabilities"]
