"""The registry's database: SQLAlchemy 2.0 typed tables and the `Database` handle.

Tables (the schema; hub.migrations makes and upgrades it, `create_all` is for tests and tools):

    models          id, name UNIQUE, last_version (highest version ever accepted), created
    model_versions  id, model_id -> models, version, manifest (JSON text as uploaded),
                    manifest_sha256, manifest_size, model_sha256, model_size, created;
                    UNIQUE(model_id, version)
    groups          id, name UNIQUE, created
    deployments     id (AUTOINCREMENT: the assignment's serial, never reused), group_id -> groups,
                    model_id -> models, stable_version, candidate_version NULL, percent 0..100,
                    salt, previous_stable NULL, metadata_version NULL, created, created_by,
                    experiment NULL (canonical JSON: {"mode": "ab", "weight": W} or
                    {"mode": "shadow", "sample": S}; see hub.registry.deployments),
                    capture NULL (canonical JSON: {"max_rows_per_min": R, "sample_bp": S};
                    see hub.capture)
    tokens          id, name, sha256 UNIQUE, created, revoked NULL; name UNIQUE among the
                    tokens not revoked

Invariants the schema holds on its own: one row per (model, version); percent within 0..100;
a candidate differs from the stable version; at most one live token per name. Deployments are
history: every change is a new row and the group's row with the highest id is current; only
`metadata_version` is written after insert (once the signed metadata exists). Versions in a
deployment are plain integers, not foreign keys, so history outlives deleted versions.

Times are stored as naive UTC (SQLite has no time zones) and come back as aware UTC.

SQLite is the default (`sqlite:///path`): WAL journal (readers never block the writer),
foreign keys on, and write transactions begin with `BEGIN IMMEDIATE` so that two writers
serialize at the start instead of one failing with "database is locked" when it tries to
upgrade its read lock. The same code runs on PostgreSQL; there the service locks the rows
it reads before writing (`SELECT ... FOR UPDATE`).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, cast

from sqlalchemy import (
    CheckConstraint,
    DateTime,
    Engine,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    insert,
    text,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.pool import StaticPool
from sqlalchemy.types import TypeDecorator

from hub.errors import DatabaseUnavailable, InvalidRequestError, RegistryError

# How long a SQLite writer waits for another one before giving up (seconds).
SQLITE_BUSY_TIMEOUT_S = 30.0
_WRITE = "outpost_write"


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, whatever the backend keeps."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the registry database; use UTC")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    pass


class ModelRow(Base):
    __tablename__ = "models"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    # The highest version ever accepted, deleted or not: versions are never reused, so a
    # device that once saw version N never meets a different N.
    last_version: Mapped[int] = mapped_column(Integer, default=0)
    created: Mapped[datetime] = mapped_column(UTCDateTime())


class VersionRow(Base):
    __tablename__ = "model_versions"
    __table_args__ = (
        UniqueConstraint("model_id", "version", name="uq_model_versions_model_version"),
        CheckConstraint("version >= 1", name="ck_model_versions_positive"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    manifest: Mapped[str] = mapped_column(Text)
    manifest_sha256: Mapped[str] = mapped_column(String(64), index=True)
    manifest_size: Mapped[int] = mapped_column(Integer)
    model_sha256: Mapped[str] = mapped_column(String(64), index=True)
    model_size: Mapped[int] = mapped_column(Integer)
    created: Mapped[datetime] = mapped_column(UTCDateTime())


class GroupRow(Base):
    __tablename__ = "groups"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created: Mapped[datetime] = mapped_column(UTCDateTime())


class DeploymentRow(Base):
    __tablename__ = "deployments"
    __table_args__ = (
        CheckConstraint("percent >= 0 AND percent <= 100", name="ck_deployments_percent"),
        CheckConstraint(
            "candidate_version IS NULL OR candidate_version <> stable_version",
            name="ck_deployments_candidate",
        ),
        Index("ix_deployments_group_id_id", "group_id", "id"),
        # AUTOINCREMENT: SQLite would otherwise reuse the highest rowid after a delete, and
        # the id is the serial devices use to refuse an older assignment.
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    group_id: Mapped[int] = mapped_column(ForeignKey("groups.id"))
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), index=True)
    stable_version: Mapped[int] = mapped_column(Integer)
    candidate_version: Mapped[int | None] = mapped_column(Integer)
    percent: Mapped[int] = mapped_column(Integer)
    salt: Mapped[str] = mapped_column(String(128))
    previous_stable: Mapped[int | None] = mapped_column(Integer)
    metadata_version: Mapped[int | None] = mapped_column(Integer)
    created: Mapped[datetime] = mapped_column(UTCDateTime())
    created_by: Mapped[str] = mapped_column(String(128), default="")
    experiment: Mapped[str | None] = mapped_column(Text, default=None)
    capture: Mapped[str | None] = mapped_column(Text, default=None)


class TokenRow(Base):
    __tablename__ = "tokens"
    __table_args__ = (
        Index(
            "uq_tokens_live_name",
            "name",
            unique=True,
            sqlite_where=text("revoked IS NULL"),
            postgresql_where=text("revoked IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    # SHA-256 of the token, hex. The plaintext is shown once and never stored.
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created: Mapped[datetime] = mapped_column(UTCDateTime())
    revoked: Mapped[datetime | None] = mapped_column(UTCDateTime())


def _use_wal(cursor: Any) -> None:
    """Put the database file in WAL mode, waiting for other connections as the busy timeout does.

    WAL is kept in the file once set, so nearly every connection finds it set and changes
    nothing. Switching takes the file to itself, and SQLite answers "database is locked" at once,
    without its busy handler, while another connection is in a transaction: two processes (or
    `migrate` and `serve`) opening a new database together failed that way."""
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_S
    while True:
        try:
            (mode,) = cursor.execute("PRAGMA journal_mode").fetchone()
            if str(mode).lower() != "wal":
                cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _sqlite_setup(engine: Engine, in_memory: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Hand transaction control to SQLAlchemy (the `begin` hook below): the sqlite3
        # module's own implicit BEGIN cannot be made IMMEDIATE and skips SELECTs.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA foreign_keys = ON")
            if not in_memory:
                _use_wal(cursor)
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        immediate = conn.get_execution_options().get(_WRITE, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _postgresql_setup(engine: Engine) -> None:
    @event.listens_for(engine, "handle_error")
    def _on_error(context: Any) -> BaseException | None:
        # PostgreSQL's text cannot hold NUL (0x00), which SQLite's can: psycopg refuses such a
        # parameter (DataError) and the caller got a 500 for a name, query or field with one.
        # It is the caller's mistake, whatever the query (found by fuzzing the API).
        if "cannot contain NUL" in str(context.original_exception):
            return InvalidRequestError("text with a NUL character (0x00) cannot be stored or looked up")
        return None


class Database:
    """An engine and its sessions. `session()` reads; `session(write=True)` changes things.

    Both commit when the block ends without an exception and roll back otherwise. A
    database that cannot be used (locked past the timeout, unreachable, disk full) raises
    DatabaseUnavailable (503); integrity errors are left to the caller, which knows what they mean.
    """

    def __init__(self, url: str, *, echo: bool = False) -> None:
        parsed = make_url(url)
        self.url = url
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        if self.is_sqlite:
            in_memory = parsed.database in (None, "", ":memory:")
            if in_memory:
                # One shared connection, or every connection would see its own empty
                # database. Meant for single-threaded tools and quick experiments.
                self.engine = create_engine(
                    url, echo=echo, poolclass=StaticPool, connect_args={"check_same_thread": False}
                )
            else:
                self.engine = create_engine(url, echo=echo, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})
            _sqlite_setup(self.engine, in_memory)
        else:
            self.engine = create_engine(url, echo=echo, pool_pre_ping=True)
            _postgresql_setup(self.engine)
        self._read = sessionmaker(bind=self.engine, expire_on_commit=False)
        self._write = sessionmaker(
            bind=self.engine.execution_options(**{_WRITE: True}), expire_on_commit=False
        )

    def create_all(self) -> None:
        """Create the registry's tables that do not exist yet (tests and tools; a hub's database
        is made and upgraded by hub.migrations, which also changes tables that exist)."""
        try:
            Base.metadata.create_all(self.engine)
        except sa_exc.OperationalError as exc:
            raise RegistryError(f"cannot create the registry database at {self.url}: {exc.orig}") from exc

    @contextmanager
    def connect(self, *, write: bool = False) -> Iterator[Connection]:
        """One connection in one transaction, committed when the block ends without an
        exception: what schema migrations run in (`write`: SQLite's BEGIN IMMEDIATE)."""
        engine = self.engine.execution_options(**{_WRITE: True}) if write else self.engine
        try:
            with engine.begin() as conn:
                yield conn
        except sa_exc.OperationalError as exc:
            raise DatabaseUnavailable(f"the registry database cannot be used: {exc.orig}") from exc

    @contextmanager
    def session(self, *, write: bool = False) -> Iterator[Session]:
        factory = self._write if write else self._read
        try:
            with factory.begin() as session:
                yield session
        except sa_exc.OperationalError as exc:
            raise DatabaseUnavailable(f"the registry database cannot be used: {exc.orig}") from exc

    def dispose(self) -> None:
        """Close pooled connections (at shutdown, and in tests before deleting the file)."""
        self.engine.dispose()


def insert_ignore(session: Session, table: type[DeclarativeBase], values: dict[str, Any]) -> bool:
    """Insert a row of `table` (a mapped class with an `id` column) unless a unique key of it is
    there already; True if inserted. The fleet, capture and alerting tables dedupe with it.

    Whether it was inserted is read from RETURNING, not from rowcount: on PostgreSQL (psycopg 3)
    the INSERT SQLAlchemy sends reports rowcount -1, which would read as "inserted" every time.
    """
    dialect = session.get_bind().dialect.name
    target = cast(Table, table.__table__)
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        stmt: Any = sqlite_insert(target).values(**values).on_conflict_do_nothing()
    elif dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        stmt = pg_insert(target).values(**values).on_conflict_do_nothing()
    else:  # pragma: no cover - other backends: a savepoint per row
        try:
            with session.begin_nested():
                session.add(table(**values))
            return True
        except sa_exc.IntegrityError:
            return False
    return session.execute(stmt.returning(target.c.id)).first() is not None


@dataclass(frozen=True)
class _InsertNew:
    """How `insert_new` writes rows of some columns of a table on one dialect."""

    dialect: str
    head: str  # INSERT INTO table (columns)
    tail: str  # ON CONFLICT DO NOTHING RETURNING key
    row: str  # SQLite: one row's (?, ?, ...)
    sql: str  # PostgreSQL: the whole statement
    processors: tuple[Any, ...]  # each column's bind processor, or None

    def statement(self, n_rows: int) -> str:
        if self.dialect == "postgresql":
            return self.sql
        return f"{self.head} VALUES {', '.join([self.row] * n_rows)} {self.tail}"


@lru_cache(maxsize=64)
def _insert_new_plan(
    dialect: Any, table: Table, columns: tuple[str, ...], key: tuple[str, ...]
) -> _InsertNew:
    quote = dialect.identifier_preparer.quote
    head = (
        f"INSERT INTO {dialect.identifier_preparer.format_table(table)} "
        f"({', '.join(quote(name) for name in columns)})"
    )
    tail = f"ON CONFLICT DO NOTHING RETURNING {', '.join(quote(name) for name in key)}"
    # PostgreSQL: one array per column, in binary (text arrays of JSON bodies took psycopg tens
    # of ms to escape per statement, and one parameter per value, as a multi-row VALUES sends,
    # misses psycopg's query cache above 50).
    arrays = ", ".join(f"%({name})b::{table.c[name].type.compile(dialect=dialect)}[]" for name in columns)
    return _InsertNew(
        dialect.name,
        head,
        tail,
        f"({', '.join(['?'] * len(columns))})",
        f"{head} SELECT * FROM unnest({arrays}) {tail}",
        tuple(table.c[name].type.bind_processor(dialect) for name in columns),
    )


def _processed(values: list[Any], process: Any) -> list[Any]:
    if process is None:
        return values
    out: list[Any] = []
    last: Any = object()
    done: Any = None
    for value in values:
        if value is not last:  # a batch's rows share one `received` time: converted once
            last, done = value, process(value)
        out.append(done)
    return out


def insert_new(
    conn: Connection, table: Table, rows: Sequence[Mapping[str, Any]], key: tuple[str, ...]
) -> set[tuple[Any, ...]]:
    """Insert the `rows` (each with the same columns) whose unique `key` (columns of plain
    types: text, integers) is not stored yet; the key values of those inserted. Rows that
    repeat a key among themselves: the first is stored.

    One statement for a whole batch where `insert_ignore` costs one per row, written for the
    driver directly (the column types' bind processors applied here): SQLAlchemy's own
    executemany ("insertmanyvalues") built a parameter dict per row and was most of the fleet
    writer's time. SQLite: INSERT ... VALUES (?, ...), (?, ...) ... ON CONFLICT DO NOTHING
    RETURNING, in pages under the connection's limit of variables; PostgreSQL: INSERT ...
    SELECT * FROM unnest(one array per column) ON CONFLICT DO NOTHING RETURNING.
    """
    if not rows:
        return set()
    dialect = conn.dialect
    if dialect.name not in ("sqlite", "postgresql"):  # pragma: no cover - a savepoint per row
        new: set[tuple[Any, ...]] = set()
        for row in rows:
            try:
                with conn.begin_nested():
                    conn.execute(insert(table), dict(row))
                new.add(tuple(row[name] for name in key))
            except sa_exc.IntegrityError:
                pass
        return new
    columns = tuple(rows[0])
    plan = _insert_new_plan(dialect, table, columns, key)
    values = [
        _processed([row[name] for row in rows], process)
        for name, process in zip(columns, plan.processors, strict=True)
    ]
    if dialect.name == "postgresql":
        result = conn.exec_driver_sql(plan.sql, dict(zip(columns, values, strict=True)))
        return {tuple(r) for r in result}
    limit = _sqlite_variable_limit(conn) // len(columns)
    inserted: set[tuple[Any, ...]] = set()
    by_row = list(zip(*values, strict=True))
    for start in range(0, len(by_row), limit):
        page = by_row[start : start + limit]
        flat = tuple(v for row in page for v in row)
        inserted.update(tuple(r) for r in conn.exec_driver_sql(plan.statement(len(page)), flat))
    return inserted


def _sqlite_variable_limit(conn: Connection) -> int:
    """How many ? one statement may have on this connection (32,766 since SQLite 3.32; 999 before)."""
    import sqlite3

    driver = conn.connection.driver_connection
    getlimit = getattr(driver, "getlimit", None)  # Python 3.11+
    return int(getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)) if getlimit is not None else 999
