"""NMEA 0183 framing, parsing and epoch assembly: bytes from a GPS receiver in, one fix per epoch out.

Pure: no I/O, no clock, no logging of data. :class:`NmeaDecoder` is fed raw bytes as they come off a
serial line (in reads of any size) and returns ``(utc_seconds, Fix)`` for every receiver epoch the
bytes complete. It copes with what real receivers send (see docs/gps.md):

- framing: leading garbage, NUL bytes, terminal escapes, binary protocols (UBX) between sentences,
  sentences split across reads, two sentences merged, CR / LF / CR CR LF endings, ``$`` and ``!``
  starts, over-long lines, bad or missing checksums. Every rejected piece is counted by reason in
  :attr:`NmeaDecoder.counters`; nothing raises.
- sentences RMC, GGA, GNS, GLL, GSA, GSV, VTG, GST, ZDA from any talker (GP, GN, GL, GA, GB, BD,
  GQ, QZ, GI, PQ, ...); others, and proprietary ``$P...`` sentences, are counted and skipped. The
  fields of a framed, checksum-checked RMC, GGA or GNS are read by pynmea2's sentence classes;
  those of GLL, GSA, VTG, GST and ZDA by pynmea2's field tables and converters, without building
  its objects (GSV's in-view count directly); this module checks what pynmea2 lets through (see
  :func:`_angle`).
- epochs: every sentence that carries a time of day belongs to the epoch of that time; sentences
  without one (GSA, GSV, VTG) belong to the epoch being assembled. An epoch is complete when a
  sentence with a different time arrives, when a sentence kind it already holds arrives again (a
  receiver repeating its time), or when the caller calls :meth:`NmeaDecoder.flush` (end of the
  stream, or a quiet line: the serial source calls it after ``gps.epoch_timeout_s``).
- dates: from RMC (two-digit year, 2000-2079 as gpsd does) or ZDA; GGA, GNS and GLL carry only the
  time of day and take the date of the last RMC or ZDA, moved on a day when the time of day wraps
  past midnight. An epoch whose date is unknown is counted as ``no_date`` and not returned, unless
  the caller gave a trusted reference time (:meth:`NmeaDecoder.set_reference_utc`).
- GPS week-number rollover: with ``rollover_floor_utc`` set, a receiver date before it is moved
  forward by 1024 weeks (IS-GPS-200: the week number is 10 bits) until it is not.
"""

from __future__ import annotations

import datetime as _dt
import functools
import math
import re
from pathlib import Path
from typing import Callable, Iterator

import pynmea2
from pynmea2.nmea_utils import dm_to_sd, timestamp

from agent.record import Fix

# NMEA 0183 caps a sentence at 82 characters; receivers with 8-decimal RTK positions send up to
# about 100, so reject only past this (gpsd drops over-long sentences too: merged garbage).
MAX_SENTENCE = 120
KNOTS_TO_MPS = 1852.0 / 3600.0  # 1 knot = 1 nautical mile (1852 m, by definition) per hour
KMH_TO_MPS = 1.0 / 3.6
# IS-GPS-200: the broadcast week number has 10 bits, so it wraps every 1024 weeks.
GPS_ROLLOVER_S = 1024 * 7 * 86400
HALF_DAY_MS = 12 * 3600 * 1000
DAY_MS = 24 * 3600 * 1000
_EPOCH_ORDINAL = _dt.date(1970, 1, 1).toordinal()

