"""The PostgreSQL store for a real fleet (psycopg 3): the same tables and guarantees as the SQLite one.

A batch group is one transaction: its records are COPYed into a temporary table and moved with
``INSERT ... SELECT ... ON CONFLICT DO NOTHING`` (exactly-once by (device, seq)); the commit returns
only when PostgreSQL has the transaction on disk (``synchronous_commit`` on, the server default), so
the collector acknowledges nothing that a crash could lose.

The schema is versioned (``schema_migrations``); migrations run under an advisory lock, so several
collector processes may start together. With the TimescaleDB extension available, ``records`` becomes
a hypertable on its ``time`` column (TimescaleDB needs the time column in the primary key, so the key
is then (device, seq, time): a resent record carries the same time, so storage stays exactly-once).
"""

from __future__ import annotations

import logging
import threading
from typing import Sequence

import msgspec
import psycopg

from collector.store import DeadLetter, Incoming

log = logging.getLogger(__name__)

# pg_advisory_xact_lock key of the migrations: any constant unique to this application ("tele").
_MIGRATION_LOCK = 0x74656C65

_RECORDS = """
CREATE TABLE records(
    device text NOT NULL,
    seq bigint NOT NULL,
    kind text NOT NULL,
    utc double precision NOT NULL,
    time timestamptz NOT NULL,
    lat double precision,
    lon double precision,
    backlog boolean NOT NULL DEFAULT false,
    received_utc double precision NOT NULL,
    data jsonb NOT NULL,
    PRIMARY KEY ({key})
)"""

# (version, description, statements); a statement list may depend on whether TimescaleDB is there.
MIGRATIONS: list[tuple[int, str, object]] = [
    (1, "records, dead letters, per-device time index", lambda timescale: [
        _RECORDS.format(key="device, seq, time" if timescale else "device, seq"),
        # Per-device time-range queries (export, summary) read this index in order.
        "CREATE INDEX records_device_utc ON records(device, utc)",
        "CREATE TABLE dead_letters("
        " id bigserial PRIMARY KEY, received_utc double precision NOT NULL, topic text NOT NULL,"
        " content_type text, reason text NOT NULL, payload bytea NOT NULL)",
        *(["CREATE EXTENSION IF NOT EXISTS timescaledb",
           "SELECT create_hypertable('records', 'time', chunk_time_interval => interval '1 day')"] if timescale else []),
    ]),
]

_payload_json = msgspec.json.Encoder()
_COLUMNS = "device, seq, kind, utc, lat, lon, backlog, received_utc, data"
# ``time`` is ``utc`` as a timestamptz for range partitioning, held to 1970..3000 (32503680000 s) so
# that a device's wild clock cannot fail the transaction (and with it the acks of a whole group);
# ``utc`` keeps the value the device sent.
_TIME = "to_timestamp(LEAST(GREATEST(utc, 0), 32503680000))"


def migrate(conn: psycopg.Connection) -> int:
    """Bring the schema to the newest version; returns it. Safe to run from several processes at once."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations("
            " version integer PRIMARY KEY, description text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
        timescale = conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'").fetchone() is not None
        for version, description, statements in MIGRATIONS:
            if version in done:
                continue
            for statement in statements(timescale):  # type: ignore[operator]
                conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations(version, description) VALUES (%s, %s)", (version, description))
            log.info("postgres: applied migration %d (%s)%s", version, description, " with TimescaleDB" if timescale else "")
    return max(v for v, _, _ in MIGRATIONS)


class PostgresUnavailable(Exception):
    """The database cannot be reached or migrated; the message says why (never the password)."""


class PostgresStore:
    """A :class:`collector.store.Store` on PostgreSQL; ``dsn`` as libpq takes it (``postgresql://...``)."""

    def __init__(self, dsn: str) -> None:
        self._lock = threading.Lock()
        try:
            self._conn = psycopg.connect(dsn)
            migrate(self._conn)
            # The staging table COPY fills; per connection, emptied after every group.
            self._conn.execute(f"CREATE TEMP TABLE incoming AS SELECT {_COLUMNS} FROM records WITH NO DATA")
            self._conn.commit()
        except psycopg.Error as exc:
            raise PostgresUnavailable("PostgreSQL: " + " ".join(str(exc).split())) from exc

    def store(self, batches: Sequence[Incoming], dead: Sequence[DeadLetter]) -> int:
        """Store every record (new ones only) and every dead letter in one transaction; returns new records."""
        with self._lock, self._conn.transaction():
            cur = self._conn.cursor()
            with cur.copy(f"COPY incoming ({_COLUMNS}) FROM STDIN") as copy:
                for batch in batches:
                    for record in batch.records:
                        data = record.data
                        copy.write_row((
                            batch.device, record.seq, record.kind, record.utc,
                            getattr(data, "lat", None), getattr(data, "lon", None), batch.backlog,
                            batch.received_utc, _payload_json.encode(data).decode(),
                        ))
            cur.execute(
                f"INSERT INTO records ({_COLUMNS}, time) SELECT {_COLUMNS}, {_TIME} FROM incoming ON CONFLICT DO NOTHING"
            )
            inserted = cur.rowcount
            cur.execute("DELETE FROM incoming")  # cheaper than TRUNCATE (no new relfilenode) on a small temp table
            if dead:
                cur.executemany(
                    "INSERT INTO dead_letters(received_utc, topic, content_type, reason, payload)"
                    " VALUES (%s, %s, %s, %s, %s)",
                    [(d.received_utc, d.topic, d.content_type, d.reason, d.payload) for d in dead],
                )
        return inserted

    def close(self) -> None:
        with self._lock:
            self._conn.close()
