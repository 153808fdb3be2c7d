"""The hub's operator API fuzzed from its own OpenAPI spec (schemathesis), against the real
outpost-hub process over loopback HTTP, with a real Mosquitto behind it.

Two passes over every /api/v1 operation the spec lists:

- with the operator token: no generated request (valid or not) gets a 5xx;
- without a token, or with a wrong one: every answer is 401 (never 2xx, 4xx of another kind
  or 5xx): nothing under /api is read, parsed or acted on before the token is checked.

And pushes of a valid package whose manifest has one value replaced or removed, which reach
the registry's validation (random bytes never get past tarfile): no 5xx either.

The 5xx passes run on SQLite and on PostgreSQL (`-m "not postgres"` leaves it out); the
token pass on SQLite only. The hub is a throwaway, seeded with a model (two versions)
deployed to a group and a rollout, so deploys, rollbacks, rollouts, captures and deletes
reach past "not found". Bounded and reproducible:
few examples per operation, derandomized (the same cases on every run), a per-request timeout
so a streaming answer (the capture export) cannot hang the run.
"""

from __future__ import annotations

import copy
import io
import json
import os
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from tests.conftest import BACKENDS
from tests.support.broker import Mosquitto, mosquitto_available
from tests.support.hubproc import HubProcess
from tests.support.packages import affine_package
from tests.support.postgres import PostgresServer

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed"),
]

# Per operation and pass; OUTPOST_FUZZ_EXAMPLES=500 digs deeper by hand.
MAX_EXAMPLES = int(os.environ.get("OUTPOST_FUZZ_EXAMPLES", "25"))
REQUEST_TIMEOUT_S = 15.0
FUZZ = settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
    phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure costs no more time than a pass
)


# A push's body is a tar archive (application/x-tar in the spec): sent as the bytes generated.
schemathesis.serializer.alias("application/x-tar", "application/octet-stream")


def tar_of(directory: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name in ("manifest.json", "model.onnx"):
            tar.add(directory / name, arcname=name)
    return buffer.getvalue()


@pytest.fixture(scope="module", params=BACKENDS)
def fuzz_hub(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HubProcess]:
    """The hub on SQLite, then on PostgreSQL (whose INTEGER is 32-bit: other overflows)."""
    database_url = ""
    if request.param == "postgresql":
        postgres: PostgresServer = request.getfixturevalue("postgres")
        database_url = postgres.fresh_url()
    root = tmp_path_factory.mktemp("fuzz")
    broker = Mosquitto(root / "broker").start()
    # No rate limits: thousands of requests from one address and token would be 429s.
    settings = {"api_rate_per_s": 0.0, "anon_rate_per_s": 0.0}
    hub = HubProcess(root / "hub", settings=settings, database_url=database_url)
    hub.start(mqtt_url=broker.url)
    try:
        for version in (1, 2):
            package = tar_of(affine_package(root / f"affine-{version}", version=version))
            answer = hub.api("POST", "/api/v1/models/affine/versions", data=package)
            assert answer.status_code == 201, answer.text
        answer = hub.api("PUT", "/api/v1/groups/lab/deployment", json={"model": "affine", "stable": 1})
        assert answer.status_code == 200, answer.text
        rollout = {"model": "affine", "candidate": 2, "group": "lab"}
        answer = hub.api("POST", "/api/v1/rollouts", json=rollout)
        assert answer.status_code == 201, answer.text
        yield hub
    finally:
        hub.kill()
        broker.kill()


# Path parameters that name what the seeded hub has, so that cases get past "not found".
SEEDED: dict[str, Any] = {"name": "affine", "model": "affine", "group": "lab", "device_id": "dev-1"}
SEEDED_IDS: dict[str, Any] = {"version": 1, "rollout_id": 1}


@pytest.fixture(scope="module")
def operations(fuzz_hub: HubProcess) -> list[Any]:
    schema = schemathesis.openapi.from_url(fuzz_hub.url + "/openapi.json")
    found = [result.ok() for result in schema.get_all_operations()]
    api = [op for op in found if op.path.startswith("/api/")]
    assert len(api) >= 30, [op.label for op in api]  # the spec lists the whole API
    return api


def cases(operation: Any) -> st.SearchStrategy[schemathesis.Case]:
    """Valid and invalid requests, with path parameters generated, or naming the seeded
    model, group and device (ids generated), or those and the seeded ids."""
    names = {p.name for p in operation.path_parameters}
    strategies = [operation.as_strategy(mode) for mode in GenerationMode]
    for seeded in ({**SEEDED}, {**SEEDED, **SEEDED_IDS}):
        given = {k: v for k, v in seeded.items() if k in names}
        if given:
            strategies += [operation.as_strategy(mode, path_parameters=given) for mode in GenerationMode]
    return st.one_of(strategies)


Check = Callable[[schemathesis.Case, Counter[int]], str | None]


def fuzz_one(operation: Any, check: Check) -> tuple[list[str], Counter[int]]:
    found: list[str] = []
    statuses: Counter[int] = Counter()

    @FUZZ
    @given(case=cases(operation))
    def run(case: schemathesis.Case) -> None:
        problem = check(case, statuses)
        if problem is not None and len(found) < 3:
            found.append(problem)

    run()
    return found, statuses


def fuzz(operations: list[Any], check: Check) -> None:
    """Runs `check` on generated cases of every operation; fails listing the problems found
    (three per operation at most). The answers' status codes per operation are printed
    (`pytest -s` shows them) to see how deep the cases reach."""
    problems: list[str] = []
    for operation in operations:
        found, statuses = fuzz_one(operation, check)
        print(f"{operation.method.upper():6} {operation.path}: {dict(sorted(statuses.items()))}")
        problems += found
    assert not problems, "\n\n".join(problems)


@pytest.mark.timeout(600)
def test_no_server_error(operations: list[Any], fuzz_hub: HubProcess) -> None:
    auth = {"Authorization": f"Bearer {fuzz_hub.token}"}

    def check(case: schemathesis.Case, statuses: Counter[int]) -> str | None:
        response = case.call(headers=auth, timeout=REQUEST_TIMEOUT_S)
        statuses[response.status_code] += 1
        if response.status_code < 500:
            return None
        return f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}\n" + (
            case.as_curl_command(headers=auth)
        )

    fuzz(operations, check)
    # An error after the answer started (a streamed export) is no 5xx: the log would show it.
    assert "Traceback" not in fuzz_hub.log(), fuzz_hub.log()[-5000:]