_DELIMITER = re.compile(rb"[$!\r\n\x00]")
_PRINTABLE = bytes(range(0x20, 0x7F))
# A whole sentence: start, printable body without "*", "*hh", trailing blanks or NULs.
_SENTENCE = re.compile(rb"[$!]([\x20-\x29\x2b-\x7e]*)\*([0-9A-Fa-f]{2})[ \t]*\Z")
# A piece of a stream: a start character and everything up to the next start or line end.
# A NUL ends a piece like a line end (receivers pad with NULs; one inside a sentence breaks it).
# The first branch is a well-formed "$" sentence, read in the same pass (groups: body and "hh";
# its characters exclude the delimiters, so the piece is the same); any other piece has no groups
# and goes through NmeaDecoder._piece.
_FRAME = re.compile(
    rb"\$([\x20\x22\x23\x25-\x29\x2b-\x7e]*)\*([0-9A-Fa-f]{2})[ \t]*(?=[$!\r\n\x00])|[$!][^$!\r\n\x00]*"
)
# How many sentence heads (address and comma) NmeaDecoder remembers the handler of: a receiver sends
# about a dozen; garbage with valid checksums must not grow the table.
MAX_ROUTES = 64
_UNROUTED = object()
_HEX = {(a + b).encode(): int(a + b, 16) for a in "0123456789abcdefABCDEF" for b in "0123456789abcdefABCDEF"}
# GGA quality digit for an FAA mode letter (NMEA 0183 4.10 mode indicator), for GNS-only epochs.
_FAA_QUALITY = {"N": 0, "A": 1, "D": 2, "P": 3, "R": 4, "F": 5, "E": 6, "M": 7, "S": 8}
# Which sentence's position an epoch keeps when they disagree and are equally precise.
_RANK_RMC, _RANK_GNS, _RANK_GGA, _RANK_GLL = 1, 2, 3, 4
_RMC_DATE = pynmea2.RMC.name_to_idx["datestamp"]


def _columns(sentence: type[pynmea2.TalkerSentence]) -> dict[str, int]:
    """pynmea2's field names of ``sentence`` -> their index in the fields split here (the address first)."""
    return {name: index + 1 for name, index in sentence.name_to_idx.items()}


# Sentences whose fields are read here by pynmea2's field tables, without building its objects.
_GLL, _GSA, _GST, _VTG, _ZDA = (
    _columns(kind) for kind in (pynmea2.GLL, pynmea2.GSA, pynmea2.GST, pynmea2.VTG, pynmea2.ZDA)
)
_GSA_SV_IDS = slice(_GSA["sv_id01"], _GSA["sv_id12"] + 1)
_GSA_SYSTEM_ID = len(pynmea2.GSA.fields) + 1  # NMEA 4.10 added it after VDOP


def checksum(body: bytes) -> int:
    """XOR of every byte of ``body`` (the characters between ``$`` and ``*``), NMEA 0183 section 5.3."""
    value = int.from_bytes(body, "little")
    size = len(body)
    while size > 128:  # fold halves together until 1024 bits are left (sentences never get here)
        half = (size + 1) // 2
        value = (value & ((1 << (8 * half)) - 1)) ^ (value >> (8 * half))
        size = half
    # Fold 1024 bits down to 8: the low bits of each step hold the XOR of all chunks of that width.
    value ^= value >> 512
    value ^= value >> 256
    value ^= value >> 128
    value ^= value >> 64
    value ^= value >> 32
    value ^= value >> 16
    value ^= value >> 8
    return value & 0xFF


def _overlong(piece: bytes) -> bool:
    """Longer than a sentence can be, trailing blanks aside (bounded, so a stream cannot grow a piece)."""
    return len(piece) > 2 * MAX_SENTENCE or len(piece.rstrip(b" \t")) > MAX_SENTENCE


def _number(value: object) -> float | None:
    """A field as pynmea2 returns it (None when empty; a float, Decimal or int when its converter
    read it; the text when it has no converter or the converter failed) -> a finite float or None."""
    if value is None:
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):  # not a number; or a Decimal signalling NaN
        return None
    return number if math.isfinite(number) else None


def _count(value: object) -> int | None:
    """A field as pynmea2 returns it -> a whole number or None (``"12"``, ``12`` and ``"12.0"`` are 12)."""
    if isinstance(value, int):
        return value
    number = _number(value)
    return int(number) if number is not None and number.is_integer() else None


def _pynmea2(sentence: type[pynmea2.TalkerSentence], body: bytes) -> pynmea2.TalkerSentence:
    """pynmea2's ``sentence`` object for a sentence body (its address and fields)."""
    fields = body.decode("ascii").split(",")
    return sentence(fields[0][:2], fields[0][2:], fields[1:])


def _field(fields: list[str], index: int) -> str:
    """Field ``index`` of a split sentence; empty when the sentence is shorter (as pynmea2 reads it)."""
    return fields[index] if index < len(fields) else ""


