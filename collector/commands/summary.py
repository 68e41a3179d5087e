"""``telematics-collector summary --db PATH [--device D]``: records stored, time span, distance, duration."""

from __future__ import annotations

import argparse
import json
import sqlite3
from pathlib import Path

from agent.cli_base import CommandError
from agent.record import iso_utc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", required=True, help="the collector's SQLite file")
    parser.add_argument("--device", help="only this device")
    parser.add_argument("--json", action="store_true", help="one JSON object per device instead of text")


def run(args: argparse.Namespace) -> int:
    from collector.store import summarize

    if not Path(args.db).is_file():
        raise CommandError(f"{args.db}: no such database")
    try:
        summaries = summarize(args.db, args.device)
    except sqlite3.Error as exc:
        raise CommandError(f"{args.db}: not a collector database ({exc})") from exc
    if not summaries or all(s.records == 0 for s in summaries):
        raise CommandError(f"{args.db}: no records" + (f" for device {args.device}" if args.device else ""))
    for s in summaries:
        duration = (s.last_utc - s.first_utc) if s.records else 0.0
        doc = {
            "device": s.device,
            "records": s.records,
            "by_kind": s.by_kind,
            "first": iso_utc(s.first_utc) if s.first_utc is not None else None,
            "last": iso_utc(s.last_utc) if s.last_utc is not None else None,
            "distance_km": round(s.distance_m / 1000, 3),
            "duration_s": round(duration, 3),
            "dead_letters": s.dead_letters,
        }
        if args.json:
            print(json.dumps(doc))
            continue
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(s.by_kind.items()))
        minutes, seconds = divmod(int(round(duration)), 60)
        print(f"device {s.device}: {s.records} records stored ({kinds})")
        print(f"  from {doc['first']} to {doc['last']}: {minutes} min {seconds:02d} s")
        print(f"  distance {doc['distance_km']:.2f} km (haversine over the fixes)")
        if s.dead_letters:
            print(f"  dead letters in the database: {s.dead_letters}")
    return 0