@pytest.mark.timeout(600)
def test_no_access_without_a_token(
    operations: list[Any], fuzz_hub: HubProcess, request: pytest.FixtureRequest
) -> None:
    if request.node.callspec.params["fuzz_hub"] == "postgresql":
        pytest.skip("one backend is enough: the token is checked before any request reaches a route")

    def check(case: schemathesis.Case, statuses: Counter[int]) -> str | None:
        for auth in ({}, {"Authorization": "Bearer not-a-token"}):
            response = case.call(headers=auth, timeout=REQUEST_TIMEOUT_S)
            statuses[response.status_code] += 1
            if response.status_code != 401:
                answer = f"{response.status_code}: {response.text[:300]}"
                return f"{case.method} {case.formatted_path} {auth} -> {answer}"
        return None

    fuzz(operations, check)


def manifest_paths(doc: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every key path into a JSON document."""
    if prefix:
        yield prefix
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for key, value in items:
        yield from manifest_paths(value, (*prefix, key))


def json_containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    json_containers,
    max_leaves=5,
)


@pytest.mark.timeout(600)
def test_no_server_error_for_a_pushed_manifest(fuzz_hub: HubProcess, tmp_path: Path) -> None:
    """The spec says only "a tar": random bytes never get past tarfile. Here a valid package's
    manifest has one value replaced by any JSON value (or one key removed), so the registry's
    validation sees every field go wrong."""
    package = affine_package(tmp_path / "affine", version=3)
    manifest = json.loads((package / "manifest.json").read_text())
    model = (package / "model.onnx").read_bytes()
    paths = list(manifest_paths(manifest))
    statuses: Counter[int] = Counter()

    @settings(FUZZ, max_examples=4 * MAX_EXAMPLES)
    @given(path=st.sampled_from(paths), value=JSON_VALUES, remove=st.booleans())
    def push(path: tuple[Any, ...], value: Any, remove: bool) -> None:
        doc = copy.deepcopy(manifest)
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        if remove and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
        answer = fuzz_hub.api("POST", "/api/v1/models/affine/versions", data=tar_bytes(doc, model))
        statuses[answer.status_code] += 1
        assert answer.status_code < 500, f"{path} = {value!r} (removed: {remove}): {answer.text[:300]}"

    push()
    print(f"pushed manifests: {dict(sorted(statuses.items()))}")


def tar_bytes(manifest: dict[str, Any], model: bytes) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in (("manifest.json", json.dumps(manifest).encode()), ("model.onnx", model)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()
