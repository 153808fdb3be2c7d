"""The probe: the leanest correct OIP server, as a reference for what the agent could reach.

What issue 3 describes as the 60-line probe: an asyncio protocol with httptools parsing and
orjson, answering every request that arrived in one loop iteration with one onnxruntime call.
No validation, no routing beyond the infer path, no metrics, no error handling worth the name:
it is not a server anyone should run, only a measure of how much the agent's extra work
(checks, routing, batching rules, metrics, pipelining order, limits) costs. Health answers 200.

    python -m tests.benchmarks.probe --socket PATH --package DIR [--package DIR ...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path
from typing import Any

import httptools
import numpy as np
import onnxruntime as ort
import orjson
import uvloop

DTYPES = {"FP32": np.float32, "INT64": np.int64}
OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"


class Model:
    def __init__(self, directory: Path) -> None:
        manifest = json.loads((directory / "manifest.json").read_text())
        self.name = manifest["name"]
        self.version = str(manifest["version"])
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(directory / "model.onnx"), so)
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.queue: list[tuple[Conn, np.ndarray, str]] = []

    def run(self) -> None:
        queue, self.queue = self.queue, []
        rows = [x for _, x, _ in queue]
        results = self.session.run(None, {"input": np.concatenate(rows)})
        start = 0
        for (conn, _, rid), n in zip(queue, (len(r) for r in rows), strict=True):
            outs = [{"name": name, "datatype": "FP32" if r.dtype == np.float32 else "INT64",
                     "shape": [n, *r.shape[1:]], "data": r[start:start + n].reshape(-1)}
                    for name, r in zip(self.outputs, results, strict=True)]
            body = orjson.dumps({"model_name": self.name, "model_version": self.version, "id": rid,
                                 "outputs": outs}, option=orjson.OPT_SERIALIZE_NUMPY)
            conn.transport.write(OK % len(body) + body)
            start += n


class Conn(asyncio.Protocol):
    def __init__(self, models: dict[str, Model]) -> None:
        self.models = models
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body: list[bytes] = []

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body, self.body = b"".join(self.body), []
        if not self.url.endswith(b"/infer"):
            self.transport.write(OK % 2 + b"{}")
            return
        model = self.models[self.url.split(b"/")[3].decode()]
        doc = orjson.loads(body)
        item = doc["inputs"][0]
        x = np.asarray(item["data"], DTYPES[item["datatype"]]).reshape(item["shape"])
        if not model.queue:
            asyncio.get_running_loop().call_soon(model.run)
        model.queue.append((self, x, doc.get("id", "")))


async def serve(socket: str, packages: list[Path]) -> None:
    models = {m.name: m for m in (Model(p) for p in packages)}
    if os.path.exists(socket):
        os.unlink(socket)
    server = await asyncio.get_running_loop().create_unix_server(lambda: Conn(models), socket)
    await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--socket", required=True)
    parser.add_argument("--package", action="append", type=Path, default=[])
    args = parser.parse_args()
    uvloop.run(serve(args.socket, args.package))


if __name__ == "__main__":
    main()
