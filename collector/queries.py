"""Read-side queries on a collector database, SQLite or PostgreSQL alike: gaps, exports, dead letters.

``open_database(target)`` takes a SQLite path or a ``postgresql://`` DSN; both schemas have the same
``records`` and ``dead_letters`` columns, and the SQL here is the subset both dialects share (window
functions need SQLite 3.25 or newer).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import msgspec

from agent.record import Event, Fix, Record, Signal, Status


class DatabaseError(Exception):
    """The target cannot be opened or is not a collector database; the message says which and why."""


_PAYLOADS = {"fix": Fix, "signal": Signal, "event": Event, "status": Status}


class Database:
    """A DB-API connection and the placeholder style of its driver."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.postgres = target.startswith(("postgresql://", "postgres://"))
        try:
            if self.postgres:
                import psycopg

                self.conn: Any = psycopg.connect(target)
                self._errors: tuple[type[Exception], ...] = (psycopg.Error,)
            else:
                if not Path(target).is_file():
                    raise DatabaseError(f"{target}: no such database")
                self.conn = sqlite3.connect(target)
                self._errors = (sqlite3.Error,)
            self.execute("SELECT count(*) FROM records WHERE 0 = 1")
        except DatabaseError:
            raise
        except Exception as exc:  # the driver's errors: unreachable server, not a database, no tables
            raise DatabaseError(f"{self._name()}: not a collector database ({' '.join(str(exc).split())})") from exc

    def _name(self) -> str:
        return "PostgreSQL" if self.postgres else self.target

    def execute(self, sql: str, params: tuple = ()) -> Any:
        """Run ``sql`` written with ``?`` placeholders; driver errors become :class:`DatabaseError`."""
        try:
            return self.conn.execute(sql.replace("?", "%s") if self.postgres else sql, params)
        except self._errors as exc:
            raise DatabaseError(f"{self._name()}: {' '.join(str(exc).split())}") from exc

    def commit(self) -> None:
        self.conn.commit()

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "Database":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_database(target: str) -> Database:
    """A SQLite file or a ``postgresql://`` DSN; raises :class:`DatabaseError`."""
    return Database(target)


@dataclass(frozen=True)
class Gap:
    """Sequence numbers ``first``..``last`` (inclusive) of ``device`` that never arrived."""

    device: str
    first: int
    last: int

    @property
    def count(self) -> int:
        return self.last - self.first + 1


def gaps(db: Database, device: str | None = None) -> list[Gap]:
    """Holes between the lowest and highest sequence number stored for each device."""
    sql = (
        "SELECT device, prev + 1, seq - 1 FROM ("
        " SELECT device, seq, lag(seq) OVER (PARTITION BY device ORDER BY seq) AS prev FROM records"
        + (" WHERE device = ?" if device else "")
        + ") AS numbered WHERE seq > prev + 1 ORDER BY device, seq"
    )
    return [Gap(d, int(a), int(b)) for d, a, b in db.execute(sql, (device,) if device else ())]


def records(db: Database, device: str, start: float, end: float, kind: str | None = None) -> Iterator[Record]:
    """``device``'s records with ``start <= utc < end`` in time order (then sequence)."""
    sql = "SELECT seq, utc, kind, data FROM records WHERE device = ? AND utc >= ? AND utc < ?"
    params: tuple = (device, start, end)
    if kind:
        sql += " AND kind = ?"
        params += (kind,)
    for seq, utc, row_kind, data in db.execute(sql + " ORDER BY utc, seq", params):
        raw = data if isinstance(data, (str, bytes)) else msgspec.json.encode(data)  # psycopg returns jsonb parsed
        yield Record(utc=utc, mono=0.0, seq=int(seq), data=msgspec.json.decode(raw, type=_PAYLOADS[row_kind]))


@dataclass(frozen=True)
class DeadRow:
    """One row of ``dead_letters``."""

    id: int
    topic: str
    content_type: str | None
    reason: str
    payload: bytes
    received_utc: float


def dead_letters(db: Database) -> list[DeadRow]:
    rows = db.execute("SELECT id, topic, content_type, reason, payload, received_utc FROM dead_letters ORDER BY id")
    return [DeadRow(int(i), t, c, r, bytes(p), float(u)) for i, t, c, r, p, u in rows]


def delete_dead_letters(db: Database, ids: list[int]) -> None:
    for row_id in ids:
        db.execute("DELETE FROM dead_letters WHERE id = ?", (row_id,))
    db.commit()