def _converted(read: Callable[[str], object], text: str) -> object:
    """``text`` as pynmea2 returns a field with a converter: None when empty, the text when ``read``
    fails (its ``NMEASentence.__getattr__``)."""
    if not text:
        return None
    try:
        return read(text)
    except Exception:  # pynmea2 catches everything there
        return text


def _time_of_day_ms(value: object) -> int | None:
    """pynmea2's ``timestamp`` (a ``datetime.time``; the text when it could not read ``hhmmss[.sss]``)
    -> milliseconds since midnight, fractions beyond ms truncated as gpsd does."""
    if not isinstance(value, _dt.time):
        return None
    return ((value.hour * 60 + value.minute) * 60 + value.second) * 1000 + value.microsecond // 1000


_HEMISPHERE_SIGN = {"N": 1.0, "S": -1.0, "E": 1.0, "W": -1.0}


def _field_time_of_day_ms(fields: list[str], index: int) -> int | None:
    """A ``hhmmss[.sss]`` field read by pynmea2's ``timestamp`` converter -> milliseconds since midnight."""
    return _text_time_of_day_ms(_field(fields, index))


@functools.lru_cache(maxsize=8)  # the sentences of an epoch repeat its time: read it once
def _text_time_of_day_ms(text: str) -> int | None:
    return _time_of_day_ms(_converted(timestamp, text))


def _angle(text: str, hemi: str, hemispheres: tuple[str, str], max_degrees: int) -> float | None:
    """NMEA ``dddmm.mmmm`` + hemisphere -> signed degrees; None when empty or impossible.

    pynmea2's ``dm_to_sd`` reads the number. Its ``latitude``/``longitude`` properties are not used:
    they put a missing or unknown hemisphere on the equator or the meridian (0.0), and nothing of
    pynmea2 rejects 60 or more minutes or more than 90 / 180 degrees.
    """
    if not text or hemi not in hemispheres:
        return None
    try:
        degrees = dm_to_sd(text)
    except ValueError:  # not digits, two of minutes, a point and decimals
        return None
    dot = text.find(".")
    if degrees > max_degrees or (dot >= 2 and float(text[dot - 2:]) >= 60.0):
        return None
    return degrees * _HEMISPHERE_SIGN[hemi]


def _position(
    text: str, lat_dir: str, lon_text: str, lon_dir: str, rank: int
) -> tuple[float, float, int] | None:
    """A sentence's latitude and longitude fields, with a rank: more digits rank higher, then the
    sentence's own ``rank``."""
    position = _lat_lon(text, lat_dir, lon_text, lon_dir)
    return None if position is None else (position[0], position[1], position[2] * 8 + rank)


@functools.lru_cache(maxsize=8)  # RMC, GGA and GLL of an epoch mostly repeat the same text: read it once
def _lat_lon(text: str, lat_dir: str, lon_text: str, lon_dir: str) -> tuple[float, float, int] | None:
    """Latitude and longitude fields -> (lat, lon, decimals of the latitude's minutes), or None."""
    lat = _angle(text, lat_dir, ("N", "S"), 90)
    lon = _angle(lon_text, lon_dir, ("E", "W"), 180)
    if lat is None or lon is None:
        return None
    dot = text.find(".")
    return lat, lon, len(text) - dot - 1 if dot >= 0 else 0


@functools.lru_cache(maxsize=4)  # the same every epoch but at midnight
def _rmc_date(text: str) -> int | None:
    """RMC's ``ddmmyy`` -> a date ordinal; the two-digit year is 2000-2079, else 1980-1999 (gpsd's
    window: GPS time began in 1980).

    Read here, not by pynmea2's ``datestamp``: that is strptime's ``%y``, which puts 69-79 in
    1969-1979, and strptime was the dearest part of the port at 10 Hz (4.6 us warm, about 90 us
    on its first call of an epoch; docs/gps.md, "Choices").
    """
    if len(text) != 6 or not text.isdigit():
        return None
    yy = int(text[4:6])
    return _date_ordinal(int(text[0:2]), int(text[2:4]), 2000 + yy if yy < 80 else 1900 + yy)


