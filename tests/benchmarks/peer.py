"""The peer: the small web app a competent user would write instead of running Outpost.

Starlette on uvicorn with its fast parts (httptools, uvloop), one onnxruntime session per model
loaded once at start with default options, Open Inference Protocol v2 JSON on a Unix socket.
Written plainly, the way the Starlette and onnxruntime documentation show it: stdlib JSON via
`request.json()` / `JSONResponse`, `np.asarray(data, dtype).reshape(shape)` in, `.tolist()` out,
one worker process (uvicorn's default). The access log is off, as a user measuring it would
turn it off.

Where the model runs is the one choice a user has to make, so both are here:
- `--mode async` (default): `session.run` directly in the `async` handler, blocking the event
  loop for the model's duration. The faster of the two for small models (no thread hand-off),
  so it is the peer the targets are measured against.
- `--mode threadpool`: the handler awaits `run_in_threadpool(session.run, ...)`, what the
  Starlette and FastAPI documentation recommend for blocking calls (a plain `def` endpoint does
  the same).

    python -m tests.benchmarks.peer --socket PATH --package DIR [--package DIR ...] [--mode M]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

DTYPES = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32}
DATATYPE_OF = {np.dtype(v): k for k, v in DTYPES.items()}


class Model:
    def __init__(self, package: Path) -> None:
        manifest = json.loads((package / "manifest.json").read_text())
        self.name = manifest["name"]
        self.version = str(manifest["version"])
        self.session = ort.InferenceSession(
            str(package / manifest["model"]["file"]), providers=["CPUExecutionProvider"]
        )
        self.output_names = [o.name for o in self.session.get_outputs()]


def make_app(packages: list[Path], mode: str = "async") -> Starlette:
    models = {m.name: m for m in (Model(p) for p in packages)}

    async def ready(request: Request) -> Response:
        return Response(status_code=200)

    async def infer(request: Request) -> Response:
        model = models.get(request.path_params["name"])
        if model is None:
            return JSONResponse({"error": "unknown model"}, status_code=404)
        try:
            body: dict[str, Any] = await request.json()
            feeds = {
                t["name"]: np.asarray(t["data"], dtype=DTYPES[t["datatype"]]).reshape(t["shape"])
                for t in body["inputs"]
            }
        except (ValueError, KeyError, TypeError) as exc:
            return JSONResponse({"error": f"bad request: {exc}"}, status_code=400)
        if mode == "threadpool":
            results = await run_in_threadpool(model.session.run, None, feeds)
        else:
            results = model.session.run(None, feeds)
        outputs = [
            {
                "name": name,
                "datatype": DATATYPE_OF[value.dtype],
                "shape": list(value.shape),
                "data": value.ravel().tolist(),
            }
            for name, value in zip(model.output_names, results, strict=True)
        ]
        return JSONResponse({
            "model_name": model.name,
            "model_version": model.version,
            "id": body.get("id", ""),
            "outputs": outputs,
        })

    return Starlette(routes=[
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route("/v2/models/{name}/infer", infer, methods=["POST"]),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True)
    parser.add_argument("--package", type=Path, action="append", required=True)
    parser.add_argument("--mode", choices=("async", "threadpool"), default="async")
    args = parser.parse_args()
    uvicorn.run(
        make_app(args.package, args.mode), uds=args.socket, loop="uvloop", http="httptools",
        access_log=False, log_level="warning",
    )


if __name__ == "__main__":
    main()
