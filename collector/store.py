"""Where the collector keeps records: a :class:`Store` protocol and its SQLite implementation.

Storage is exactly-once by the primary key (device, seq): a batch sent twice stores nothing new the
second time, and is acknowledged again. Payloads that cannot be decoded go to ``dead_letters`` with
the reason, never into ``records``.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import msgspec

from agent.record import Record

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version(version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS records(
    device TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    utc REAL NOT NULL,
    lat REAL,
    lon REAL,
    backlog INTEGER NOT NULL DEFAULT 0,
    received_utc REAL NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (device, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS records_device_time ON records(device, utc);
CREATE TABLE IF NOT EXISTS dead_letters(
    id INTEGER PRIMARY KEY,
    received_utc REAL NOT NULL,
    topic TEXT NOT NULL,
    content_type TEXT,
    reason TEXT NOT NULL,
    payload BLOB NOT NULL
);
"""

_payload_json = msgspec.json.Encoder()


@dataclass(frozen=True)
class Incoming:
    """One decoded batch to store."""

    device: str
    records: Sequence[Record]
    backlog: bool
    received_utc: float


@dataclass(frozen=True)
class DeadLetter:
    """One payload that could not be stored, and why."""

    topic: str
    content_type: str | None
    reason: str
    payload: bytes
    received_utc: float


class Store(Protocol):
    """A collector's database."""

    def store(self, batches: Sequence[Incoming], dead: Sequence[DeadLetter]) -> int:
        """Store ``batches`` and ``dead`` letters in one committed transaction; returns new records."""

    def close(self) -> None: ...


class SqliteStore:
    """The embedded default: one file, WAL, every transaction fsynced before anything is acknowledged."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10.0)
        self._lock = threading.Lock()
        self._conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before the ack leaves, so an ack is a promise the store keeps.
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(_SCHEMA)
        if self._conn.execute("SELECT count(*) FROM schema_version").fetchone()[0] == 0:
            self._conn.execute("INSERT INTO schema_version(version) VALUES (?)", (SCHEMA_VERSION,))

    def store(self, batches: Sequence[Incoming], dead: Sequence[DeadLetter]) -> int:
        rows = []
        for batch in batches:
            for record in batch.records:
                data = record.data
                rows.append((
                    batch.device, record.seq, record.kind, record.utc,
                    getattr(data, "lat", None), getattr(data, "lon", None),
                    int(batch.backlog), batch.received_utc, _payload_json.encode(data).decode(),
                ))
        with self._lock:
            before = self._conn.total_changes
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany(
                    "INSERT OR IGNORE INTO records(device, seq, kind, utc, lat, lon, backlog, received_utc, data)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
                inserted = self._conn.total_changes - before
                self._conn.executemany(
                    "INSERT INTO dead_letters(received_utc, topic, content_type, reason, payload) VALUES (?, ?, ?, ?, ?)",
                    [(d.received_utc, d.topic, d.content_type, d.reason, d.payload) for d in dead],
                )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return inserted

    def close(self) -> None:
        with self._lock:
            self._conn.close()
