"""The telemetry outbox: every message goes to disk first, and leaves only once the broker acknowledged it.

Store-and-forward on SQLite (stdlib sqlite3), one file under the data directory:

- `put()` assigns the device's next `seq` and stores the message in ONE transaction, so a
  sequence number is never handed out without its message, and never handed out twice.
  The counter lives in the `meta` table, not in max(seq): delivered rows are deleted.
- `peek()` returns the oldest messages first; `ack()` deletes the ones the broker
  acknowledged (PUBACK). A crash between publish and ack re-sends (at least once); the hub
  drops duplicates by (device_id, seq).
- Bounded: after each put, while there are more than `max_messages` rows or more than
  `max_bytes` of payload, the OLDEST rows go (newest data is the most useful after a long
  outage, Greengrass's "overwrite oldest"); rows older than `max_age_s` expire. Both are
  counted in persisted counters (`dropped_total`, `expired_total`) that the publisher
  reports once it is back online.
- The birth/death sequence (`bd_seq`) of the MQTT connection is persisted here as well.

Durability: WAL journal with `synchronous=FULL`. In WAL mode NORMAL already survives a
killed process (the WAL is in the OS's page cache), but a power cut can roll the last
commits back, and with them the `seq` counter: numbers already published would be handed
out again and the hub would discard the new messages as duplicates. FULL fsyncs the WAL at
each commit; telemetry is a few messages a minute, so that costs nothing that matters.

One connection, guarded by one lock: the agent's event loop thread puts, the publisher
thread peeks and acks.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from agent.errors import OutboxError

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    created REAL NOT NULL
);
"""
_COUNTERS = ("next_seq", "bd_seq", "dropped_total", "expired_total", "reported_lost")


@dataclass(frozen=True)
class Message:
    """One stored message; `seq` is also its id for `ack()`."""

    seq: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    created: float

    @property
    def id(self) -> int:
        return self.seq


