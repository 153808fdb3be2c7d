"""End to end: the real agent process on a real Unix socket, real onnxruntime sessions."""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import orjson
import pytest

from tests.support.agentproc import AgentProcess, running_agent
from tests.support.packages import TYPED_DATATYPES, affine_package, typed_package

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("packages")
    return {
        "affine1": affine_package(root / "affine-1", version=1, scale=2.0),
        "affine2": affine_package(root / "affine-2", version=2, scale=3.0),
        "typed": typed_package(root / "typed-1"),
    }


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory, packages: dict[str, Path]) -> Any:
    root = tmp_path_factory.mktemp("agent")
    with running_agent(
        root,
        packages["affine1"],
        packages["affine2"],
        packages["typed"],
        extra={"server": {"max_body_bytes": 1 << 20}},
    ) as a:
        yield a


def infer(
    agent: AgentProcess, model: str, doc: dict[str, Any], version: str | None = None
) -> tuple[int, Any]:
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
    return agent.json("POST", path, doc)


def x_input(rows: np.ndarray) -> dict[str, Any]:
    return {
        "inputs": [
            {"name": "x", "shape": list(rows.shape), "datatype": "FP32", "data": rows.ravel().tolist()}
        ]
    }


def assert_serving(agent: AgentProcess) -> None:
    status, doc = infer(agent, "affine", x_input(np.ones((1, 4), np.float32)))
    assert status == 200, doc
    assert doc["outputs"][0]["data"] == [4.0] * 4


