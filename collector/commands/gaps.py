"""``telematics-collector gaps --db TARGET [--device D] [--json]``: sequence numbers that never arrived.

For each device, the holes between the lowest and highest sequence number stored: records that were
lost before reaching the collector (or are still on their way: late batches fill holes later).
"""

from __future__ import annotations

import argparse
import json

from agent.cli_base import CommandError
from collector.queries import DatabaseError, gaps, open_database


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", required=True, help="the collector's SQLite file or a postgresql:// DSN")
    parser.add_argument("--device", help="only this device")
    parser.add_argument("--json", action="store_true", help="one JSON object per gap")


def run(args: argparse.Namespace) -> int:
    try:
        with open_database(args.db) as db:
            found = gaps(db, args.device)
    except DatabaseError as exc:
        raise CommandError(str(exc)) from exc
    for gap in found:
        if args.json:
            print(json.dumps({"device": gap.device, "first": gap.first, "last": gap.last, "missing": gap.count}))
        else:
            print(f"{gap.device}: seq {gap.first}..{gap.last} missing ({gap.count})")
    if not args.json:
        devices = len({g.device for g in found})
        print(f"{len(found)} gaps, {sum(g.count for g in found)} records missing, on {devices} devices")
    return 0
