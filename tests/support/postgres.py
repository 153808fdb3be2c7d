"""A private PostgreSQL for the test session: its own cluster in a temp dir, on a free loopback port.

    server = PostgresServer.start_private()   # initdb + pg_ctl start; raises PostgresUnavailable
    url = server.fresh_url()                  # a fresh, empty schema; its SQLAlchemy URL
    server.discard(url)
    server.stop()                             # pg_ctl stop -m immediate, temp dir removed

`PostgresServer.external(url)` uses a database someone else runs instead (OUTPOST_TEST_DATABASE_URL;
the user needs CREATE on it): each test still gets a schema of its own, dropped afterwards.

The cluster is for tests only: fsync, full_page_writes and synchronous_commit are off (a crash
loses it, which is fine), it listens on 127.0.0.1 only, with a random password (SCRAM) over TCP,
and its Unix socket is in the temp dir, which only the server's user can enter. initdb and the
server refuse to run as root, so as root both run as the `postgres` system user (Debian's
postgresql package creates it) through runuser, and the temp dir is given to that user.

A test gets a schema of its own in one database, `outpost_test`, reached through a URL whose
connections have only that schema on their search_path: about 10 ms to make, where CREATE
DATABASE took 40 ms at first and 250 ms once a few dozen existed (its WAL and checkpoints).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

DRIVER = "postgresql+psycopg"
START_TIMEOUT_S = 30.0
SERVICE_USER = "postgres"  # the system user Debian's postgresql package creates


class PostgresUnavailable(Exception):
    """PostgreSQL cannot be run here; the message says why and what to install."""


def find_bindir() -> Path | None:
    """Where initdb, pg_ctl and postgres are: OUTPOST_PG_BINDIR, PATH, or Debian's newest
    /usr/lib/postgresql/<major>/bin (not on PATH there)."""
    configured = os.environ.get("OUTPOST_PG_BINDIR")
    if configured:
        return Path(configured) if (Path(configured) / "initdb").is_file() else None
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    found = []
    for initdb in Path("/usr/lib/postgresql").glob("*/bin/initdb"):
        major = initdb.parent.parent.name
        if major.isdigit():
            found.append((int(major), initdb.parent))
    return max(found)[1] if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """An admin connection to a PostgreSQL database that hands out a fresh schema per test."""

    def __init__(self, url: str, cluster: _Cluster | None = None) -> None:
        self.base_url = make_url(url).set(drivername=DRIVER)
        # AUTOCOMMIT: each DDL statement stands alone.
        self._engine = create_engine(self.base_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
        self._cluster = cluster
        self._names = itertools.count(1)
        self._prefix = f"t{os.getpid()}_"

    @classmethod
    def start_private(cls) -> PostgresServer:
        cluster = _Cluster.start()
        try:
            server = cls(cluster.url("postgres"))
            server.execute("CREATE DATABASE outpost_test")
        except BaseException:
            cluster.stop()
            raise
        server.stop()
        return cls(cluster.url("outpost_test"), cluster)

    @classmethod
    def external(cls, url: str) -> PostgresServer:
        server = cls(url)
        try:
            server.execute("SELECT 1")
        except Exception as exc:
            raise PostgresUnavailable(f"OUTPOST_TEST_DATABASE_URL: cannot connect: {exc}") from exc
        return server

    def execute(self, sql: str) -> None:
        with self._engine.connect() as conn:
            conn.execute(text(sql))

    def fresh_url(self) -> str:
        """The URL of a new, empty schema: every connection made with it has only that schema
        on its search_path, so what a test creates is its own (sequences and indexes too)."""
        name = f"{self._prefix}{next(self._names)}"
        self.execute(f'CREATE SCHEMA "{name}"')
        url = self.base_url.update_query_dict({"options": f"-csearch_path={name}"})
        return url.render_as_string(hide_password=False)

    def discard(self, url: str) -> None:
        """Drop a schema made by `fresh_url` on an external server; a private cluster's go
        with it at the end of the session."""
        if self._cluster is not None:
            return
        options = make_url(url).query.get("options", "")
        assert isinstance(options, str) and options.startswith("-csearch_path=")
        self.execute(f'DROP SCHEMA IF EXISTS "{_ident(options.removeprefix("-csearch_path="))}" CASCADE')

    def stop(self) -> None:
        self._engine.dispose()
        if self._cluster is not None:
            self._cluster.stop()

    def halt(self) -> None:
        """Stop a private cluster's server, keeping its data: a database outage in a test."""
        assert self._cluster is not None, "only a private cluster can be halted"
        self._engine.dispose()
        self._cluster.halt()

    def resume(self) -> None:
        """Start a halted private cluster again, on the same port."""
        assert self._cluster is not None, "only a private cluster can be resumed"
        self._cluster.resume()