def direct(package: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(package / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def test_health_and_server_metadata(agent: AgentProcess) -> None:
    assert agent.request("GET", "/v2/health/live")[0] == 200
    assert agent.request("GET", "/v2/health/ready")[0] == 200
    status, doc = agent.json("GET", "/v2")
    assert status == 200
    assert doc["name"] == "outpost-agent"
    assert "binary_tensor_data" in doc["extensions"]


def test_model_metadata_and_ready(agent: AgentProcess) -> None:
    status, doc = agent.json("GET", "/v2/models/affine")
    assert status == 200
    assert doc["versions"] == ["1", "2"]
    assert doc["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert {o["name"] for o in doc["outputs"]} == {"y", "label"}
    assert agent.request("GET", "/v2/models/affine/ready")[0] == 200
    assert agent.request("GET", "/v2/models/affine/versions/1/ready")[0] == 200
    assert agent.request("GET", "/v2/models/affine/versions/9/ready")[0] == 404
    assert agent.request("GET", "/v2/models/affine/versions/1")[0] == 200


def test_predictions_equal_onnxruntime_direct(agent: AgentProcess, packages: dict[str, Path]) -> None:
    rows = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
    for version, package in (("1", packages["affine1"]), ("2", packages["affine2"])):
        status, doc = infer(agent, "affine", x_input(rows), version)
        assert status == 200, doc
        assert doc["model_version"] == version
        y, label = direct(package, {"x": rows})
        outs = {o["name"]: o for o in doc["outputs"]}
        np.testing.assert_array_equal(np.array(outs["y"]["data"], np.float32).reshape(outs["y"]["shape"]), y)
        assert outs["label"]["data"] == label.tolist()


def test_default_version_is_latest(agent: AgentProcess) -> None:
    status, doc = infer(agent, "affine", x_input(np.zeros((1, 4), np.float32)))
    assert status == 200
    assert doc["model_version"] == "2"


def test_nested_and_flat_json_agree(agent: AgentProcess) -> None:
    rows = np.arange(8, dtype=np.float32).reshape(2, 4)
    flat = infer(agent, "affine", x_input(rows), "1")[1]
    nested = infer(
        agent,
        "affine",
        {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": rows.tolist()}]},
        "1",
    )[1]
    assert flat["outputs"] == nested["outputs"]


def binary_request(rows: np.ndarray, binary_outputs: bool) -> tuple[bytes, dict[str, str]]:
    raw = rows.astype("<f4").tobytes()
    header: dict[str, Any] = {
        "inputs": [
            {
                "name": "x",
                "shape": list(rows.shape),
                "datatype": "FP32",
                "parameters": {"binary_data_size": len(raw)},
            }
        ],
    }
    if binary_outputs:
        header["outputs"] = [{"name": "y", "parameters": {"binary_data": True}}, {"name": "label"}]
    head = orjson.dumps(header)
    return head + raw, {
        "Inference-Header-Content-Length": str(len(head)),
        "Content-Type": "application/octet-stream",
    }


def test_binary_and_json_paths_agree(agent: AgentProcess) -> None:
    rows = np.random.default_rng(2).standard_normal((3, 4)).astype(np.float32)
    json_doc = infer(agent, "affine", x_input(rows), "1")[1]
    json_y = np.array(json_doc["outputs"][0]["data"], np.float32)

    body, headers = binary_request(rows, binary_outputs=True)
    status, resp_headers, data = agent.request("POST", "/v2/models/affine/versions/1/infer", body, headers)
    assert status == 200, data
    head_len = int(resp_headers["inference-header-content-length"])
    head = orjson.loads(data[:head_len])
    outs = {o["name"]: o for o in head["outputs"]}
    assert outs["y"]["parameters"]["binary_data_size"] == 3 * 4 * 4
    binary_y = np.frombuffer(data[head_len:], "<f4")
    np.testing.assert_array_equal(binary_y, json_y)
    assert outs["label"]["data"] == json_doc["outputs"][1]["data"]

    # Binary input with JSON output gives the JSON answer exactly.
    body, headers = binary_request(rows, binary_outputs=False)
    status, _, data = agent.request("POST", "/v2/models/affine/versions/1/infer", body, headers)
    assert status == 200
    assert orjson.loads(data)["outputs"] == json_doc["outputs"]


def test_requested_outputs_selection(agent: AgentProcess) -> None:
    doc = x_input(np.ones((1, 4), np.float32)) | {"outputs": [{"name": "label"}]}
    status, resp = infer(agent, "affine", doc)
    assert status == 200
    assert [o["name"] for o in resp["outputs"]] == ["label"]


def test_id_is_echoed_or_generated(agent: AgentProcess) -> None:
    doc = x_input(np.ones((1, 4), np.float32))
    assert infer(agent, "affine", doc | {"id": "req-42"})[1]["id"] == "req-42"
    first = infer(agent, "affine", doc)[1]["id"]
    second = infer(agent, "affine", doc)[1]["id"]
    assert first and second and first != second


def test_all_datatypes_of_a_model_round_trip(agent: AgentProcess, packages: dict[str, Path]) -> None:
    values: dict[str, Any] = {
        "i32": [[-5, 7], [2**31 - 1, -(2**31)]],
        "f16": [[0.5, -1.25], [65504.0, 0.0]],
        "u8": [[0, 255], [1, 2]],
        "b": [[True, False], [False, True]],
        "f64": [[1e-300, -2.5], [3.141592653589793, 0.0]],
        "s": [["héllo", ""], ["a b", "z"]],
    }
    doc = {
        "inputs": [
            {"name": n, "shape": [2, 2], "datatype": TYPED_DATATYPES[n], "data": v} for n, v in values.items()
        ]
    }
    status, resp = infer(agent, "typed", doc)
    assert status == 200, resp
    outs = {o["name"]: o for o in resp["outputs"]}
    for name, value in values.items():
        out = outs[f"{name}_out"]
        assert out["datatype"] == TYPED_DATATYPES[name]
        assert out["shape"] == [2, 2]
        assert out["data"] == [x for row in value for x in row]

    # The same request with every tensor in the binary encoding.
    blobs: list[bytes] = []
    inputs = []
    for name, value in values.items():
        if name == "s":
            raw = b"".join(struct.pack("<I", len(s.encode())) + s.encode() for row in value for s in row)
        else:
            dtype = {"i32": "<i4", "f16": "<f2", "u8": "u1", "b": "?", "f64": "<f8"}[name]
            raw = np.array(value, dtype=dtype).tobytes()
        blobs.append(raw)
        inputs.append(
            {
                "name": name,
                "shape": [2, 2],
                "datatype": TYPED_DATATYPES[name],
                "parameters": {"binary_data_size": len(raw)},
            }
        )
    head = orjson.dumps({"inputs": inputs, "parameters": {"binary_data_output": True}})
    status, headers, data = agent.request(
        "POST",
        "/v2/models/typed/infer",
        head + b"".join(blobs),
        {"Inference-Header-Content-Length": str(len(head))},
    )
    assert status == 200, data
    hlen = int(headers["inference-header-content-length"])
    out_head = orjson.loads(data[:hlen])
    offset = hlen
    by_name = {}
    for out in out_head["outputs"]:
        size = out["parameters"]["binary_data_size"]
        by_name[out["name"][:-4]] = data[offset : offset + size]
        offset += size
    assert offset == len(data)
    for name, raw in zip(values, blobs, strict=True):
        assert by_name[name] == raw, name


ERROR_CASES = [
    pytest.param("/v2/models/affine/infer", b"{not json", 400, "not valid JSON", id="malformed-json"),
    pytest.param("/v2/models/affine/infer", b"[1,2]", 400, "JSON object", id="not-an-object"),
    pytest.param(
        "/v2/models/affine/infer",
        b'{"inputs":[{"name":"x","shape":[1,3],"datatype":"FP32","data":[1,2,3]}]}',
        400,
        "shape",
        id="wrong-shape",
    ),
    pytest.param(
        "/v2/models/affine/infer",
        b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"INT64","data":[1,2,3,4]}]}',
        400,
        "datatype",
        id="wrong-datatype",
    ),
    pytest.param(
        "/v2/models/affine/infer",
        b'{"inputs":[{"name":"nope","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}]}',
        400,
        "unknown input",
        id="unknown-input",
    ),
    pytest.param(
        "/v2/models/affine/infer",
        b'{"inputs":[{"name":"x","shape":[2,4],"datatype":"FP32","data":[1,2,3,4]}]}',
        400,
        "values given",
        id="too-few-values",
    ),
    pytest.param(
        "/v2/models/affine/infer",
        b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":["a","b","c","d"]}]}',
        400,
        "FP32",
        id="strings-for-floats",
    ),
    pytest.param("/v2/models/nope/infer", b"{}", 404, "unknown model", id="unknown-model"),
    pytest.param("/v2/models/affine/versions/7/infer", b"{}", 404, "no version 7", id="unknown-version"),
    pytest.param("/v2/nothing/here", b"", 404, "no route", id="unknown-route"),
]


@pytest.mark.parametrize(("path", "body", "status", "message"), ERROR_CASES)
def test_errors_answer_cleanly_and_the_agent_keeps_serving(
    agent: AgentProcess, path: str, body: bytes, status: int, message: str
) -> None:
    got, headers, data = agent.request("POST", path, body, {"Content-Type": "application/json"})
    assert got == status
    doc = orjson.loads(data)
    assert set(doc) == {"error"}
    assert message in doc["error"]
    assert "Traceback" not in doc["error"]
    assert_serving(agent)


def test_binary_too_few_bytes(agent: AgentProcess) -> None:
    head = orjson.dumps(
        {
            "inputs": [
                {"name": "x", "shape": [1, 4], "datatype": "FP32", "parameters": {"binary_data_size": 16}}
            ]
        }
    )
    status, _, data = agent.request(
        "POST",
        "/v2/models/affine/infer",
        head + b"\0" * 8,
        {"Inference-Header-Content-Length": str(len(head))},
    )
    assert status == 400
    assert "runs past the end" in orjson.loads(data)["error"]
    assert_serving(agent)


def test_body_over_limit_is_413(agent: AgentProcess) -> None:
    status, _, data = agent.request("POST", "/v2/models/affine/infer", b" " * (2 << 20))
    assert status == 413
    assert "over the limit" in orjson.loads(data)["error"]
    assert_serving(agent)


def test_wrong_method_is_400(agent: AgentProcess) -> None:
    status, _, data = agent.request("GET", "/v2/models/affine/infer")
    assert status == 400
    assert "not allowed" in orjson.loads(data)["error"]


def test_pipelined_requests_answer_in_order(agent: AgentProcess) -> None:
    reqs = []
    for i in range(5):
        body = orjson.dumps(x_input(np.full((1, 4), i, np.float32)) | {"id": f"p{i}"})
        reqs.append(
            b"POST /v2/models/affine/versions/1/infer HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
    reqs.append(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(agent.socket)
        s.sendall(b"".join(reqs))
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    ids = [
        doc["id"]
        for doc in (orjson.loads(part[part.index(b"{") :]) for part in data.split(b"HTTP/1.1 ")[1:-1])
    ]
    assert ids == [f"p{i}" for i in range(5)]
    assert data.count(b"HTTP/1.1 200 OK") == 6


def test_sixteen_concurrent_clients_with_batching(tmp_path: Path, packages: dict[str, Path]) -> None:
    # A queue delay makes requests meet in batches for sure, so the test proves
    # that batched answers go back to the right clients.
    extra = {"runtime": {"max_queue_delay_ms": 2.0, "max_batch_size": 32}}
    with running_agent(tmp_path, packages["affine1"], extra=extra) as agent:
        errors: list[str] = []

        def client(k: int) -> None:
            rng = np.random.default_rng(k)
            for i in range(40):
                rows = rng.standard_normal((1 + (i + k) % 3, 4)).astype(np.float32)
                status, doc = infer(agent, "affine", x_input(rows) | {"id": f"{k}-{i}"})
                want = rows * 2 + 1
                if status != 200 or doc["id"] != f"{k}-{i}":
                    errors.append(f"{status} {doc}")
                    continue
                got = np.array(doc["outputs"][0]["data"], np.float32).reshape(want.shape)
                if not np.array_equal(got, want):
                    errors.append(f"client {k} request {i}: wrong answer")

        threads = [threading.Thread(target=client, args=(k,)) for k in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        metrics = agent.request("GET", "/metrics")[2].decode()
        # Some onnxruntime call carried more than one request.
        single = [
            line for line in metrics.splitlines() if line.startswith('outpost_batch_requests_bucket{le="1.0"')
        ]
        count = [line for line in metrics.splitlines() if line.startswith("outpost_batch_requests_count")]
        assert float(single[0].split()[-1]) < float(count[0].split()[-1])
        status = agent.json("GET", "/v1/status")[1]
        assert "bit-exact" in status["models"][0]["versions"][0]["batching"]


def test_status_metrics_and_cli(agent: AgentProcess) -> None:
    status, doc = agent.json("GET", "/v1/status")
    assert status == 200
    assert doc["device_id"] == "test-device"
    assert doc["ready"] is True
    names = {m["name"] for m in doc["models"]}
    assert names == {"affine", "typed"}
    out = agent.cli("status").stdout
    assert "model affine: default version 2" in out
    raw = json.loads(agent.cli("status", "--json").stdout)
    assert raw["group"] == "test"
    metrics = agent.request("GET", "/metrics")
    assert metrics[0] == 200
    assert metrics[1]["content-type"].startswith("text/plain")
    assert b'outpost_inference_requests_total{model="affine",version="2"}' in metrics[2]
    assert b"outpost_inference_duration_seconds_bucket" in metrics[2]


def test_head_and_keep_alive(agent: AgentProcess) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(agent.socket)
        s.sendall(b"HEAD /v2 HTTP/1.1\r\nHost: x\r\n\r\n")
        head = s.recv(65536)
        assert head.startswith(b"HTTP/1.1 200")
        assert head.endswith(b"\r\n\r\n")  # headers only
        s.sendall(b"GET /v2 HTTP/1.1\r\nHost: x\r\n\r\n")  # same connection still open
        assert s.recv(65536).startswith(b"HTTP/1.1 200")


def test_socket_mode_is_0660(agent: AgentProcess) -> None:
    assert stat.S_IMODE(os.stat(agent.socket).st_mode) == 0o660
