"""``telematics-agent decode-can [--dbc FILE]... FILE``: one JSON object per decoded signal, trouble
code set or reassembled message, with the keys time, bus, id, pgn, sa, pid, name, value, unit."""

from __future__ import annotations

import argparse
import json
import sys

from agent.cli_base import CommandError
from agent.decode.can_decoder import Decoded, FrameDecoder
from agent.decode.can_log import CaptureError, iter_frames
from agent.decode.dtc import DtcSet
from agent.decode.j1939 import DbcError, J1939Database
from agent.record import iso_utc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="a CAN capture: candump -L .log, .asc, .blf, .trc, .csv, or candump screen output")
    parser.add_argument("--dbc", action="append", default=[], metavar="FILE",
                        help="an extra DBC (J1939 messages match on the PGN); may be repeated; later files win")
    parser.add_argument("--no-default-dbc", action="store_true", help="do not load the project's own J1939 DBC")


def to_line(item: Decoded) -> dict:
    """The JSON object of one decoded item (keys as documented in docs/can.md)."""
    value = item.value.to_json() if isinstance(item.value, DtcSet) else item.value
    return {
        "time": None if item.time is None else iso_utc(item.time, 6),
        "bus": item.bus,
        "id": f"{item.id:08X}" if item.extended else f"{item.id:03X}",
        "pgn": item.pgn,
        "sa": item.sa,
        "pid": item.pid,
        "name": item.name,
        "value": value,
        "unit": item.unit,
    }


def run(args: argparse.Namespace) -> int:
    try:
        db = J1939Database.load(args.dbc, include_packaged=not args.no_default_dbc)
    except OSError as exc:
        raise CommandError(f"cannot read DBC {exc.filename}: {exc.strerror or exc}") from exc
    except DbcError as exc:
        raise CommandError(str(exc)) from exc
    decoder = FrameDecoder(db)
    out = sys.stdout
    dumps = json.JSONEncoder(ensure_ascii=False, separators=(", ", ": ")).encode
    try:
        for frame in iter_frames(args.file):
            if frame.reassembled_pgn is not None:
                items = decoder.feed_reassembled(frame.time, frame.bus, frame.reassembled_pgn, frame.sa, frame.data)
            elif frame.remote:
                continue
            else:
                items = decoder.feed(frame.time, frame.bus, frame.id, frame.extended, frame.data, frame.error)
            for item in items:
                out.write(dumps(to_line(item)) + "\n")
    except CaptureError as exc:
        raise CommandError(str(exc)) from exc
    return 0
