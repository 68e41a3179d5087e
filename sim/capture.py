"""Captures as timelines: each NMEA line or CAN frame with its offset in seconds from the start of
the drive, found from the data's own timestamps (NMEA UTC time fields, candump -L timestamps).

Pure: files in, lists out; pacing and devices live in :mod:`sim.replay`.
"""

from __future__ import annotations

import datetime as _dt
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import can

from sim import nmea_writer

log = logging.getLogger(__name__)

DAY_S = 86_400.0
# A time of day more than half a day behind the previous one is the next day, not a step back.
_ROLLOVER_S = DAY_S / 2
_LINE = re.compile(rb"[^\n]*\n|[^\n]+$")


@dataclass(frozen=True)
class NmeaLine:
    """One line of a capture (latin-1 text, line ending kept) and when to send it."""

    offset_s: float
    text: str


@dataclass(frozen=True)
class NmeaTimeline:
    """A capture's lines in order, its first date (None if it has none) and UTC at offset 0 (if known)."""

    lines: list[NmeaLine]
    first_date: _dt.date | None
    start_utc: float | None

    @property
    def duration_s(self) -> float:
        return self.lines[-1].offset_s if self.lines else 0.0


def load_nmea(path: str | Path, max_gap_s: float = 300.0) -> NmeaTimeline:
    """Read an NMEA capture into a timeline.

    Lines starting with ``#`` are skipped. Each line is due when the last time of day seen before
    or on it (RMC, GGA, GNS, ZDA, GLL, GST, GBS with a valid checksum) says; lines before the first
    time are due at 0. A time more than 12 h behind the previous one is a midnight rollover; a
    smaller step back (a receiver glitch) and a step forward longer than ``max_gap_s`` (a capture
    paused for hours) advance the timeline by nothing and by ``max_gap_s`` respectively, so the
    replay neither bursts nor hangs. Raises OSError when the file cannot be read.
    """
    data = Path(path).read_bytes()
    lines: list[NmeaLine] = []
    offset = 0.0
    last_elapsed: float | None = None
    day = 0
    first_date: _dt.date | None = None
    start_utc: float | None = None
    for raw in _LINE.findall(data):
        if raw.startswith(b"#"):
            continue
        text = raw.decode("latin-1")
        tod = nmea_writer.time_of_day(text)
        if tod is not None:
            if last_elapsed is not None and tod + day * DAY_S < last_elapsed - _ROLLOVER_S:
                day += 1
            elapsed = day * DAY_S + tod
            if last_elapsed is not None:
                step = elapsed - last_elapsed
                if step > max_gap_s:
                    log.info("%s: a gap of %.0f s in the capture replays as %.0f s", path, step, max_gap_s)
                offset += min(max(step, 0.0), max_gap_s)
            last_elapsed = elapsed
            if first_date is None:
                first_date = nmea_writer.sentence_date(text)
                if first_date is not None:
                    midnight = _dt.datetime.combine(first_date, _dt.time(), _dt.timezone.utc).timestamp()
                    start_utc = midnight + tod - offset
        lines.append(NmeaLine(offset, text))
    return NmeaTimeline(lines, first_date, start_utc)


def load_candump(path: str | Path) -> list[can.Message]:
    """The frames of a ``candump -L`` log, with their recorded timestamps. Raises OSError, ValueError."""
    with can.CanutilsLogReader(str(path)) as reader:
        return [msg for msg in reader if not msg.is_error_frame]


def can_lead_s(nmea: NmeaTimeline | None, frames: list[can.Message]) -> float:
    """Seconds from the NMEA capture's start to the first CAN frame (negative: CAN began first).

    When both carry UTC and their time ranges overlap (one drive recorded twice), the offset
    comes from the timestamps; otherwise (unrelated captures) both start together (0).
    """
    if not frames or nmea is None or nmea.start_utc is None:
        return 0.0
    nmea_end = nmea.start_utc + nmea.duration_s
    if frames[0].timestamp > nmea_end or frames[-1].timestamp < nmea.start_utc:
        log.info("the CAN and NMEA captures do not overlap in time: replaying both from their starts")
        return 0.0
    return frames[0].timestamp - nmea.start_utc