@functools.lru_cache(maxsize=4)
def _date_ordinal(day: int, month: int, year: int) -> int | None:
    try:
        return _dt.date(year, month, day).toordinal()
    except (ValueError, OverflowError):  # OverflowError: a ZDA day or month beyond a C long
        return None


def invalid_reason(fix: Fix) -> str | None:
    """Why the receiver itself marks ``fix`` invalid (RMC/GLL status V, GGA quality 0, GSA mode 1,
    FAA mode N), or None when it does not."""
    if fix.status == "V":
        return "invalid_status"
    if fix.quality == 0:
        return "invalid_quality"
    if fix.mode == 1:
        return "invalid_mode"
    if fix.faa_mode == "N":
        return "invalid_faa"
    return None


class _Epoch:
    """What the sentences of one receiver epoch said so far."""

    __slots__ = (
        "tod_ms", "date_ord", "kinds", "lat", "lon", "pos_rank", "alt_m", "geoid_sep_m", "speed_mps",
        "course_deg", "quality", "hdop", "pdop", "vdop", "sats_used", "gsa_sats", "in_view", "mode",
        "status", "faa_mode", "lat_err_m", "lon_err_m", "alt_err_m",
    )

    def __init__(self, tod_ms: int | None, date_ord: int | None) -> None:
        self.tod_ms = tod_ms
        self.date_ord = date_ord
        self.kinds: set[bytes] = set()  # the addresses (talker and type) of its sentences
        self.lat: float | None = None
        self.lon: float | None = None
        self.pos_rank = 0
        self.alt_m = self.geoid_sep_m = self.speed_mps = self.course_deg = None
        self.quality = self.sats_used = self.mode = None
        self.hdop = self.pdop = self.vdop = None
        self.gsa_sats: set[tuple[str, str]] = set()
        self.in_view: dict[bytes, int] = {}  # talker -> satellites in view (GSV field 3)
        self.status = self.faa_mode = None
        self.lat_err_m = self.lon_err_m = self.alt_err_m = None

    def set_position(self, position: tuple[float, float, int] | None) -> None:
        # Several sentences repeat the position; keep the most precise one (receivers that round
        # RMC send more digits in GGA), and among equals the later in a cycle (GLL, GGA, GNS, RMC):
        # a multiplexer feeding sentences of different seconds has its freshest position last.
        if position is not None and position[2] > self.pos_rank:
            self.lat, self.lon, self.pos_rank = position

    def fix(self) -> Fix:
        sats_used = self.sats_used
        if sats_used is None and self.gsa_sats:
            sats_used = len(self.gsa_sats)
        return Fix(
            lat=self.lat, lon=self.lon, alt_m=self.alt_m, speed_mps=self.speed_mps, course_deg=self.course_deg,
            quality=self.quality, hdop=self.hdop, sats_used=sats_used, mode=self.mode,
            geoid_sep_m=self.geoid_sep_m, pdop=self.pdop, vdop=self.vdop,
            sats_in_view=sum(self.in_view.values()) if self.in_view else None,
            status=self.status, faa_mode=self.faa_mode,
            lat_err_m=self.lat_err_m, lon_err_m=self.lon_err_m, alt_err_m=self.alt_err_m,
        )


