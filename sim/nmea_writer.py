"""NMEA 0183 text for the simulator: checksums, the sentences a GPS receiver sends, and the
rewriting of dates and reading of times in captured sentences.

Pure functions on ``str`` (captures are decoded as latin-1 so every byte survives a round trip);
no I/O. Field layouts follow NMEA 0183 v2.3/4.x as u-blox and MediaTek receivers emit them.
"""

from __future__ import annotations

import datetime as _dt
import re

# NMEA 0183: "$" + talker/type + "," fields + "*" + two hex digits of the XOR of the bytes in between.
_SENTENCE = re.compile(r"^(?P<lead>[$!])(?P<body>[^$*\r\n]*)(?:\*(?P<sum>[0-9A-Fa-f]{2}))?(?P<tail>\s*)$")

KNOTS_PER_MPS = 3600.0 / 1852.0  # 1 knot = 1852 m/h (international nautical mile)


def checksum(body: str) -> str:
    """The NMEA checksum of ``body`` (the text between ``$`` and ``*``), as two upper-case hex digits."""
    value = 0
    for char in body.encode("latin-1"):
        value ^= char
    return f"{value:02X}"


def sentence(*fields: object) -> str:
    """One sentence with checksum and CR LF, e.g. ``sentence("GPGSA", "A", 3)``; None becomes empty."""
    body = ",".join("" if f is None else str(f) for f in fields)
    return f"${body}*{checksum(body)}\r\n"


def split(line: str) -> tuple[str, list[str], str | None, str] | None:
    """``(lead, fields, checksum or None, line ending)`` of one sentence, or None if ``line`` is not one."""
    match = _SENTENCE.match(line)
    if not match:
        return None
    return match.group("lead"), match.group("body").split(","), match.group("sum"), match.group("tail")


def checksum_ok(line: str) -> bool:
    """True when ``line`` is a sentence whose checksum is present and right."""
    parts = _SENTENCE.match(line)
    return bool(parts and parts.group("sum") and parts.group("sum").upper() == checksum(parts.group("body")))


def _kind(fields: list[str]) -> str:
    """The sentence type without its talker: "GPRMC" -> "RMC" (proprietary "P..." sentences keep theirs)."""
    tag = fields[0]
    return tag if tag.startswith("P") else tag[2:]


def _seconds_of_day(text: str) -> float | None:
    """hhmmss[.ss] -> seconds since midnight, or None when malformed."""
    if len(text) < 6 or not text[:6].isdigit():
        return None
    try:
        frac = float("0" + text[6:]) if len(text) > 6 else 0.0
    except ValueError:
        return None
    h, m, s = int(text[0:2]), int(text[2:4]), int(text[4:6])
    if h > 23 or m > 59 or s > 60:  # 60: a leap second
        return None
    return h * 3600 + m * 60 + s + frac


# Where each sentence type keeps its UTC time of day (NMEA 0183 v4.10 field numbers, type tag = 0).
_TIME_FIELD = {"RMC": 1, "GGA": 1, "GNS": 1, "ZDA": 1, "GBS": 1, "GST": 1, "GLL": 5}


def time_of_day(line: str) -> float | None:
    """Seconds since midnight UTC that a sentence with a valid checksum carries, else None.

    Only sentences with a checksum that matches count: a corrupted time would make the replay jump.
    """
    if not checksum_ok(line):
        return None
    parts = split(line)
    fields = parts[1]
    index = _TIME_FIELD.get(_kind(fields)) if len(fields[0]) >= 5 else None
    if index is None or index >= len(fields):
        return None
    return _seconds_of_day(fields[index])


def sentence_date(line: str) -> _dt.date | None:
    """The UTC date an RMC or ZDA sentence with a valid checksum carries, else None."""
    if not checksum_ok(line):
        return None
    fields = split(line)[1]
    kind = _kind(fields) if len(fields[0]) >= 5 else ""
    try:
        if kind == "RMC" and len(fields) > 9 and len(fields[9]) == 6:
            d = fields[9]
            # RMC's two-digit year: 2000 + yy (receivers of the 1990s are long gone; gpsd does the same).
            return _dt.date(2000 + int(d[4:6]), int(d[2:4]), int(d[0:2]))
        if kind == "ZDA" and len(fields) > 4 and fields[2] and fields[3] and fields[4]:
            return _dt.date(int(fields[4]), int(fields[3]), int(fields[2]))
    except ValueError:
        return None
    return None


def shift_date(line: str, days: int) -> str:
    """``line`` with the date of an RMC or ZDA sentence moved by ``days`` and its checksum recomputed.

    Anything else (other sentences, an empty date, a bad checksum, a line without a checksum
    whose date cannot be read) comes back unchanged, so a capture's faults are replayed as they were.
    A sentence without a checksum gets its date moved and stays without a checksum.
    """
    parts = split(line)
    if parts is None or days == 0:
        return line
    lead, fields, given, tail = parts
    body = ",".join(fields)
    if given is not None and given.upper() != checksum(body):
        return line
    if len(fields[0]) < 5:
        return line
    kind = _kind(fields)
    try:
        if kind == "RMC" and len(fields) > 9 and len(fields[9]) == 6 and fields[9].isdigit():
            d = fields[9]
            moved = _dt.date(2000 + int(d[4:6]), int(d[2:4]), int(d[0:2])) + _dt.timedelta(days=days)
            fields[9] = moved.strftime("%d%m%y")
        elif kind == "ZDA" and len(fields) > 4 and fields[2].isdigit() and fields[3].isdigit() and fields[4].isdigit():
            moved = _dt.date(int(fields[4]), int(fields[3]), int(fields[2])) + _dt.timedelta(days=days)
            fields[2], fields[3], fields[4] = f"{moved.day:02d}", f"{moved.month:02d}", f"{moved.year:04d}"
        else:
            return line
    except (ValueError, OverflowError):
        return line
    body = ",".join(fields)
    suffix = f"*{checksum(body)}" if given is not None else ""
    return f"{lead}{body}{suffix}{tail}"


def lat_field(lat: float) -> tuple[str, str]:
    """Latitude as NMEA ``ddmm.mmmmm`` and hemisphere (5 decimals of a minute: about 2 cm, like u-blox)."""
    return _angle(abs(lat), 2), "N" if lat >= 0 else "S"


def lon_field(lon: float) -> tuple[str, str]:
    """Longitude as NMEA ``dddmm.mmmmm`` and hemisphere."""
    return _angle(abs(lon), 3), "E" if lon >= 0 else "W"


def _angle(value: float, degree_digits: int) -> str:
    ticks = round(value * 60 * 100_000)  # 1e-5 minutes
    degrees, rest = divmod(ticks, 60 * 100_000)
    minutes, frac = divmod(rest, 100_000)
    return f"{degrees:0{degree_digits}d}{minutes:02d}.{frac:05d}"


def hhmmss(utc: float) -> str:
    """UTC seconds since the epoch -> NMEA ``hhmmss.ss``."""
    centis = round(utc * 100)
    seconds, frac = divmod(centis, 100)
    stamp = _dt.datetime.fromtimestamp(seconds, _dt.timezone.utc)
    return f"{stamp:%H%M%S}.{frac:02d}"


def ddmmyy(utc: float) -> str:
    """UTC seconds since the epoch -> RMC's ``ddmmyy``."""
    return _dt.datetime.fromtimestamp(int(utc), _dt.timezone.utc).strftime("%d%m%y")
