"""Regression tests for the 5xx answers the OpenAPI fuzzer (tests/hub/test_api_fuzz.py) found,
on the real hub process: integers too large for the database's columns in paths, queries and
bodies, and a pushed manifest's version, were an OverflowError (SQLite) or NumericValueOutOfRange
(PostgreSQL) and a 500; they are now refused with 422 before any SQL (hub.api.params,
hub.registry.validate)."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BACKENDS
from tests.support.hubproc import HubProcess
from tests.support.packages import affine_package
from tests.support.postgres import PostgresServer

pytestmark = pytest.mark.e2e

HUGE = 165780289307054735360  # > 2**63
INT32 = 2**31  # one past PostgreSQL's INTEGER


@pytest.fixture(scope="module", params=BACKENDS)
def hub(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    """The hub on SQLite, then on PostgreSQL (32-bit INTEGER, no NUL in text)."""
    database_url = ""
    if request.param == "postgresql":
        postgres: PostgresServer = request.getfixturevalue("postgres")
        database_url = postgres.fresh_url()
    process = HubProcess(tmp_path_factory.mktemp("bounds") / "data", database_url=database_url).start()
    yield process
    process.kill()


CASES: list[Any] = [
    pytest.param("GET", f"/api/v1/rollouts/{HUGE}", None, id="rollout-id-huge"),
    pytest.param("GET", f"/api/v1/rollouts/-{HUGE}", None, id="rollout-id-negative-huge"),
    pytest.param("GET", f"/api/v1/rollouts/{INT32}", None, id="rollout-id-int32"),
    pytest.param("POST", f"/api/v1/rollouts/{HUGE}/pause", None, id="rollout-pause"),
    pytest.param("POST", f"/api/v1/rollouts/{HUGE}/abort", None, id="rollout-abort"),
    pytest.param(
        "POST", "/api/v1/rollouts", {"model": "m", "group": "g", "candidate": HUGE}, id="rollout-candidate"
    ),
    pytest.param(
        "POST",
        "/api/v1/rollouts",
        {"model": "m", "group": "g", "candidate": 2, "min_requests": 2**63},
        id="rollout-min-requests",
    ),
    pytest.param("GET", f"/api/v1/fleet/alerts?version={HUGE}", None, id="alerts-version"),
    pytest.param("GET", f"/api/v1/fleet/summary?model=m&version={HUGE}", None, id="summary-version"),
    pytest.param("GET", f"/api/v1/fleet/drift?model=m&version={INT32}", None, id="drift-version"),
    pytest.param("GET", f"/api/v1/models/m/versions/{HUGE}", None, id="model-version"),
    pytest.param("DELETE", f"/api/v1/models/m/versions/{INT32}", None, id="delete-version"),
    pytest.param("PUT", "/api/v1/groups/g/deployment", {"model": "m", "stable": INT32}, id="deploy-stable"),
    pytest.param(
        "PUT",
        "/api/v1/groups/g/deployment",
        {"model": "m", "stable": 1, "candidate": HUGE},
        id="deploy-candidate",
    ),
    pytest.param("GET", f"/api/v1/capture/m/{-HUGE}/export?limit=1", None, id="capture-version"),
    pytest.param("GET", f"/api/v1/capture/m/1/export?limit={2**63}", None, id="capture-limit"),
]


@pytest.mark.parametrize(("method", "path", "body"), CASES)
def test_out_of_range_integers_are_422(hub: HubProcess, method: str, path: str, body: Any) -> None:
    answer = hub.api(method, path, json=body)
    assert answer.status_code == 422, answer.text
    assert "less than or equal" in answer.text or "greater than or equal" in answer.text


def test_dashboard_version_out_of_range_is_422(hub: HubProcess) -> None:
    answer = hub.api("GET", f"/drift/m/{HUGE}", auth=False, allow_redirects=False)
    assert answer.status_code == 422


def test_a_package_version_over_the_database_range_is_422(hub: HubProcess, tmp_path: Path) -> None:
    """A manifest's version past PostgreSQL's INTEGER was a 500 at the INSERT (SQLite: past 2**63)."""
    package = affine_package(tmp_path / "affine", version=2**70)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name in ("manifest.json", "model.onnx"):
            tar.add(package / name, arcname=name)
    answer = hub.api("POST", "/api/v1/models/affine/versions", data=buffer.getvalue())
    assert answer.status_code == 422, answer.text
    assert "over the largest the hub keeps" in answer.json()["detail"]


NUL_CASES = [
    "/api/v1/fleet?group=a%00b",
    "/api/v1/fleet/a%00b",
    "/api/v1/fleet/summary?model=a%00",
    "/api/v1/fleet/alerts?device=a%00",
    "/api/v1/capture?model=a%00",
    "/api/v1/models/a%00",
    "/api/v1/groups/a%00",
    "/api/v1/rollouts?group=a%00",
    "/api/v1/experiments?group=a%00",
    "/api/v1/alerting/deliveries?webhook=a%00",
]


@pytest.mark.parametrize("path", NUL_CASES)
def test_a_nul_character_is_not_a_500(hub: HubProcess, path: str, request: pytest.FixtureRequest) -> None:
    """PostgreSQL's text cannot hold NUL: psycopg's DataError was a 500 (found by the fuzzer on
    PostgreSQL); now a 400 on any query (hub.registry.db). SQLite stores and finds NUL."""
    answer = hub.api("GET", path)
    assert answer.status_code < 500, answer.text
    if request.node.callspec.params["hub"] == "postgresql":
        assert answer.status_code == 400
        assert "NUL" in answer.json()["detail"]