class NmeaDecoder:
    """Bytes from one receiver in, ``(utc_seconds, Fix)`` per completed epoch out. Never raises on input.

    ``allow_missing_checksum`` accepts sentences without ``*hh`` (receivers that never send one);
    ``rollover_floor_utc`` (Unix seconds) moves receiver dates before it forward by 1024 weeks.
    """

    def __init__(self, allow_missing_checksum: bool = False, rollover_floor_utc: float | None = None) -> None:
        self.allow_missing_checksum = allow_missing_checksum
        self.rollover_floor_utc = rollover_floor_utc
        self.counters: dict[str, int] = {
            "sentences": 0, "epochs": 0, "bad_checksum": 0, "missing_checksum": 0, "overlong": 0,
            "garbage": 0, "unparsable": 0, "ignored": 0, "no_position": 0, "no_date": 0, "rollover": 0,
        }
        self._tail = b""
        self._skipping = False  # inside an over-long piece: drop bytes until the next delimiter
        self._epoch: _Epoch | None = None
        self._date_ord: int | None = None  # the date the receiver last told us, moved at midnight
        self._last_tod: int | None = None
        self._reference_ms: int | None = None
        # Sentence type -> its handler, called with the address (talker and type) and the body.
        self._handlers: dict[str, Callable[[bytes, bytes, list], None]] = {
            "RMC": self._rmc, "GGA": self._gga, "GNS": self._gns, "GLL": self._gll, "GSA": self._gsa,
            "GSV": self._gsv, "VTG": self._vtg, "GST": self._gst, "ZDA": self._zda,
        }
        self._routes: dict[bytes, Callable[[bytes, bytes, list], None] | None] = {}  # see _route

    # ---- public -------------------------------------------------------------------------------

    def set_reference_utc(self, utc: float | None) -> None:
        """A trusted wall-clock time (Unix seconds), used only to date epochs no RMC or ZDA dated."""
        self._reference_ms = None if utc is None else int(utc * 1000)

    def feed(self, data: bytes) -> list[tuple[float, Fix]]:
        """Consume ``data`` (any slice of the stream); return the fixes of the epochs it completed."""
        out: list[tuple[float, Fix]] = []
        if self._skipping:
            found = _DELIMITER.search(data)
            if found is None:
                return out
            data = data[found.start():]
            self._skipping = False
        buf = self._tail + data if self._tail else data
        self._tail = b""
        end = len(buf)
        counters = self.counters
        for match in _FRAME.finditer(buf):
            body, hexsum = match.group(1, 2)
            if body is not None and match.end() - match.start() <= MAX_SENTENCE:
                # A well-formed sentence (the common case, judged here without _piece).
                if checksum(body) == _HEX[hexsum]:
                    self._sentence(body, True, out)
                else:
                    counters["bad_checksum"] += 1
            elif match.end() == end:  # not terminated yet: wait for more bytes
                piece = match.group()
                if _overlong(piece):
                    counters["overlong"] += 1
                    self._skipping = True
                else:
                    self._tail = piece
                break
            else:
                self._piece(match.group(), out)
        return out

    def flush(self) -> list[tuple[float, Fix]]:
        """End of stream or a quiet line: complete the epoch being assembled (a partial line is kept)."""
        out: list[tuple[float, Fix]] = []
        self._complete(out)
        return out

    # ---- framing ------------------------------------------------------------------------------

    def _piece(self, piece: bytes, out: list) -> None:
        if len(piece) > MAX_SENTENCE and _overlong(piece):
            self.counters["overlong"] += 1
            return
        match = _SENTENCE.match(piece)
        if match is not None:
            body = match.group(1)
            if checksum(body) != _HEX[match.group(2)]:
                self.counters["bad_checksum"] += 1
                return
        else:
            body = piece.rstrip(b" \t")[1:]
            if b"*" in body or body.translate(None, _PRINTABLE):
                self.counters["garbage"] += 1  # a malformed checksum, control or binary bytes
                return
            if not self.allow_missing_checksum:
                self.counters["missing_checksum" if len(body) > 5 and b"," in body else "garbage"] += 1
                return
        self._sentence(body, piece[:1] == b"$", out)

    def _sentence(self, body: bytes, dollar: bool, out: list) -> None:
        """A framed sentence whose checksum passed: ``body`` is what lies between the start and ``*``."""
        head = body[:6]  # the address and the comma after it
        handler = self._routes.get(head, _UNROUTED) if dollar else None
        if handler is _UNROUTED:
            handler = self._route(head)
        if handler is None:
            self.counters["ignored"] += 1
            return
        self.counters["sentences"] += 1
        try:
            handler(body[:5], body, out)
        except ValueError:  # pynmea2.ParseError is one; its field readers mostly return the text instead
            self.counters["unparsable"] += 1

    def _route(self, head: bytes) -> Callable[[bytes, bytes, list], None] | None:
        """The handler for sentences starting ``head`` (their first six characters), remembered for
        the first :data:`MAX_ROUTES` heads seen. Proprietary ($P...) and unknown sentences have none;
        Quectel's "PQ" talker sends standard sentences (PQGSV) next to its proprietary ones (PQVERNO)."""
        address = head.split(b",")[0].decode("ascii")
        handler = None
        if len(address) == 5 and (address[0] != "P" or address[1] == "Q"):
            handler = self._handlers.get(address[2:])
        if len(self._routes) < MAX_ROUTES:
            self._routes[head] = handler
        return handler

    # ---- epochs -------------------------------------------------------------------------------

    def _epoch_for(self, kind: bytes, tod_ms: int | None, out: list) -> _Epoch:
        """The epoch a sentence of ``kind`` (its address: talker and type) with time of day ``tod_ms``
        (None: untimed) belongs to.

        A timed sentence kind (RMC, GGA, ...) seen again with the same time is a new epoch of a
        receiver repeating its time; an untimed one (VTG, GSA) seen again is merged (multiplexers
        duplicate sentences).
        """
        epoch = self._epoch
        if tod_ms is not None:
            if epoch is not None and (
                (epoch.tod_ms is not None and epoch.tod_ms != tod_ms) or kind in epoch.kinds
            ):
                self._complete(out)  # with the date it had: the new time may be past midnight
                epoch = None
            self._advance_date(tod_ms)
            if epoch is None:
                epoch = self._epoch = _Epoch(tod_ms, None)
            elif epoch.tod_ms is None:
                epoch.tod_ms = tod_ms
        elif epoch is None:
            epoch = self._epoch = _Epoch(None, None)
        epoch.kinds.add(kind)
        return epoch

    def _advance_date(self, tod_ms: int) -> None:
        # The time of day jumping back by more than half a day is midnight (gpsd moves the day when
        # the hour decreases; a receiver stepping its clock back an hour is not a new day).
        if self._last_tod is not None and self._date_ord is not None and tod_ms < self._last_tod - HALF_DAY_MS:
            self._date_ord += 1
        self._last_tod = tod_ms

    def _set_date(self, epoch: _Epoch, date_ord: int) -> None:
        epoch.date_ord = date_ord
        self._date_ord = date_ord

    def _complete(self, out: list) -> None:
        epoch, self._epoch = self._epoch, None
        if epoch is None or epoch.tod_ms is None:
            return
        self.counters["epochs"] += 1
        if epoch.lat is None:
            self.counters["no_position"] += 1
            return
        date_ord = epoch.date_ord if epoch.date_ord is not None else self._date_ord
        if date_ord is not None:
            utc_ms = (date_ord - _EPOCH_ORDINAL) * DAY_MS + epoch.tod_ms
        elif self._reference_ms is not None:
            # Nearest day to the trusted clock that has this time of day.
            ref = self._reference_ms
            utc_ms = ref - ref % DAY_MS + epoch.tod_ms
            if utc_ms - ref > HALF_DAY_MS:
                utc_ms -= DAY_MS
            elif ref - utc_ms > HALF_DAY_MS:
                utc_ms += DAY_MS
            # From here the receiver's own time of day carries the date on, across midnight too.
            self._date_ord = _EPOCH_ORDINAL + utc_ms // DAY_MS
        else:
            self.counters["no_date"] += 1
            return
        if self.rollover_floor_utc is not None and utc_ms < self.rollover_floor_utc * 1000:
            self.counters["rollover"] += 1
            while utc_ms < self.rollover_floor_utc * 1000:
                utc_ms += GPS_ROLLOVER_S * 1000
        out.append((utc_ms / 1000.0, epoch.fix()))

    # ---- sentences (NMEA 0183 4.10 layouts) ------------------------------------------------------
    # RMC, GGA and GNS are read by pynmea2's sentence classes, built from the fields split here rather
    # than by pynmea2.parse: parse would check the checksum again (7.5 us a sentence here; the whole
    # decoder took 6 us a sentence before the port) and reads Quectel's PQGSV as a proprietary "PQGS"
    # sentence. The others are read by position from pynmea2's field tables with its converters:
    # building its objects for them was a third of the decoder's time at 10 Hz (BENCHMARKS.md).

    def _rmc(self, address: bytes, body: bytes, out: list) -> None:
        s = _pynmea2(pynmea2.RMC, body)
        tod = _time_of_day_ms(s.timestamp)
        if tod is None:
            self.counters["unparsable"] += 1
            return
        epoch = self._epoch_for(address, tod, out)
        status = s.status or None
        epoch.status = status
        if s.mode_indicator:
            epoch.faa_mode = s.mode_indicator[0]
        if status in ("A", "D"):
            date_ord = _rmc_date(s.data[_RMC_DATE]) if len(s.data) > _RMC_DATE else None
            if date_ord is not None:
                self._set_date(epoch, date_ord)
        epoch.set_position(_position(s.lat, s.lat_dir, s.lon, s.lon_dir, _RANK_RMC))
        speed = _number(s.spd_over_grnd)
        if speed is not None:
            epoch.speed_mps = speed * KNOTS_TO_MPS
        course = _number(s.true_course)
        if course is not None:
            epoch.course_deg = course

    def _gga(self, address: bytes, body: bytes, out: list) -> None:
        s = _pynmea2(pynmea2.GGA, body)
        tod = _time_of_day_ms(s.timestamp)
        if tod is None:
            self.counters["unparsable"] += 1
            return
        epoch = self._epoch_for(address, tod, out)
        epoch.quality = _count(s.gps_qual)
        epoch.set_position(_position(s.lat, s.lat_dir, s.lon, s.lon_dir, _RANK_GGA))
        epoch.sats_used = _count(s.num_sats)
        hdop = _number(s.horizontal_dil)
        if hdop is not None and hdop < 99.0:  # 99.99 means "unknown" on several receivers
            epoch.hdop = hdop
        epoch.alt_m = _number(s.altitude)
        epoch.geoid_sep_m = _number(s.geo_sep)

    def _gns(self, address: bytes, body: bytes, out: list) -> None:
        s = _pynmea2(pynmea2.GNS, body)
        tod = _time_of_day_ms(s.timestamp)
        if tod is None:
            self.counters["unparsable"] += 1
            return
        epoch = self._epoch_for(address, tod, out)
        modes = s.mode_indicator
        if modes:
            # One letter per constellation (GPS, GLONASS, Galileo, BeiDou, ...): the fix is as good
            # as the first constellation that has one.
            epoch.faa_mode = next((mode for mode in modes if mode != "N"), "N")
            if epoch.quality is None:
                epoch.quality = _FAA_QUALITY.get(epoch.faa_mode)
        epoch.set_position(_position(s.lat, s.lat_dir, s.lon, s.lon_dir, _RANK_GNS))
        if epoch.sats_used is None:
            epoch.sats_used = _count(s.num_sats)
        if epoch.hdop is None:
            epoch.hdop = _number(s.hdop)
        if epoch.alt_m is None:
            epoch.alt_m = _number(s.altitude)
        if epoch.geoid_sep_m is None:
            epoch.geoid_sep_m = _number(s.geo_sep)

    def _gll(self, address: bytes, body: bytes, out: list) -> None:
        f = body.decode("ascii").split(",")
        epoch = self._epoch_for(address, _field_time_of_day_ms(f, _GLL["timestamp"]), out)
        status = _field(f, _GLL["status"]) or None
        if epoch.status is None:
            epoch.status = status
        faa_mode = _field(f, _GLL["faa_mode"])
        if faa_mode and epoch.faa_mode is None:
            epoch.faa_mode = faa_mode[0]
        if status == "A":
            epoch.set_position(_position(
                _field(f, _GLL["lat"]), _field(f, _GLL["lat_dir"]), _field(f, _GLL["lon"]),
                _field(f, _GLL["lon_dir"]), _RANK_GLL,
            ))

    def _gsa(self, address: bytes, body: bytes, out: list) -> None:
        f = body.decode("ascii").split(",")
        epoch = self._epoch_for(address, None, out)
        mode = _count(_field(f, _GSA["mode_fix_type"]))
        if mode in (1, 2, 3):
            epoch.mode = mode if epoch.mode is None else max(epoch.mode, mode)
        # The NMEA 4.10 system id follows pynmea2's fields: PRNs repeat across constellations.
        system = _field(f, _GSA_SYSTEM_ID)
        for sv in f[_GSA_SV_IDS]:
            if sv:
                epoch.gsa_sats.add((f[0][:2] + system, sv))
        # pynmea2 has no converter for the DOPs: its attributes are the text.
        pdop, hdop, vdop = (_number(_field(f, _GSA[name])) for name in ("pdop", "hdop", "vdop"))
        if pdop is not None:
            epoch.pdop = pdop
        if hdop is not None and epoch.hdop is None:
            epoch.hdop = hdop
        if vdop is not None:
            epoch.vdop = vdop

    def _gsv(self, address: bytes, body: bytes, out: list) -> None:
        # GSV,total,number,in_view,...: only the in-view count is used (12 of a multi-constellation
        # receiver's 23 sentences an epoch), so only the fields up to it are split off. NMEA 4.10
        # receivers send one group per signal (L1, L5, ...) with the same satellites: the largest
        # count per talker.
        epoch = self._epoch_for(address, None, out)
        f = body.split(b",", 4)
        count = _count(f[3].decode("ascii")) if len(f) > 3 else None
        talker = address[:2]
        if count is not None and count > epoch.in_view.get(talker, -1):
            epoch.in_view[talker] = count

    def _vtg(self, address: bytes, body: bytes, out: list) -> None:
        f = body.decode("ascii").split(",")
        # _number(text) is _number of what pynmea2's float or Decimal converter returns: the
        # converted value when it reads the text, else the text, which float() cannot read either.
        epoch = self._epoch_for(address, None, out)
        faa_mode = _field(f, _VTG["faa_mode"])
        if faa_mode and epoch.faa_mode is None:
            epoch.faa_mode = faa_mode[0]
        if epoch.course_deg is None:
            epoch.course_deg = _number(_field(f, _VTG["true_track"]))
        if epoch.speed_mps is None:
            knots = _number(_field(f, _VTG["spd_over_grnd_kts"]))
            if knots is not None:
                epoch.speed_mps = knots * KNOTS_TO_MPS
            else:
                kmh = _number(_field(f, _VTG["spd_over_grnd_kmph"]))
                epoch.speed_mps = None if kmh is None else kmh * KMH_TO_MPS

    def _gst(self, address: bytes, body: bytes, out: list) -> None:
        f = body.decode("ascii").split(",")
        # 1-sigma errors in metres
        epoch = self._epoch_for(address, _field_time_of_day_ms(f, _GST["timestamp"]), out)
        epoch.lat_err_m = _number(_field(f, _GST["std_dev_latitude"]))
        epoch.lon_err_m = _number(_field(f, _GST["std_dev_longitude"]))
        epoch.alt_err_m = _number(_field(f, _GST["std_dev_altitude"]))

    def _zda(self, address: bytes, body: bytes, out: list) -> None:
        f = body.decode("ascii").split(",")
        tod = _field_time_of_day_ms(f, _ZDA["timestamp"])
        day, month, year = (_converted(int, _field(f, _ZDA[name])) for name in ("day", "month", "year"))
        if tod is None or day is None or month is None or year is None:
            return  # receivers without lock send ZDA with empty fields
        epoch = self._epoch_for(address, tod, out)
        day, month, year = _count(day), _count(month), _count(year)
        if day is not None and month is not None and year is not None and 1980 <= year <= 2200:
            date_ord = _date_ordinal(day, month, year)
            if date_ord is not None:
                self._set_date(epoch, date_ord)


def decode_file(
    path: str | Path, allow_missing_checksum: bool = False, rollover_floor_utc: float | None = None
) -> Iterator[tuple[float, Fix]]:
    """Every fix of an NMEA capture, in order, with the capture's own dates; ``#`` lines are comments.

    Raises OSError when the file cannot be read.
    """
    decoder = NmeaDecoder(allow_missing_checksum=allow_missing_checksum, rollover_floor_utc=rollover_floor_utc)
    return iter_file(path, decoder)


def iter_file(path: str | Path, decoder: NmeaDecoder) -> Iterator[tuple[float, Fix]]:
    """Feed the capture at ``path`` through ``decoder`` (whose counters the caller may read afterwards)."""
    with open(path, "rb") as stream:
        for line in stream:
            if line.startswith(b"#"):
                continue
            yield from decoder.feed(line)
    yield from decoder.feed(b"\n")  # a last line without its line ending still counts
    yield from decoder.flush()
