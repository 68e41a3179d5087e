"""Wire format v2: per-kind columnar batches of scaled, delta-coded integers in msgpack, deflated.

docs/wire-format.md specifies it byte by byte; this module and ``decoders/js`` are two independent
implementations of that text, checked against each other on ``tests/golden/wire``.

Each field of each kind becomes one column. A float column is turned into integers at a scale the
encoder chooses among the field's candidates (the coarsest at which every value survives at the
field's stated resolution: real NMEA carries positions in 1e-4 arc-minutes and speeds in 0.1 knot,
which no decimal scale captures), delta-coded to order 0, 1 or 2, divided by the greatest common
divisor of the differences, and written as msgpack integers. Values no scale can carry (NaN,
infinities, magnitudes past 2**50) travel as raw float64. ``mono`` (the device's monotonic clock)
is not sent: it means nothing off the device, and decoded records carry ``mono = 0.0``.

The msgpack body is compressed with raw DEFLATE (RFC 1951) behind a one-byte version prefix. zstd
was measured too (bench/bench_wire.py): on 60-record batches its frame header costs more than its
better entropy coding gains, and DEFLATE is in every language's standard library.
"""

from __future__ import annotations

import math
import struct
import zlib
from fractions import Fraction
from functools import lru_cache
from itertools import accumulate, compress, repeat, takewhile
from operator import attrgetter, floordiv, mod, mul, not_, sub, truediv
from typing import Any, Sequence, Union

import msgspec
from msgspec.structs import astuple

from agent.record import Event, Fix, Record, Scalar, Signal, Status
from agent.wire.codec import Batch, WireError

VERSION = 2
CONTENT_TYPE = "application/vnd.telematics.batch.v2"
# The first byte of every v2 payload: the format version (v1 payloads start with zlib's 0x78).
PREFIX = bytes([VERSION])
# A decompressed batch larger than this is refused (a few bytes of DEFLATE can expand a thousandfold).
MAX_DECOMPRESSED = 16 * 1024 * 1024
# DEFLATE level 9: on 60-record bodies (about 700 bytes) it costs about 1 us per record more than 6.
LEVEL = 9
# Raw DEFLATE (no zlib header or Adler-32: MQTT runs over TCP, which already detects corruption).
WBITS = -15
# Scaled integers and their first and second differences stay within 2**52, so a decoder working in
# IEEE doubles (JavaScript's Number) reconstructs them exactly.
MAX_INT = 2**50
# More records than this in one section is refused: trailing zeros are implied, so a small payload
# could otherwise claim billions of records.
MAX_RECORDS = 65536


class _Spec(msgspec.Struct, frozen=True):
    """How one float field becomes integers: ``resolution`` units per unit (None: bit-exact)."""

    resolution: int | None
    candidates: tuple[float, ...]  # scales to try, coarsest first
    modulus: float = 0  # the field wraps at this value (360 degrees for a course)


_KNOT = 1852 / 3600  # m/s per knot (the international nautical mile is 1852 m)
_ARCMIN = 60.0  # arc-minutes per degree
SPEC_DEGREES = _Spec(10**7, (_ARCMIN * 1e3, _ARCMIN * 1e4, _ARCMIN * 1e5, 10**7))
SPEC_UTC = _Spec(1000, (1000,))
SPEC_CM = _Spec(100, (10, 100))
SPEC_SPEED = _Spec(100, (10 / _KNOT, 100))
SPEC_COURSE = _Spec(100, (10, 100), modulus=360)
SPEC_EXACT = _Spec(None, tuple(10**k for k in range(10)))

