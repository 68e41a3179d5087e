"""``telematics-agent process --nmea FILE [--can FILE] [--config FILE] [--geofences FILE]``: the
agent's pipeline on captures, with the captures' own timestamps as the clock and no broker.

Prints every record the agent would buffer, one JSON object per line, in order: reported fixes
(``kind`` "fix", the keys ``decode-nmea`` prints), sampled CAN signals and status (``kind``
"signal" / "status") and events (``kind`` "event", ``type``, ``time``, ``lat``, ``lon`` and their
attributes, ``geofence_id`` among them). Deterministic: no wall clock, no state files.
"""

from __future__ import annotations

import argparse
import heapq
import sys
from typing import Iterator

import msgspec

from agent.cli_base import CommandError
from agent.record import Record, to_json_dict


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nmea", required=True, metavar="FILE", help="an NMEA capture")
    parser.add_argument("--can", metavar="FILE", help="a CAN capture of the same drive (candump -L, .asc, ...)")
    parser.add_argument("--config", metavar="FILE", help="an agent config: its gps:, can: and edge: sections are used")
    parser.add_argument("--geofences", metavar="FILE", help="a GeoJSON fence set (overrides edge.geofences.file)")


def run(args: argparse.Namespace) -> int:
    from agent.config import Config, ConfigError, DeviceConfig, load_config
    from agent.pipeline import Pipeline
    from agent.processors.edge import EdgeChain
    from agent.processors.fix_filter import FixFilter
    from agent.processors.geofence import GeofenceError, GeofenceSet

    try:
        config = load_config(args.config) if args.config else Config(device=DeviceConfig(id="offline"))
    except ConfigError as exc:
        raise CommandError(str(exc)) from exc
    try:
        fences = GeofenceSet.load(args.geofences) if args.geofences else None
        chain = EdgeChain(config.edge, None, fences)
    except GeofenceError as exc:
        raise CommandError(str(exc)) from exc
    pipeline = Pipeline([FixFilter(config.gps.filter), *chain.processors], sink=None)
    streams = [_fixes(args.nmea, config.gps)]
    if args.can:
        streams.append(_can_records(args.can, config))
    encoder = msgspec.json.Encoder()
    write = sys.stdout.buffer.write
    try:
        for record in heapq.merge(*streams, key=lambda r: r.utc):
            for out in pipeline.process_all([record]):
                write(encoder.encode(to_json_dict(out)) + b"\n")
        for out in chain.reporter.flush():
            write(encoder.encode(to_json_dict(out)) + b"\n")
    except BrokenPipeError:
        raise  # `| head`: the front ends quietly
    except OSError as exc:
        raise CommandError(f"cannot read {exc.filename}: {exc.strerror or exc}") from exc
    sys.stdout.flush()
    return 0


def _fixes(path: str, gps) -> Iterator[Record]:
    """The capture's fixes, and the receiver's health events as the live GPS source derives them.

    Offline only epochs with a position are seen, so an outage (a tunnel) longer than
    ``gps.silent_timeout_s`` shows as ``gps_silent`` and then ``gps_regained``.
    """
    from agent.decode.nmea import decode_file
    from agent.sources.gps_health import GpsHealth

    health = GpsHealth(gps.silent_timeout_s)
    last: float | None = None
    # The capture's own dates, as decode-nmea prints them (no week-rollover floor: old captures stay old).
    for utc, fix in decode_file(path, gps.allow_missing_checksum):
        if last is not None and utc - last >= gps.silent_timeout_s:
            silent = health.tick(last + gps.silent_timeout_s)
            if silent is not None:
                yield Record(utc=last + gps.silent_timeout_s, mono=last + gps.silent_timeout_s, data=silent)
        health.data(utc)
        event = health.epoch(utc, utc, fix)
        if event is not None:
            yield Record(utc=utc, mono=utc, data=event)
        yield Record(utc=utc, mono=utc, data=fix)
        last = utc


def _can_records(path: str, config) -> Iterator[Record]:
    """Sampled signals and trouble-code status of a CAN capture, as the live CAN source makes them."""
    from agent.config import CanConfig
    from agent.decode.can_log import CaptureError, iter_frames
    from agent.decode.j1939 import J1939Database
    from agent.sources.can_sampling import CanSampler

    can = config.can or CanConfig()  # a GPS-only config: the default signals and sampling
    try:
        db = J1939Database.load(can.dbc)
    except OSError as exc:
        raise CommandError(f"cannot read DBC {exc.filename}: {exc.strerror}") from exc
    samplers: dict[str | None, CanSampler] = {}
    next_tick: float | None = None
    try:
        for frame in iter_frames(path):
            if frame.time is None or frame.error or frame.remote or frame.reassembled_pgn is not None:
                continue
            sampler = samplers.get(frame.bus)
            if sampler is None:
                sampler = samplers[frame.bus] = CanSampler(db, can.signals, frame.bus or "can0")
            if next_tick is None:
                next_tick = frame.time + 1.0
            while frame.time >= next_tick:  # the sampler's windows close on the capture's own clock
                for each in samplers.values():
                    yield from each.tick(next_tick)
                next_tick += 1.0
            yield from sampler.feed(frame.time, frame.id, frame.extended, frame.data)
    except CaptureError as exc:
        raise CommandError(str(exc)) from exc
    if next_tick is not None:
        for each in samplers.values():
            yield from each.tick(next_tick + 3600.0)
