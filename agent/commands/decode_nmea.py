"""``telematics-agent decode-nmea FILE [--filter]``: every fix of an NMEA capture as one JSON object per line.

The capture's own dates; unfiltered unless ``--filter``, which applies the agent's fix-quality filter
(the ``gps:`` thresholds of ``--config``, or their defaults) on the capture's own clock. The decoder's
counters go to stderr at the end with ``--stats``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys

import msgspec

from agent.cli_base import CommandError
from agent.decode.nmea import NmeaDecoder, iter_file
from agent.record import Record, iso_utc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="an NMEA capture (lines starting with # are comments)")
    parser.add_argument("--filter", action="store_true", help="drop fixes the agent's fix-quality filter rejects")
    parser.add_argument("--config", help="take the gps: thresholds and allow_missing_checksum from this agent config")
    parser.add_argument(
        "--allow-missing-checksum", action="store_true", help="accept sentences without *hh (receivers that never send one)"
    )
    parser.add_argument(
        "--date", type=_dt.date.fromisoformat, metavar="YYYY-MM-DD",
        help="the UTC date of a capture whose receiver sends no date (GGA only): epochs before the first RMC or ZDA",
    )
    parser.add_argument("--stats", action="store_true", help="print the decoder's and filter's counters to stderr")


def run(args: argparse.Namespace) -> int:
    from agent.config import ConfigError, GpsConfig, load_config

    gps = GpsConfig()
    if args.config:
        try:
            gps = load_config(args.config).gps
        except ConfigError as exc:
            raise CommandError(str(exc)) from exc
    decoder = NmeaDecoder(allow_missing_checksum=args.allow_missing_checksum or gps.allow_missing_checksum)
    if args.date is not None:
        # Noon of that day: every time of day is then dated on that day (nearest within 12 h).
        noon = _dt.datetime(args.date.year, args.date.month, args.date.day, 12, tzinfo=_dt.timezone.utc)
        decoder.set_reference_utc(noon.timestamp())
    fix_filter = None
    if args.filter:
        from agent.processors.fix_filter import FixFilter

        fix_filter = FixFilter(gps.filter)
    encoder = msgspec.json.Encoder()
    write = sys.stdout.buffer.write
    try:
        for utc, fix in iter_file(args.file, decoder):
            if fix_filter is not None and not fix_filter.accept(Record(utc=utc, mono=0.0, data=fix)):
                continue
            payload = msgspec.structs.asdict(fix)
            write(encoder.encode({"time": iso_utc(utc), **payload}) + b"\n")
    except BrokenPipeError:
        raise  # `| head`: the front ends quietly
    except OSError as exc:
        raise CommandError(f"{args.file}: cannot read: {exc.strerror or exc}") from exc
    sys.stdout.flush()
    if args.stats:
        counters = dict(decoder.counters)
        if fix_filter is not None:
            counters.update({f"filter_{k}": v for k, v in fix_filter.counters.items()})
        print(" ".join(f"{k}={v}" for k, v in counters.items()), file=sys.stderr)
    return 0
