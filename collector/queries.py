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

from agent.geo import haversine_m
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


@dataclass(frozen=True)
class DeviceSummary:
    """One device at a glance: what ``telematics-collector summary`` prints."""

    device: str
    records: int
    by_kind: dict[str, int]
    first_utc: float | None
    last_utc: float | None  # the newest record's own time
    last_seen_utc: float | None  # when the collector last received anything from it
    last_position: tuple[float, float] | None  # (lat, lon) of the newest fix
    distance_m: float  # along the stored fixes, in time order
    trips: int  # completed trips (trip_end events)
    events: dict[str, int]  # event type -> count


def summaries(db: Database, device: str | None = None) -> list[DeviceSummary]:
    """Per-device summaries (every device, or just ``device``)."""
    if device:
        devices = [device]
    else:
        devices = [row[0] for row in db.execute("SELECT DISTINCT device FROM records ORDER BY device")]
    out = []
    for dev in devices:
        by_kind = {kind: int(n) for kind, n in db.execute(
            "SELECT kind, count(*) FROM records WHERE device = ? GROUP BY kind", (dev,))}
        first, last, seen = db.execute(
            "SELECT min(utc), max(utc), max(received_utc) FROM records WHERE device = ?", (dev,)).fetchone()
        distance, prev = 0.0, None
        for lat, lon in db.execute(
            "SELECT lat, lon FROM records WHERE device = ? AND kind = 'fix' ORDER BY utc, seq", (dev,)
        ):
            if prev is not None:
                distance += haversine_m(prev[0], prev[1], lat, lon)
            prev = (lat, lon)
        events: dict[str, int] = {}
        for record in records(db, dev, float("-inf"), float("inf"), kind="event"):
            events[record.data.type] = events.get(record.data.type, 0) + 1
        out.append(DeviceSummary(
            device=dev, records=sum(by_kind.values()), by_kind=by_kind, first_utc=first, last_utc=last,
            last_seen_utc=seen, last_position=prev, distance_m=distance, trips=events.get("trip_end", 0),
            events=events,
        ))
    return out


def dead_letter_count(db: Database) -> int:
    return int(db.execute("SELECT count(*) FROM dead_letters").fetchone()[0])
