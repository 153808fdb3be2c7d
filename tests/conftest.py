"""Fixtures every test package may use: the hub's databases on SQLite and on PostgreSQL.

`database_url` is parametrized: a test (or fixture) that asks for it runs twice, once on a fresh
SQLite file and once on a fresh PostgreSQL schema (ids `[sqlite]`, `[postgresql]`; the second
also carries the `postgres` marker, so `-m "not postgres"` leaves it out). Both are empty: the
test makes its tables as it would on SQLite.

PostgreSQL is a private cluster started once per session (tests/support/postgres.py), or, when
OUTPOST_TEST_DATABASE_URL=postgresql+psycopg://user:pw@host/db is set, that server (the user
needs CREATE on that database). Where neither is possible the PostgreSQL cases are skipped, saying why.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # imported when a test asks for PostgreSQL: agent-only runs need no SQLAlchemy
    from tests.support.postgres import PostgresServer

BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


def pytest_sessionstart(session: pytest.Session) -> None:
    """Refuse to test compiled modules older than their source: Python would import the extension
    (setup.py builds the agent's request path with mypyc), and the edit would go untested."""
    from agent.buildinfo import stale_extensions

    stale = stale_extensions(Path(__file__).resolve().parent.parent / "agent")
    if stale:
        names = ", ".join(str(p.relative_to(Path.cwd())) if p.is_relative_to(Path.cwd()) else str(p)
                          for p in stale)
        pytest.exit(f"changed since they were compiled: {names}; run `make compiled` "
                    "(or delete agent/**/*.so to test them as plain Python)", returncode=4)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    from tests.support.postgres import PostgresServer, PostgresUnavailable

    external = os.environ.get("OUTPOST_TEST_DATABASE_URL", "")
    try:
        server = PostgresServer.external(external) if external else PostgresServer.start_private()
    except PostgresUnavailable as exc:
        pytest.skip(f"no PostgreSQL for the tests: {exc}")
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres: PostgresServer) -> Iterator[str]:
    """A fresh, empty PostgreSQL schema for this test (alone on its search_path)."""
    url = postgres.fresh_url()
    yield url
    postgres.discard(url)


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty hub database: SQLite, then PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'hub.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url
