"""``telematics-collector export --db TARGET --device D --from T --to T --format geojson|gpx|csv``.

Writes the device's fixes with ``from <= time < to`` (ISO 8601 UTC such as 2026-03-02T08:30:00Z, or
seconds since the epoch) to stdout or ``--output FILE``.
"""

from __future__ import annotations

import argparse
import sys

from agent.cli_base import CommandError
from agent.record import parse_iso_utc
from collector.export import FORMATS, write
from collector.queries import DatabaseError, open_database, records


def _time(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return parse_iso_utc(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is neither ISO 8601 nor epoch seconds") from exc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", required=True, help="the collector's SQLite file or a postgresql:// DSN")
    parser.add_argument("--device", required=True)
    parser.add_argument("--from", dest="start", type=_time, required=True, metavar="T", help="first time (inclusive)")
    parser.add_argument("--to", dest="end", type=_time, required=True, metavar="T", help="end time (exclusive)")
    parser.add_argument("--format", choices=FORMATS, required=True)
    parser.add_argument("--output", "-o", help="write here instead of stdout")


def run(args: argparse.Namespace) -> int:
    if args.end <= args.start:
        raise CommandError("--to must be after --from")
    try:
        with open_database(args.db) as db:
            fixes = list(records(db, args.device, args.start, args.end, kind="fix"))
    except DatabaseError as exc:
        raise CommandError(str(exc)) from exc
    if args.output:
        try:
            with open(args.output, "w", encoding="utf-8") as out:
                count = write(args.format, args.device, fixes, out)
        except OSError as exc:
            raise CommandError(f"{args.output}: {exc.strerror or exc}") from exc
    else:
        count = write(args.format, args.device, fixes, sys.stdout)
    print(f"exported {count} fixes of {args.device}", file=sys.stderr)
    return 0
