"""The one-writer lock around every mutating signing operation.

    FileLock        flock(2) on `<repo>/.lock`: processes sharing one directory (one host, or a
                    shared filesystem), and the threads of one process
    AdvisoryLock    a PostgreSQL advisory lock held on a dedicated connection, around a
                    FileLock: hub processes on different hosts sharing one database

A lock is a context manager (`with lock.hold(): ...`) plus `check()`, which raises
SigningLockError unless the lock is still held; a signer calls it just before publishing, so a
process whose database connection died (and with it the advisory lock, which PostgreSQL frees
with the session) never publishes what it signed while another process may hold the lock.

Order: the FileLock first, then the advisory lock, so the threads of one process queue on the
flock and at most one connection per directory waits in PostgreSQL.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from hub.errors import SigningError, SigningLockError

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine

# How long a signer waits for another process's signing operation (a push signs in well under
# a second; a slow publish of a large package to the object store may take longer).
ADVISORY_WAIT_S = 120.0


class SigningLock(Protocol):
    def hold(self) -> AbstractContextManager[None]:
        """Hold the lock for the block (blocking until it is free)."""
        ...

    def check(self) -> None:
        """Raise SigningLockError unless the lock is still held (call it inside `hold()`)."""
        ...


class FileLock:
    """flock(2) on one file: across the processes that open it and the threads of one."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @contextmanager
    def hold(self) -> Iterator[None]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise SigningError(f"cannot open the repository lock {self.path}: {exc}") from exc
        try:
            # flock locks belong to the open file description: a second open() by another
            # thread of this process waits just like another process does.
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def check(self) -> None:
        """A flock cannot be lost while its descriptor is open."""


def advisory_key(name: str) -> int:
    """A signed 64-bit advisory-lock key for `name` (the repository's identity: its bucket and
    prefix), so different repositories on one database never wait for each other."""
    digest = hashlib.sha256(b"outpost-tuf-signing:" + name.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class AdvisoryLock:
    """`pg_advisory_lock(key)` on a connection of its own, inside a FileLock on `path`."""

    def __init__(self, engine: Engine, name: str, path: Path, *, wait_s: float = ADVISORY_WAIT_S) -> None:
        self._engine = engine
        self.name = name
        self.key = advisory_key(name)
        self._local = FileLock(path)
        self._wait_ms = max(1, int(wait_s * 1000))
        self._conn: Connection | None = None

    @contextmanager
    def hold(self) -> Iterator[None]:
        from sqlalchemy import exc as sa_exc
        from sqlalchemy import text

        with self._local.hold():
            try:
                conn = self._engine.connect()
            except sa_exc.SQLAlchemyError as exc:
                raise self._error("cannot connect to take", exc) from exc
            try:
                try:
                    # A session lock (not a transaction's): the connection stays out of any
                    # transaction while signing, and lock_timeout bounds the wait.
                    timeout = {"ms": str(self._wait_ms)}
                    conn.execute(text("SELECT set_config('lock_timeout', :ms, false)"), timeout)
                    conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": self.key})
                    conn.commit()
                except sa_exc.SQLAlchemyError as exc:
                    # Not back to the pool with this session's lock_timeout (or a dead socket).
                    conn.invalidate()
                    raise self._error("cannot take", exc) from exc
                self._conn = conn
                try:
                    yield
                finally:
                    self._conn = None
                    try:
                        conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
                        conn.execute(text("SELECT set_config('lock_timeout', '0', false)"))
                        conn.commit()
                    except sa_exc.SQLAlchemyError:
                        # The session is gone, and PostgreSQL freed its locks with it; the
                        # connection is discarded below rather than returned to the pool.
                        conn.invalidate()
            finally:
                conn.close()

    def check(self) -> None:
        """One round trip on the lock's connection: while the session lives, so does its lock."""
        from sqlalchemy import exc as sa_exc
        from sqlalchemy import text

        conn = self._conn
        if conn is None:
            raise SigningLockError("the signing lock is not held (a bug: check() outside hold())")
        try:
            held = conn.execute(
                text(
                    # A bigint key shows as classid (high 32 bits) and objid (low), objsubid 1.
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                    "AND pid = pg_backend_pid() AND objsubid = 1 "
                    "AND objid::bigint = (CAST(:k AS bigint) & 4294967295) "
                    "AND classid::bigint = ((CAST(:k AS bigint) >> 32) & 4294967295)"
                ),
                {"k": self.key},
            ).scalar_one()
            conn.commit()
        except sa_exc.SQLAlchemyError as exc:
            raise self._error("lost", exc) from exc
        if not held:
            raise SigningLockError(
                f"the signing lock of {self.name} is no longer held by this process; "
                "nothing was published: retry"
            )

    def _error(self, doing: str, exc: Exception) -> SigningLockError:
        return SigningLockError(
            f"{doing} the signing lock of {self.name} in the database ({exc.__class__.__name__}: "
            f"{getattr(exc, 'orig', None) or exc}); nothing was signed or published: retry when "
            "the database is reachable"
        )
