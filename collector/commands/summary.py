"""``telematics-collector summary --db TARGET [--device D] [--json]``: per device, records stored,
time span, last seen, last position, distance, trips and events (SQLite file or PostgreSQL DSN)."""

from __future__ import annotations

import argparse
import json

from agent.cli_base import CommandError
from agent.record import iso_utc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", required=True, help="the collector's SQLite file or a postgresql:// DSN")
    parser.add_argument("--device", help="only this device")
    parser.add_argument("--json", action="store_true", help="one JSON object per device instead of text")


def _iso(utc: float | None) -> str | None:
    return iso_utc(utc) if utc is not None else None


def run(args: argparse.Namespace) -> int:
    from collector.queries import DatabaseError, dead_letter_count, open_database, summaries

    try:
        with open_database(args.db) as db:
            found = summaries(db, args.device)
            dead = dead_letter_count(db)
    except DatabaseError as exc:
        raise CommandError(str(exc)) from exc
    if not found or all(s.records == 0 for s in found):
        raise CommandError(f"{args.db}: no records" + (f" for device {args.device}" if args.device else ""))
    for s in found:
        duration = (s.last_utc - s.first_utc) if s.records else 0.0
        doc = {
            "device": s.device,
            "records": s.records,
            "by_kind": s.by_kind,
            "first": _iso(s.first_utc),
            "last": _iso(s.last_utc),
            "last_seen": _iso(s.last_seen_utc),
            "last_position": {"lat": s.last_position[0], "lon": s.last_position[1]} if s.last_position else None,
            "distance_km": round(s.distance_m / 1000, 3),
            "duration_s": round(duration, 3),
            "trips": s.trips,
            "events": s.events,
            "dead_letters": dead,
        }
        if args.json:
            print(json.dumps(doc))
            continue
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(s.by_kind.items()))
        minutes, seconds = divmod(int(round(duration)), 60)
        print(f"device {s.device}: {s.records} records stored ({kinds})")
        print(f"  from {doc['first']} to {doc['last']}: {minutes} min {seconds:02d} s; last seen {doc['last_seen']}")
        if s.last_position:
            print(f"  last position {s.last_position[0]:.6f}, {s.last_position[1]:.6f}")
        print(f"  distance {doc['distance_km']:.2f} km (haversine over the fixes), {s.trips} trips completed")
        if s.events:
            print("  events: " + ", ".join(f"{t} {n}" for t, n in sorted(s.events.items())))
    if dead and not args.json:
        print(f"dead letters in the database: {dead} (telematics-collector reprocess)")
    return 0