# The fix section's number columns after seq and utc, in wire order (docs/wire-format.md, "Fix
# columns"): a _Spec for a float field, None for an integer field.
FIX_NUMBERS: tuple[tuple[str, _Spec | None], ...] = (
    ("lat", SPEC_DEGREES),
    ("lon", SPEC_DEGREES),
    ("alt_m", SPEC_CM),
    ("speed_mps", SPEC_SPEED),
    ("course_deg", SPEC_COURSE),
    ("quality", None),
    ("hdop", SPEC_CM),
    ("sats_used", None),
    ("mode", None),
    ("geoid_sep_m", SPEC_CM),
    ("pdop", SPEC_CM),
    ("vdop", SPEC_CM),
    ("sats_in_view", None),
    ("lat_err_m", SPEC_CM),
    ("lon_err_m", SPEC_CM),
    ("alt_err_m", SPEC_CM),
)
# The fix section's text columns, in wire order.
FIX_TEXTS = ("status", "faa_mode")
_FIX_FIELDS = ("seq", "utc") + tuple(name for name, _ in FIX_NUMBERS) + FIX_TEXTS
_SEQ_UTC = attrgetter("seq", "utc")
# Every field of a Fix travels (tests/test_wire_v2.py checks): a field added to agent/record.py
# needs a column here, appended at the end of FIX_NUMBERS or FIX_TEXTS so older payloads still decode.
_FIX_STRUCT_FIELDS = tuple(f.name for f in msgspec.structs.fields(Fix))


# --- The msgpack body (decoding side: msgspec validates types and shapes in C) --------------------


