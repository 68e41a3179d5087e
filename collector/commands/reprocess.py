"""``telematics-collector reprocess --db TARGET``: decode the dead letters again (after an upgrade).

Every dead letter that now decodes is stored (exactly once, as if it had just arrived) and removed
from ``dead_letters``; the others stay, with their reason. Nothing is acknowledged to the devices:
they sent these batches again anyway, as nothing acknowledged them the first time.
"""

from __future__ import annotations

import argparse
import time

from agent.cli_base import CommandError
from agent.wire import WireError, decode_batch
from collector.queries import DatabaseError, dead_letters, delete_dead_letters, open_database
from collector.store import Incoming


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", required=True, help="the collector's SQLite file or a postgresql:// DSN")


def _store(target: str):
    if target.startswith(("postgresql://", "postgres://")):
        from collector.store_pg import PostgresStore, PostgresUnavailable

        try:
            return PostgresStore(target)
        except PostgresUnavailable as exc:
            raise DatabaseError(str(exc)) from exc
    from collector.store import SqliteStore

    return SqliteStore(target)


def run(args: argparse.Namespace) -> int:
    try:
        with open_database(args.db) as db:
            rows = dead_letters(db)
            recovered, batches, still = [], [], 0
            for row in rows:
                try:
                    batch = decode_batch(row.payload, row.content_type)
                    parts = row.topic.split("/")  # {prefix}/{device}/telemetry
                    if len(parts) < 3 or parts[-2] != batch.device_id:
                        raise WireError(f"the batch names device {batch.device_id!r} but came on {row.topic!r}")
                except WireError as exc:
                    still += 1
                    print(f"dead letter {row.id} on {row.topic}: still undecodable: {exc}")
                    continue
                batches.append(Incoming(batch.device_id, batch.records, False, time.time()))
                recovered.append(row.id)
            stored = 0
            if batches:
                store = _store(args.db)
                try:
                    stored = store.store(batches, [])
                finally:
                    store.close()
                delete_dead_letters(db, recovered)
    except DatabaseError as exc:
        raise CommandError(str(exc)) from exc
    records = sum(len(b.records) for b in batches)
    print(f"{len(recovered)} dead letters decoded ({records} records, {stored} new), {still} still undecodable")
    return 0