def _ident(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_]+", name):
        raise ValueError(f"not a plain database name: {name!r}")
    return name


class _Cluster:
    """initdb'd data directory plus a running postmaster, both in one temp dir."""

    def __init__(self, bindir: Path, base: Path, password: str) -> None:
        self.bindir = bindir
        self.base = base
        self.data = base / "data"
        self.password = password
        self.port = 0
        self.as_service_user = os.geteuid() == 0

    @classmethod
    def start(cls) -> _Cluster:
        bindir = find_bindir()
        if bindir is None:
            raise PostgresUnavailable(
                "PostgreSQL is not installed (no initdb on PATH or in /usr/lib/postgresql/*/bin): "
                "`make sysdeps` or `apt-get install postgresql` (OUTPOST_PG_BINDIR names another bin dir)"
            )
        try:
            import psycopg  # noqa: F401
        except ImportError as exc:
            raise PostgresUnavailable("psycopg is not installed: pip install -e '.[hub,dev]'") from exc
        if os.geteuid() == 0:
            try:
                pwd.getpwnam(SERVICE_USER)
            except KeyError as exc:
                raise PostgresUnavailable(
                    f"running as root, and initdb refuses root: no {SERVICE_USER!r} user to run it as "
                    "(apt-get install postgresql creates it)"
                ) from exc
        # /tmp itself, not pytest's tmp dirs: those are root-only (0700), and the socket path must
        # stay under the 107 bytes a Unix socket address allows.
        base = Path(tempfile.mkdtemp(prefix="outpost-pg-"))
        cluster = cls(bindir, base, secrets.token_hex(16))
        try:
            cluster._initdb()
            cluster._run_server()
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def url(self, database: str) -> str:
        return f"{DRIVER}://postgres:{self.password}@127.0.0.1:{self.port}/{database}"

    def _cmd(self, *args: str) -> list[str]:
        return ["runuser", "-u", SERVICE_USER, "--", *args] if self.as_service_user else list(args)

    def _run(self, *args: str, timeout: float = START_TIMEOUT_S) -> None:
        done = subprocess.run(
            self._cmd(*args), capture_output=True, text=True, timeout=timeout, cwd=self.base
        )
        if done.returncode != 0:
            raise PostgresUnavailable(
                f"{Path(args[0]).name} failed ({done.returncode}): {done.stderr.strip()}"
            )

    def _initdb(self) -> None:
        pwfile = self.base / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self.as_service_user:
            entry = pwd.getpwnam(SERVICE_USER)
            for path in (self.base, pwfile):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        pwfile.chmod(0o600)
        self._run(
            str(self.bindir / "initdb"),
            "-D", str(self.data),
            "-U", "postgres",
            f"--pwfile={pwfile}",
            "--auth-host=scram-sha-256",
            "--auth-local=peer",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        )  # fmt: skip
        pwfile.unlink()

    def _run_server(self) -> None:
        log = self.base / "server.log"
        for attempt in range(3):  # a free port can be taken between choosing it and binding it
            self.port = _free_port()
            try:
                self._start(log)
                return
            except PostgresUnavailable:
                if attempt == 2:
                    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                    raise PostgresUnavailable(f"the test PostgreSQL did not start: {tail}") from None
                time.sleep(0.2)

    def _start(self, log: Path) -> None:
        options = " ".join(
            [
                f"-p {self.port}",
                "-c listen_addresses=127.0.0.1",
                f"-c unix_socket_directories={self.base}",
                "-c fsync=off",
                "-c full_page_writes=off",
                "-c synchronous_commit=off",
                "-c max_connections=200",
                "-c shared_buffers=32MB",
            ]
        )
        self._run(str(self.bindir / "pg_ctl"), "start", "-w", "-D", str(self.data), "-l", str(log),
                  "-o", options)  # fmt: skip

    def halt(self) -> None:
        self._run(str(self.bindir / "pg_ctl"), "stop", "-m", "fast", "-w", "-D", str(self.data))

    def resume(self) -> None:
        self._start(self.base / "server.log")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(Exception):
                self._run(str(self.bindir / "pg_ctl"), "stop", "-m", "immediate", "-w", "-D", str(self.data))
        shutil.rmtree(self.base, ignore_errors=True)


@contextlib.contextmanager
def private_server() -> Iterator[PostgresServer]:
    server = PostgresServer.start_private()
    try:
        yield server
    finally:
        server.stop()