class _Col(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    data: Union[list[int], bytes]
    order: int = 0
    gcd: int = 1
    scale: Union[int, float] = 1
    present: Union[bytes, None] = None
    modulus: int = 0


class _Fixes(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    n: int
    columns: list[Union[_Col, None]]  # seq, utc, then FIX_NUMBERS in order
    texts: list[Union[list[Union[str, None]], str, None]] = []  # FIX_TEXTS in order


class _Series(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    name: str
    unit: Union[str, None]
    source: Union[str, None]
    n: int
    seq: _Col
    utc: _Col
    value: Union[_Col, None] = None


class _Events(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    n: int
    seq: _Col
    utc: _Col
    type: list[str]
    attrs: list[dict[str, Scalar]]
    lat: Union[_Col, None] = None
    lon: Union[_Col, None] = None


class _Statuses(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    n: int
    seq: _Col
    utc: _Col
    type: list[str]
    attrs: list[dict[str, Scalar]]


class _Body(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    v: int
    device: str
    fixes: Union[_Fixes, None] = None
    signals: list[_Series] = []
    events: Union[_Events, None] = None
    status: Union[_Statuses, None] = None


_body_decoder = msgspec.msgpack.Decoder(_Body)
_encoder = msgspec.msgpack.Encoder()


# --- Encoding -------------------------------------------------------------------------------------


def _trim(items: list[Any], defaults: tuple[Any, ...], keep: int = 1) -> list[Any]:
    """Drop trailing items equal to their defaults (the spec lets a decoder fill them in), keeping ``keep``."""
    end = len(items)
    while end > keep and items[end - 1] == defaults[end - 1] and type(items[end - 1]) is type(defaults[end - 1]):
        end -= 1
    return items[:end]


_COL_DEFAULTS = (None, 0, 1, 1, None, 0)
_TRAILING_NONE = (None,) * 32


def _bitmap(flags: list[bool]) -> bytes:
    """Bit i of the bitmap (LSB first within each byte) is ``flags[i]``."""
    return bytes(sum(1 << j for j, flag in enumerate(flags[i : i + 8]) if flag) for i in range(0, len(flags), 8))


def _present(values: list[Any]) -> tuple[list[Any], bytes | None] | None:
    """The present values and a presence bitmap (None when all are present); None when none is."""
    if None not in values:
        return values, None
    flags = [v is not None for v in values]
    if not any(flags):
        return None
    return list(compress(values, flags)), _bitmap(flags)


def _int_col(ints: list[int], present: bytes | None, scale: int | float = 1, modulus: int = 0) -> list[Any]:
    """A column of integers: the delta order and common divisor that make the smallest numbers."""
    if len(ints) > 1 and ints.count(ints[0]) == len(ints):  # constant (often): what the search below finds
        return _trim([[ints[0]] if ints[0] else [], 1 if ints[0] else 0, 1, scale, present, modulus], _COL_DEFAULTS)
    # Differences of order 0, 1 and 2 after the items an order keeps (its first `order` items).
    tails = [ints[1:]]
    if len(ints) > 1:
        d1 = list(map(sub, tails[0], ints))
        if modulus:  # first differences wrap into [-modulus/2, modulus/2)
            half = modulus // 2
            d1 = [(d + half) % modulus - half for d in d1]
        tails.append(d1)
        if len(ints) > 2:
            tails.append([d1[0]] + list(map(sub, d1[1:], d1)))
    best = (math.inf, 0, 1)
    for order, tail in enumerate(tails):
        gcd = math.gcd(*tail) or 1
        cost = sum(map(abs, tail)) / gcd
        if cost < best[0]:
            best = (cost, order, gcd)
        if not cost:  # all differences zero: nothing can beat it
            break
    _, order, gcd = best
    tail = tails[order] if gcd == 1 else list(map(floordiv, tails[order], repeat(gcd)))
    data = ints[:1] + tail
    zeros = len(list(takewhile(not_, reversed(data))))  # trailing zeros are implied
    return _trim([data[: len(data) - zeros], order, gcd, scale, present, modulus], _COL_DEFAULTS)


def _checked_ints(values: list[Any], field: str) -> list[int]:
    if not set(map(type, values)) <= {int, bool} or min(values) < -MAX_INT or max(values) > MAX_INT:
        bad = next(v for v in values if type(v) not in (int, bool) or not -MAX_INT <= v <= MAX_INT)
        raise WireError(f"v2: {field} must be an integer within +-2**50, got {bad!r}")
    return values


def _ints_column(values: list[Any], field: str) -> list[Any] | None:
    found = _present(values)
    if found is None:
        return None
    ints, present = found
    return _int_col(_checked_ints(ints, field), present)


@lru_cache(maxsize=None)
def _ratio(res: int, scale: int) -> tuple[int, int]:
    """res / scale in lowest terms (numerator, denominator)."""
    ratio = Fraction(res, scale)
    return ratio.numerator, ratio.denominator


def _scaled(floats: list[float], target: list[int] | None, spec: _Spec, scale: float) -> list[int] | None:
    """The values as integers at ``scale`` when that keeps every one (at the resolution, or bit for bit)."""
    first = floats[0]
    if target is None:  # no stated resolution: every value must come back bit for bit
        if round(first * scale) / scale != first:
            return None
        ints = list(map(round, map(mul, floats, repeat(scale))))
        return ints if list(map(truediv, ints, repeat(scale))) == floats else None
    res = spec.resolution
    if scale == res:
        return target
    if float(scale).is_integer():
        # Exact rational arithmetic on the values at the resolution, t = k * res / scale = k * p / q.
        p, q = _ratio(res, int(scale))
        if q == 1:
            return None if any(map(mod, target, repeat(p))) else list(map(floordiv, target, repeat(p)))
        t0 = target[0]
        if (2 * ((2 * t0 * q + p) // (2 * p)) * p + q) // (2 * q) != t0:  # the first value rules most scales out
            return None
        ints = [(2 * t * q + p) // (2 * p) for t in target]  # round(t * q / p), ties up: `back` decides
        back = [(2 * k * p + q) // (2 * q) for k in ints]  # round(k * p / q): no tie, as q (3) is odd
        return ints if back == target else None
    if round(round(first * scale) / scale * res) != target[0]:  # the first value rules most scales out
        return None
    ints = list(map(round, map(mul, floats, repeat(scale))))
    back = map(round, map(mul, map(truediv, ints, repeat(scale)), repeat(res)))
    return ints if list(back) == target else None


def _float_column(values: list[Any], spec: _Spec) -> list[Any] | None:
    """Scaled integers at the coarsest candidate scale that keeps every value; raw float64 otherwise."""
    found = _present(values)
    if found is None:
        return None
    floats, present = found
    biggest = max(map(abs, floats))
    res = spec.resolution
    # NaN slips through max() but not sum(); scaled magnitudes past MAX_INT cannot travel as integers.
    if math.isfinite(biggest) and not math.isnan(sum(floats)) and biggest * (res or 1) <= MAX_INT:
        target = None if res is None else list(map(round, map(mul, floats, repeat(res))))
        for scale in spec.candidates:  # ascending
            if biggest * scale > MAX_INT:
                break
            ints = _scaled(floats, target, spec, scale)
            if ints is None:
                continue
            modulus = 0
            if spec.modulus and min(ints) >= 0 and max(ints) < spec.modulus * scale:
                modulus = round(spec.modulus * scale)
            return _int_col(ints, present, int(scale) if float(scale).is_integer() else scale, modulus)
    return _trim([struct.pack(f">{len(floats)}d", *floats), 0, 1, 1, present], _COL_DEFAULTS)


def _seq_utc(records: list[Record]) -> list[Any]:
    """The record count, then the seq and utc columns every section starts with."""
    seqs, times = map(list, zip(*map(_SEQ_UTC, records)))
    return [len(records), _ints_column(seqs, "seq"), _float_column(times, SPEC_UTC)]


def _fix_section(fixes: list[Record]) -> list[Any]:
    by_field = dict(zip(_FIX_STRUCT_FIELDS, map(list, zip(*(astuple(r.data) for r in fixes)))))  # transposed in C
    n, *columns = _seq_utc(fixes)
    for name, spec in FIX_NUMBERS:
        values = by_field[name]
        columns.append(_ints_column(values, name) if spec is None else _float_column(values, spec))
    texts = [_text_column(by_field[name]) for name in FIX_TEXTS]
    section = [n, _trim(columns, _TRAILING_NONE, keep=2), _trim(texts, _TRAILING_NONE, keep=0)]
    return _trim(section, (None, None, []), keep=2)


def _text_column(values: list[str | None]) -> list[str | None] | str | None:
    """One string when every record has the same one (None when all are absent), else the list."""
    first = values[0]
    return first if values.count(first) == len(values) else values


def _check_attrs(attrs: dict[str, Scalar]) -> dict[str, Scalar]:
    if "__proto__" in attrs:  # JavaScript decoders refuse it (prototype pollution): docs/wire-format.md
        raise WireError("v2: an attribute may not be named __proto__")
    for key, value in attrs.items():
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**53 - 1:
            raise WireError(f"v2: attribute {key!r} = {value} is beyond +-(2**53 - 1), which JSON numbers cannot hold")
    return attrs


def encode(device_id: str, records: Sequence[Record]) -> bytes:
    """Encode one batch; raises :class:`WireError` for a record without ``seq`` or an out-of-range integer."""
    fixes: list[Record] = []
    series: dict[tuple[str, str | None, str | None], list[Record]] = {}
    events: list[Record] = []
    statuses: list[Record] = []
    for record in records:
        data = record.data
        if record.seq is None:
            raise WireError("every record of a batch needs its sequence number (assigned by the buffer)")
        if type(data) is Fix:
            fixes.append(record)
        elif type(data) is Signal:
            series.setdefault((data.name, data.unit, data.source), []).append(record)
        elif type(data) is Event:
            events.append(record)
        else:
            statuses.append(record)
    body: list[Any] = [VERSION, device_id, None, [], None, None]
    if fixes:
        body[2] = _fix_section(fixes)
    body[3] = [
        [name, unit, source, *_seq_utc(rs), _float_column([r.data.value for r in rs], SPEC_EXACT)]
        for (name, unit, source), rs in series.items()
    ]
    if events:
        e = [r.data for r in events]
        body[4] = _trim(
            _seq_utc(events)
            + [
                [d.type for d in e],
                [_check_attrs(d.attrs) for d in e],
                _float_column([d.lat for d in e], SPEC_DEGREES),
                _float_column([d.lon for d in e], SPEC_DEGREES),
            ],
            _TRAILING_NONE,
        )
    if statuses:
        s = [r.data for r in statuses]
        body[5] = _seq_utc(statuses) + [[d.type for d in s], [_check_attrs(d.attrs) for d in s]]
    try:
        raw = _encoder.encode(_trim(body, (None, None, None, [], None, None), keep=2))
    except (OverflowError, TypeError) as exc:  # e.g. an attribute value msgpack cannot carry
        raise WireError(f"v2: cannot encode the batch: {exc}") from exc
    return PREFIX + zlib.compress(raw, LEVEL, WBITS)


# --- Decoding -------------------------------------------------------------------------------------


def _popcount(bitmap: bytes, n: int) -> int:
    if len(bitmap) != (n + 7) // 8:
        raise WireError(f"v2: presence bitmap of {len(bitmap)} bytes for {n} records")
    return sum(_unpack_bits(bitmap, n))


def _unpack_bits(bitmap: bytes, n: int) -> list[bool]:
    return [bool(bitmap[i >> 3] >> (i & 7) & 1) for i in range(n)]


def _col_values(col: _Col, n: int, is_int: bool) -> list[Any]:
    """The column's values for ``n`` records, None where absent."""
    count = n if col.present is None else _popcount(col.present, n)
    if isinstance(col.data, bytes):
        if len(col.data) != 8 * count or (col.order, col.gcd, col.scale, col.modulus) != (0, 1, 1, 0):
            raise WireError("v2: a raw float64 column with a wrong length or with integer parameters")
        values: list[Any] = list(struct.unpack(f">{count}d", col.data))
    else:
        if len(col.data) > count:
            raise WireError(f"v2: a column holds {len(col.data)} values for {count} records")
        if not (0 <= col.order <= 2 and col.gcd >= 1 and col.modulus >= 0):
            raise WireError(
                f"v2: column parameters out of range: order {col.order}, gcd {col.gcd}, modulus {col.modulus}")
        if not (col.scale > 0 and math.isfinite(col.scale)):
            raise WireError(f"v2: column scale {col.scale!r} is not a positive finite number")
        ints = col.data if col.gcd == 1 else col.data[:1] + [d * col.gcd for d in col.data[1:]]
        ints = ints + [0] * (count - len(ints))  # trailing zeros are left out
        for step in range(col.order, 0, -1):
            ints = ints[: step - 1] + list(accumulate(ints[step - 1 :]))
        if col.modulus:
            ints = [x % col.modulus for x in ints]
        if ints and max(map(abs, ints)) > 2**53:  # as a decoder in IEEE doubles would have to refuse it
            raise WireError("v2: a column value beyond 2**53")
        if is_int:
            if col.scale != 1:
                raise WireError("v2: an integer field with a scale")
            values = ints
        else:
            scale = col.scale
            values = [x / scale for x in ints]
    if col.present is None:
        return values
    it = iter(values)
    return [next(it) if flag else None for flag in _unpack_bits(col.present, n)]


def _opt(col: _Col | None, n: int, is_int: bool = False) -> list[Any]:
    return [None] * n if col is None else _col_values(col, n, is_int)


def _seqs_times(n: int, seq: _Col, utc: _Col) -> tuple[list[int], list[float]]:
    if not 1 <= n <= MAX_RECORDS:
        raise WireError(f"v2: a section of {n} records (1 to {MAX_RECORDS} allowed)")
    if seq.present is not None or isinstance(seq.data, bytes):
        raise WireError("v2: a seq column must be integers with no absent values")
    seqs = _col_values(seq, n, True)
    if any(s < 0 for s in seqs):
        raise WireError("v2: a negative sequence number")
    times = _col_values(utc, n, False)
    if None in times:
        raise WireError("v2: a record without a time")
    return seqs, times


def _lengths(n: int, *lists: list[Any]) -> None:
    if any(len(values) != n for values in lists):
        raise WireError(f"v2: a per-record list whose length is not the {n} of its seq column")


def _decode_fixes(section: _Fixes) -> list[Record]:
    cols = section.columns + [None] * (2 + len(FIX_NUMBERS) - len(section.columns))
    if len(cols) > 2 + len(FIX_NUMBERS) or len(section.texts) > len(FIX_TEXTS):
        raise WireError("v2: more fix columns than this version defines")
    if cols[0] is None or cols[1] is None:
        raise WireError("v2: a fix section without its seq or utc column")
    n = section.n
    seqs, times = _seqs_times(n, cols[0], cols[1])
    values = [_opt(col, n, spec is None) for col, (_, spec) in zip(cols[2:], FIX_NUMBERS)]
    if None in values[0] or None in values[1]:
        raise WireError("v2: a fix without a position")
    texts = section.texts + [None] * (len(FIX_TEXTS) - len(section.texts))
    _lengths(n, *(t for t in texts if isinstance(t, list)))
    values += [t if isinstance(t, list) else [t] * n for t in texts]
    names = _FIX_FIELDS[2:]
    return [
        Record(utc=t, mono=0.0, seq=s, data=Fix(**dict(zip(names, row))))
        for s, t, *row in zip(seqs, times, *values)
    ]


def _decode_body(body: _Body) -> list[Record]:
    sections = [body.fixes, *body.signals, body.events, body.status]
    if sum(section.n for section in sections if section is not None) > MAX_RECORDS:
        raise WireError(f"v2: more than {MAX_RECORDS} records in one batch")
    out: list[Record] = []
    if body.fixes is not None:
        out.extend(_decode_fixes(body.fixes))
    for series in body.signals:
        n = series.n
        seqs, times = _seqs_times(n, series.seq, series.utc)
        name, unit, source = series.name, series.unit, series.source
        out.extend(
            Record(utc=t, mono=0.0, seq=s, data=Signal(name=name, value=v, unit=unit, source=source))
            for s, t, v in zip(seqs, times, _opt(series.value, n))
        )
    if body.events is not None:
        e = body.events
        n = e.n
        seqs, times = _seqs_times(n, e.seq, e.utc)
        _lengths(n, e.type, e.attrs)
        out.extend(
            Record(utc=t, mono=0.0, seq=s, data=Event(type=ty, lat=la, lon=lo, attrs=at))
            for s, t, ty, at, la, lo in zip(seqs, times, e.type, e.attrs, _opt(e.lat, n), _opt(e.lon, n))
        )
    if body.status is not None:
        st = body.status
        n = st.n
        seqs, times = _seqs_times(n, st.seq, st.utc)
        _lengths(n, st.type, st.attrs)
        out.extend(
            Record(utc=t, mono=0.0, seq=s, data=Status(type=ty, attrs=at))
            for s, t, ty, at in zip(seqs, times, st.type, st.attrs)
        )
    out.sort(key=lambda r: r.seq)  # stable: kinds in body order where sequence numbers tie
    return out


def _inflate(payload: bytes) -> bytes:
    if payload[:1] != PREFIX:
        raise WireError(f"v2: a payload must start with byte {VERSION}, got {payload[:1].hex() or 'nothing'}")
    inflater = zlib.decompressobj(WBITS)
    try:
        raw = inflater.decompress(payload[1:], MAX_DECOMPRESSED)
    except zlib.error as exc:
        raise WireError(f"v2: not a DEFLATE stream: {exc}") from exc
    if inflater.unconsumed_tail:
        raise WireError(f"v2: decompressed batch larger than {MAX_DECOMPRESSED} bytes")
    if not inflater.eof:
        raise WireError("v2: truncated DEFLATE stream")
    if inflater.unused_data:
        raise WireError("v2: bytes after the end of the DEFLATE stream")
    return raw


def decode(payload: bytes) -> Batch:
    """Decode one v2 batch; records come back in ascending ``seq``. Raises :class:`WireError`."""
    raw = _inflate(bytes(payload))
    try:
        body = _body_decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:  # text must be UTF-8
        version = _peek_version(raw)
        if version is not None and version != VERSION:
            raise WireError(f"v2: the body says version {version}, not {VERSION}") from exc
        raise WireError(f"v2: {exc}") from exc
    if body.v != VERSION:
        raise WireError(f"v2: the body says version {body.v}, not {VERSION}")
    try:
        records = _decode_body(body)
    except (OverflowError, MemoryError) as exc:  # e.g. an integer too large for a float
        raise WireError(f"v2: a value out of range: {exc}") from exc
    return Batch(body.device, records, VERSION)


def _peek_version(raw: bytes) -> int | None:
    try:
        first = msgspec.msgpack.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None
    return first[0] if isinstance(first, list) and first and isinstance(first[0], int) else None


class _V2Codec:
    version = VERSION
    content_type = CONTENT_TYPE

    def encode(self, device_id: str, records: Sequence[Record]) -> bytes:
        return encode(device_id, records)

    def decode(self, payload: bytes) -> Batch:
        return decode(payload)

    def sniff(self, payload: bytes) -> bool:
        return bytes(payload[:1]) == PREFIX


CODEC = _V2Codec()
