"""Wire format v1: round trip (hypothesis), framing, and typed errors on anything malformed."""

from __future__ import annotations

import json
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.record import Event, Fix, Record, Signal, Status
from agent.wire import Batch, WireError, codecs, decode_batch, encode_batch
from agent.wire.v1_json import CONTENT_TYPE, MAX_DECOMPRESSED

finite = st.floats(allow_nan=False, allow_infinity=False)
maybe = lambda s: st.none() | s  # noqa: E731
small_int = st.integers(min_value=-(2**63), max_value=2**63 - 1)
text = st.text(max_size=20)
scalar = st.none() | st.booleans() | small_int | finite | text
attrs = st.dictionaries(text, scalar, max_size=4)

payloads = st.one_of(
    st.builds(
        Fix,
        lat=st.floats(-90, 90), lon=st.floats(-180, 180), alt_m=maybe(finite), speed_mps=maybe(finite),
        course_deg=maybe(finite), quality=maybe(small_int), hdop=maybe(finite), sats_used=maybe(small_int),
        mode=maybe(small_int),
    ),
    st.builds(Signal, name=text, value=maybe(finite), unit=maybe(text), source=maybe(text)),
    st.builds(Event, type=text, lat=maybe(finite), lon=maybe(finite), attrs=attrs),
    st.builds(Status, type=text, attrs=attrs),
)
records = st.builds(Record, utc=finite, mono=finite, data=payloads, seq=st.integers(0, 2**63 - 1))
device_ids = st.from_regex(r"[A-Za-z0-9_.-]{1,64}", fullmatch=True)


@settings(max_examples=300, deadline=None)
@given(device=device_ids, batch=st.lists(records, max_size=40))
def test_v1_round_trip_is_lossless(device, batch):
    payload, content_type = encode_batch(device, batch)
    assert content_type == CONTENT_TYPE
    decoded = decode_batch(payload, content_type)
    assert decoded == Batch(device, batch, 1)
    assert decode_batch(payload) == decoded, "without a content type the format is recognised by its bytes"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_raise_wire_error_only(blob):
    with pytest.raises(WireError):
        decode_batch(blob)
    with pytest.raises(WireError):
        decode_batch(blob, CONTENT_TYPE)


@settings(max_examples=100, deadline=None)
@given(batch=st.lists(records, min_size=1, max_size=10), data=st.data())
def test_truncated_payloads_raise_wire_error(batch, data):
    payload, content_type = encode_batch("truck-1", batch)
    cut = data.draw(st.integers(0, len(payload) - 1))
    with pytest.raises(WireError):
        decode_batch(payload[:cut], content_type)


def _zjson(doc) -> bytes:
    return zlib.compress(json.dumps(doc).encode())


@pytest.mark.parametrize(
    "payload, reason",
    [
        (_zjson({"v": 2, "device": "d", "records": []}), "version"),
        (_zjson({"v": 1, "device": "d"}), "records"),
        (_zjson({"v": 1, "device": "d", "records": [{"utc": 1, "mono": 1, "data": {"kind": "fix", "lat": 1, "lon": 2}}]}), "seq"),
        (_zjson({"v": 1, "device": "d", "records": [{"utc": 1, "mono": 1, "seq": 1, "data": {"kind": "teleport"}}]}), "teleport"),
        (_zjson([1, 2, 3]), "object"),
        (zlib.compress(b"{not json"), "JSON"),
        (zlib.compress(b"x" * (MAX_DECOMPRESSED + 1)), "larger than"),
        (encode_batch("d", [])[0] + b"tail", "after the end"),
    ],
)
def test_malformed_v1_bodies_are_named(payload, reason):
    with pytest.raises(WireError, match=reason):
        decode_batch(payload, CONTENT_TYPE)


def test_unknown_versions_and_content_types_are_wire_errors():
    with pytest.raises(WireError, match="unknown wire format version 99"):
        encode_batch("d", [], version=99)
    with pytest.raises(WireError, match="unknown content type"):
        decode_batch(encode_batch("d", [])[0], "application/x-something-else")
    with pytest.raises(WireError, match="sequence number"):
        encode_batch("d", [Record(utc=1, mono=1, data=Fix(lat=1, lon=2))])
    assert 1 in codecs()


def test_v1_document_matches_the_spec_example():
    """docs/wire-format.md's worked example decodes to exactly these records."""
    body = (
        b'{"v":1,"device":"truck-7","records":['
        b'{"utc":1700000000.0,"mono":12.5,"seq":41,"data":{"kind":"fix","lat":48.1372,"lon":11.5756,"speed_mps":8.3}},'
        b'{"utc":1700000000.2,"mono":12.7,"seq":42,"data":{"kind":"event","type":"harsh_braking","attrs":{"decel_mps2":4.1}}}]}'
    )
    batch = decode_batch(zlib.compress(body), CONTENT_TYPE)
    assert batch.device_id == "truck-7" and batch.version == 1
    assert batch.records == [
        Record(utc=1700000000.0, mono=12.5, seq=41, data=Fix(lat=48.1372, lon=11.5756, speed_mps=8.3)),
        Record(utc=1700000000.2, mono=12.7, seq=42, data=Event(type="harsh_braking", attrs={"decel_mps2": 4.1})),
    ]
