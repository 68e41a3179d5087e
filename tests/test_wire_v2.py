"""Wire format v2 (agent/wire/columnar.py): round trips for every field type, malformed payloads."""

from __future__ import annotations

import math
import os
import struct

import msgspec
import pytest
import zlib
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.decode.nmea import decode_file
from agent.record import Event, Fix, Record, Signal, Status
from agent.wire import WireError, decode_batch, encode_batch
from agent.wire import columnar

SETTINGS = settings(max_examples=int(os.environ.get("HYPOTHESIS_EXAMPLES", "150")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

finite = st.floats(allow_nan=False, allow_infinity=False)
any_float = st.floats(allow_nan=True, allow_infinity=True)
# Integers the format carries (+-2**50, so JavaScript's doubles hold every difference exactly).
wire_int = st.integers(-(2**50), 2**50)
small_int = st.integers(0, 255)
text = st.text(max_size=12)
scalar = st.one_of(st.none(), st.booleans(), st.integers(-(2**53) + 1, 2**53 - 1), finite, text)
attrs = st.dictionaries(text.filter(lambda key: key != "__proto__"), scalar, max_size=3)


def _maybe(strategy):
    return st.one_of(st.none(), strategy)


def _gps_like(lo: float, hi: float, places: int):
    """Values as a receiver gives them: decimal steps, so both coarse and fine scales get exercised."""
    steps = st.integers(round(lo * 10**places), round(hi * 10**places)).map(lambda k: k / 10**places)
    return st.one_of(st.floats(lo, hi), steps)


fixes = st.builds(
    Fix,
    lat=st.one_of(_gps_like(-90, 90, 7), st.integers(-90 * 600000, 90 * 600000).map(lambda k: k / 600000), any_float),
    lon=st.one_of(_gps_like(-180, 180, 7), any_float),
    alt_m=_maybe(st.one_of(_gps_like(-1000, 20000, 1), any_float)),
    speed_mps=_maybe(st.one_of(st.integers(0, 2000).map(lambda k: k * 0.1 * 1852 / 3600), _gps_like(0, 100, 2))),
    course_deg=_maybe(st.one_of(_gps_like(0, 359.99, 1), finite)),
    quality=_maybe(small_int),
    hdop=_maybe(_gps_like(0, 99.9, 1)),
    sats_used=_maybe(small_int),
    mode=_maybe(st.sampled_from([1, 2, 3])),
    geoid_sep_m=_maybe(_gps_like(-100, 100, 1)),
    pdop=_maybe(_gps_like(0, 99.9, 2)),
    vdop=_maybe(finite),
    sats_in_view=_maybe(small_int),
    status=_maybe(st.sampled_from(["A", "V"])),
    faa_mode=_maybe(text),
    lat_err_m=_maybe(finite),
    lon_err_m=_maybe(finite),
    alt_err_m=_maybe(finite),
)
signals = st.builds(
    Signal,
    name=st.sampled_from(["engine_rpm", "wheel_speed_kmh", "fuel_level_pct", "coolant_c"]),
    value=_maybe(st.one_of(st.integers(0, 64255).map(lambda k: k * 0.125), any_float, wire_int.map(float))),
    unit=_maybe(st.sampled_from(["rpm", "km/h", "%"])),
    source=_maybe(st.sampled_from(["can0", "can1"])),
)
events = st.builds(Event, type=text, lat=_maybe(_gps_like(-90, 90, 7)), lon=_maybe(any_float), attrs=attrs)
statuses = st.builds(Status, type=text, attrs=attrs)
payloads = st.one_of(fixes, signals, events, statuses)
times = st.one_of(st.integers(0, 4_102_444_800_000).map(lambda ms: ms / 1000), st.floats(-1e12, 1e12))


@st.composite
def batches(draw, payload=payloads):
    """A batch with distinct sequence numbers in the order a buffer hands them out (ascending)."""
    items = draw(st.lists(st.tuples(times, payload), max_size=70))
    start = draw(st.integers(0, 2**50 - 200))
    gaps = draw(st.lists(st.integers(1, 5), min_size=len(items), max_size=len(items)))
    seq = start
    records = []
    for (utc, data), gap in zip(items, gaps):
        records.append(Record(utc=utc, mono=123.0, data=data, seq=seq))
        seq += gap
    return records


# Stated resolutions (docs/wire-format.md): units per unit; None means bit-exact.
RESOLUTION = {name: spec.resolution for name, spec in columnar.FIX_NUMBERS if spec is not None}
RESOLUTION.update(lat=10**7, lon=10**7, course_deg=100)


def _same(a, b, resolution: int | None) -> bool:
    if a is None or b is None:
        return a is b
    if isinstance(a, float) and (math.isnan(a) or math.isinf(a) or resolution is None or abs(a) * resolution > 2**50):
        return a == b or (math.isnan(a) and math.isnan(b))
    return round(a * resolution) == round(b * resolution)


def assert_round_trip(sent: list[Record], got: list[Record]) -> None:
    """``got`` holds ``sent`` at the stated resolutions, in ascending seq."""
    assert [r.seq for r in got] == sorted(r.seq for r in sent)
    by_seq = {r.seq: r for r in sent}
    for out in got:
        original = by_seq[out.seq]
        assert out.kind == original.kind
        assert out.mono == 0.0
        assert _same(original.utc, out.utc, 1000), (original.utc, out.utc)
        for field in msgspec.structs.fields(original.data):
            a, b = getattr(original.data, field.name), getattr(out.data, field.name)
            if isinstance(original.data, Signal) and field.name == "value":
                assert _same(a, b, None), (a, b)
            elif isinstance(a, float) or isinstance(b, float):
                assert _same(a, b, RESOLUTION.get(field.name, 10**7)), (field.name, a, b)
            else:
                assert a == b, (field.name, a, b)


@SETTINGS
@given(batches())
def test_any_batch_round_trips(records):
    payload, content_type = encode_batch("truck-7", records, version=2)
    batch = decode_batch(payload, content_type)
    assert (batch.device_id, batch.version) == ("truck-7", 2)
    assert_round_trip(records, batch.records)
    # Sniffing the payload finds v2 too.
    assert decode_batch(payload).version == 2


@SETTINGS
@given(batches(fixes))
def test_fix_batches_round_trip(records):
    assert_round_trip(records, columnar.decode(columnar.encode("d", records)).records)


@SETTINGS
@given(batches(signals))
def test_signal_values_are_bit_exact(records):
    got = {r.seq: r.data.value for r in columnar.decode(columnar.encode("d", records)).records}
    for r in records:
        v = r.data.value
        assert got[r.seq] == v or (v is not None and math.isnan(v) and math.isnan(got[r.seq]))


def test_every_fix_field_has_a_column():
    assert sorted(f.name for f in msgspec.structs.fields(Fix)) == sorted(
        [name for name, _ in columnar.FIX_NUMBERS] + list(columnar.FIX_TEXTS))


def test_empty_batch():
    payload = columnar.encode("truck-7", [])
    batch = columnar.decode(payload)
    assert batch.records == [] and batch.device_id == "truck-7"
    assert len(payload) < 16


def test_extremes_round_trip():
    records = [
        Record(utc=0.0, mono=1.0, seq=0, data=Fix(lat=-90.0, lon=-180.0, course_deg=359.99, alt_m=-1e300)),
        Record(utc=4e9, mono=1.0, seq=2**50, data=Fix(lat=90.0, lon=180.0, course_deg=0.0, alt_m=math.inf)),
        Record(utc=1.5, mono=1.0, seq=7, data=Fix(lat=math.nan, lon=1e-300, quality=-(2**50), sats_used=2**50)),
        Record(utc=2.0, mono=1.0, seq=8, data=Signal(name="x", value=1 / 3)),
        Record(utc=2.0, mono=1.0, seq=9, data=Signal(name="x", value=-0.0)),
        Record(utc=3.0, mono=1.0, seq=10, data=Event(type="", attrs={"big": 2**53 - 1, "f": math.inf, "n": None})),
    ]
    got = {r.seq: r for r in columnar.decode(columnar.encode("d", records)).records}
    assert got[2**50].data.lat == 90.0 and got[0].data.lon == -180.0
    assert got[0].data.course_deg == 359.99 and got[2**50].data.course_deg == 0.0
    assert got[0].data.alt_m == -1e300 and got[2**50].data.alt_m == math.inf
    assert math.isnan(got[7].data.lat) and got[7].data.lon == 0.0  # 1e-300 degrees is 0 at 1e-7
    assert (got[7].data.quality, got[7].data.sats_used) == (-(2**50), 2**50)
    assert got[8].data.value == 1 / 3
    assert got[10].data.attrs == {"big": 2**53 - 1, "f": math.inf, "n": None}


@pytest.mark.parametrize(
    "record, message",
    [
        (Record(utc=0.0, mono=0.0, seq=None, data=Fix(lat=0.0, lon=0.0)), "sequence number"),
        (Record(utc=0.0, mono=0.0, seq=2**50 + 1, data=Fix(lat=0.0, lon=0.0)), "seq"),
        (Record(utc=0.0, mono=0.0, seq=1, data=Fix(lat=0.0, lon=0.0, sats_used=2**60)), "sats_used"),
        (Record(utc=0.0, mono=0.0, seq=1, data=Status(type="x", attrs={"n": 2**53})), "attribute"),
        (Record(utc=0.0, mono=0.0, seq=1, data=Event(type="x", attrs={"__proto__": 1})), "__proto__"),
    ],
)
def test_what_cannot_be_encoded_is_a_wire_error(record, message):
    with pytest.raises(WireError, match=message):
        columnar.encode("d", [record])


def _body(payload: bytes):
    return msgspec.msgpack.decode(zlib.decompress(payload[1:], -15))


def test_course_wraps_at_north_without_a_big_difference():
    courses = [358.0, 359.5, 0.5, 2.0, 1.0, 359.0]
    records = [Record(utc=i, mono=0.0, seq=i, data=Fix(lat=1.0, lon=2.0, course_deg=c)) for i, c in enumerate(courses)]
    body = _body(columnar.encode("d", records))
    course = body[2][1][6]  # fixes -> columns -> seq, utc, lat, lon, alt_m, speed_mps, course_deg
    assert course[5] == 3600 and max(map(abs, course[0][1:])) <= 20
    assert [r.data.course_deg for r in columnar.decode(columnar.encode("d", records)).records] == courses


def test_real_positions_travel_in_arc_minute_units(corpus):
    path = corpus / "drives" / "genivi_munich-gps.nmea"
    records = [Record(utc=u, mono=0.0, data=f, seq=i) for i, (u, f) in enumerate(decode_file(path))]
    batches = [records[i : i + 60] for i in range(0, len(records), 60)]
    payloads = [columnar.encode("truck-7", b) for b in batches]
    for sent, payload in zip(batches, payloads):
        assert_round_trip(sent, columnar.decode(payload).records)
    body = _body(payloads[3])
    assert body[2][1][2][3] == 600000  # NMEA's 1e-4 arc-minute steps, not 1e-7 degrees
    assert sum(map(len, payloads)) / len(records) < 9.5


def _deflate(raw: bytes) -> bytes:
    return columnar.PREFIX + zlib.compress(raw, 9, -15)


def _frame(body) -> bytes:
    return _deflate(msgspec.msgpack.encode(body))


GOOD = [2, "d", [2, [[[5, 1], 1], [[1000], 1, 1, 1000], [[10, 1], 1], [[20], 1]]]]


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"", "start with byte 2"),
        (b"\x01" + _frame(GOOD)[1:], "start with byte 2"),
        (b"\x02", "truncated"),
        (_frame(GOOD)[:-3], "truncated"),
        (b"\x02\xff\xff", "not a DEFLATE stream"),
        (_frame(GOOD) + b"x", "after the end"),
        (_frame([3, "d"]), "version 3"),
        (_frame({"v": 2}), "v2"),
        (_frame([2, "d", [0, [[[1]], [[1]], [[1]], [[1]]]]]), "section of 0"),
        (_frame([2, "d", [70000, [[[1]], [[1]], [[1]], [[1]]]]]), "more than 65536"),
        (_frame([2, "d", [2, [[[5, 1], 1], [[1000], 0, 1, 1000], [[10, 1, 2]], [[20]]]]]), "holds 3 values"),
        (_frame([2, "d", [2, [[[5, 1], 1], [[1000], 0, 1, 1000], [[10], 3], [[20]]]]]), "order 3"),
        (_frame([2, "d", [2, [[[5, 1], 1], [[1000], 0, 1, 0], [[10]], [[20]]]]]), "scale"),
        (_frame([2, "d", [2, [[[5, 1], 1], [b"\x00" * 8], [[10]], [[20]]]]]), "raw float64"),
        (_frame([2, "d", [2, [[[5, 1], 1], [[1000]], [[10]], [[20]], [[1], 0, 1, 1, b"\x03\x00"]]]]), "bitmap"),
        (_frame([2, "d", [2, [[[-5, 1], 1], [[1000]], [[10]], [[20]]]]]), "negative"),
        (_frame([2, "d", [2, [[[5, 1], 1], [[1000]], [[10]], [[20]], None, None, None, [[1], 0, 1, 10]]]]), "integer field"),
        (_frame([2, "d", [2, [[[5, 1], 1], [[1000]], [[10]], [[20]]] + [None] * 17]]), "more fix columns"),
        (_frame([2, "d", [2, [[[5, 1], 1], [[1000]], [[2**53, 1], 1], [[20]]]]]), "beyond 2\\*\\*53"),
        (_frame([2, "d", None, [], [2, [[1]], [[1]], ["a"], [{}, {}]]]), "length"),
        (_deflate(b"\x00" * (17 * 1024 * 1024)), "larger than"),
    ],
)
def test_malformed_payloads_are_wire_errors(payload, message):
    with pytest.raises(WireError, match=message):
        columnar.decode(payload)


def test_the_reference_body_decodes():
    batch = columnar.decode(_frame(GOOD))
    assert [(r.seq, r.utc, r.data.lat, r.data.lon) for r in batch.records] == [(5, 1.0, 10.0, 20.0), (6, 1.0, 11.0, 20.0)]


@SETTINGS
@given(st.binary(max_size=300))
def test_random_bytes_never_raise_anything_but_wire_error(data):
    for payload in (data, columnar.PREFIX + data, _frame(data)):
        try:
            columnar.decode(payload)
        except WireError:
            pass


@SETTINGS
@given(batches(), st.data())
def test_corrupted_bodies_never_raise_anything_but_wire_error(records, data):
    raw = bytearray(zlib.decompress(columnar.encode("d", records)[1:], -15))
    for _ in range(data.draw(st.integers(1, 4))):
        if raw:
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    try:
        columnar.decode(_deflate(bytes(raw[:cut] if data.draw(st.booleans()) else raw)))
    except WireError:
        pass


def test_raw_float_columns_are_big_endian_ieee754():
    records = [Record(utc=1.0, mono=0.0, seq=1, data=Signal(name="x", value=math.pi))]
    body = _body(columnar.encode("d", records))
    assert body[3][0][6][0] == struct.pack(">d", math.pi)