class Outbox:
    def __init__(
        self,
        path: Path | str,
        max_messages: int = 10_000,
        max_bytes: int = 64 * 1024 * 1024,
        max_age_s: float = 7 * 24 * 3600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_messages < 1 or max_bytes < 1 or not max_age_s > 0:
            raise ValueError("outbox bounds must be positive")
        self.path = Path(path)
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        # Wall-clock time, not monotonic: ages must mean something across restarts.
        self._clock = clock
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: transactions are ours (BEGIN IMMEDIATE ... COMMIT), never implicit.
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise OutboxError(f"{self.path}: cannot open the telemetry outbox ({exc})") from exc
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            with self._tx() as db:
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        db.execute(stmt)
                version = db.execute("PRAGMA user_version").fetchone()[0]
                if version not in (0, SCHEMA_VERSION):
                    raise OutboxError(
                        f"{self.path}: outbox schema version {version} is newer than this agent "
                        f"({SCHEMA_VERSION}); move the file aside or upgrade the agent"
                    )
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                db.executemany(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)",
                    [(k, 1 if k == "next_seq" else 0) for k in _COUNTERS],
                )
        except OutboxError:
            self._db.close()
            raise
        except sqlite3.Error as exc:
            self._db.close()
            raise OutboxError(f"{self.path}: the telemetry outbox is unreadable ({exc})") from exc

    # -- transactions -------------------------------------------------------------------

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; the caller holds self._lock (or is __init__)."""
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise OutboxError(f"{self.path}: telemetry outbox write failed ({exc})") from exc

    @staticmethod
    def _get(db: sqlite3.Connection, key: str) -> int:
        return int(db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0])

    @staticmethod
    def _add(db: sqlite3.Connection, key: str, n: int) -> None:
        db.execute("UPDATE meta SET value = value + ? WHERE key = ?", (n, key))

    def _take(self, db: sqlite3.Connection, key: str) -> int:
        value = self._get(db, key)
        self._add(db, key, 1)
        return value

    def _expire(self, db: sqlite3.Connection) -> None:
        cur = db.execute("DELETE FROM messages WHERE created < ?", (self._clock() - self.max_age_s,))
        if cur.rowcount > 0:
            self._add(db, "expired_total", cur.rowcount)

    def _enforce_bounds(self, db: sqlite3.Connection) -> None:
        # Newest first: keep a row while it is among the newest max_messages and the newest rows
        # up to and including it fit in max_bytes; the rest (the oldest) are dropped.
        cur = db.execute(
            """DELETE FROM messages WHERE seq IN (
                 SELECT seq FROM (
                   SELECT seq,
                          ROW_NUMBER() OVER (ORDER BY seq DESC) AS n,
                          SUM(LENGTH(payload) + LENGTH(topic)) OVER (ORDER BY seq DESC) AS bytes
                   FROM messages)
                 WHERE n > ? OR bytes > ?)""",
            (self.max_messages, self.max_bytes),
        )
        if cur.rowcount > 0:
            self._add(db, "dropped_total", cur.rowcount)

    # -- the API ------------------------------------------------------------------------

    def put(
        self, topic: str, payload: bytes | Callable[[int], bytes], qos: int = 1, retain: bool = False
    ) -> int:
        """Store one message and return its `seq`; durable when this returns.

        `payload` may be a function of the seq (the seq goes inside the JSON envelope), called
        inside the transaction. A message larger than max_bytes on its own is not stored: it
        is counted as dropped (its seq is used up) and the rest of the outbox is left alone.
        """
        if qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, not {qos!r}")
        with self._lock, self._tx() as db:
            seq = self._take(db, "next_seq")
            data = payload(seq) if callable(payload) else payload
            if len(data) + len(topic) > self.max_bytes:
                # Alone over the bound: storing it would evict everything else first.
                self._add(db, "dropped_total", 1)
                return seq
            db.execute(
                "INSERT INTO messages (seq, topic, payload, qos, retain, created) VALUES (?, ?, ?, ?, ?, ?)",
                (seq, topic, data, qos, int(retain), self._clock()),
            )
            self._expire(db)
            self._enforce_bounds(db)
            return seq

    def peek(self, limit: int = 100) -> list[Message]:
        """Up to `limit` stored messages, oldest first (expired ones are dropped first)."""
        with self._lock, self._tx() as db:
            self._expire(db)
            rows = db.execute(
                "SELECT seq, topic, payload, qos, retain, created FROM messages ORDER BY seq LIMIT ?",
                (limit,),
            ).fetchall()
        return [Message(r[0], r[1], bytes(r[2]), r[3], bool(r[4]), r[5]) for r in rows]

    def ack(self, ids: Iterable[int]) -> int:
        """Delete delivered messages by seq; returns how many were still there."""
        seqs = [(int(i),) for i in ids]
        if not seqs:
            return 0
        with self._lock, self._tx() as db:
            before = db.total_changes
            db.executemany("DELETE FROM messages WHERE seq = ?", seqs)
            return db.total_changes - before

    def reserve_seq(self) -> int:
        """A seq for a message that does not go through the outbox (birth, will, death)."""
        with self._lock, self._tx() as db:
            return self._take(db, "next_seq")

    def next_bd_seq(self) -> int:
        """The birth/death sequence number of the next connection attempt (persisted, increasing)."""
        with self._lock, self._tx() as db:
            return self._take(db, "bd_seq")

    def mark_reported(self, lost_total: int) -> None:
        """Record that drops and expiries up to `lost_total` have been reported to the hub."""
        with self._lock, self._tx() as db:
            db.execute("UPDATE meta SET value = MAX(value, ?) WHERE key = 'reported_lost'", (lost_total,))

    def counters(self) -> dict[str, int]:
        """The persisted counters (next_seq, bd_seq, dropped_total, expired_total, reported_lost),
        and `queued` / `queued_bytes`: what the outbox holds now."""
        with self._lock:
            try:
                out = {k: int(v) for k, v in self._db.execute("SELECT key, value FROM meta")}
                n, size = self._db.execute(
                    "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload) + LENGTH(topic)), 0) FROM messages"
                ).fetchone()
            except sqlite3.Error as exc:
                raise OutboxError(f"{self.path}: telemetry outbox read failed ({exc})") from exc
        out["queued"] = int(n)
        out["queued_bytes"] = int(size)
        return out

    def queued_bytes(self, kind: str) -> int:
        """Payload bytes of the stored messages of one kind (the topic's last level)."""
        with self._lock:
            try:
                row = self._db.execute(
                    "SELECT COALESCE(SUM(LENGTH(payload)), 0) FROM messages WHERE topic LIKE ?",
                    ("%/" + kind,),
                ).fetchone()
            except sqlite3.Error as exc:
                raise OutboxError(f"{self.path}: telemetry outbox read failed ({exc})") from exc
        return int(row[0])

    @property
    def dropped_total(self) -> int:
        return self.counters()["dropped_total"]

    @property
    def expired_total(self) -> int:
        return self.counters()["expired_total"]

    def __len__(self) -> int:
        return self.counters()["queued"]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
