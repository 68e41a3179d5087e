"""Property tests (hypothesis) of the NMEA decoder: any bytes, mutated real sentences, random splits."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.decode.nmea import NmeaDecoder

REPO = Path(__file__).resolve().parent.parent
CORPUS_NMEA = REPO.parent / "shared" / "corpus" / "nmea"

# A real receiver's stream (u-blox 8: RMC VTG GGA GSA GSV GLL ZDA), embedded so that these tests
# run on every clone, not only where the shared corpus is.
REAL = (
    b"$GNRMC,000941.00,A,4404.13387,N,12118.85628,W,0.029,,100117,,,A*7D\r\n"
    b"$GNVTG,,T,,M,0.029,N,0.053,K,A*30\r\n"
    b"$GNGGA,000941.00,4404.13387,N,12118.85628,W,1,12,1.01,1144.8,M,-21.4,M,,*4D\r\n"
    b"$GNGSA,A,3,23,09,16,07,26,03,27,22,,,,,1.71,1.01,1.38*1B\r\n"
    b"$GNGSA,A,3,80,70,73,79,69,71,,,,,,,1.71,1.01,1.38*1D\r\n"
    b"$GPGSV,4,1,16,02,05,307,,03,21,174,29,04,12,038,23,06,07,270,06*7E\r\n"
    b"$GLGSV,3,3,09,88,07,028,*51\r\n"
    b"$GNGLL,4404.13387,N,12118.85628,W,000941.00,A,A*69\r\n"
    b"$GNZDA,000941.00,10,01,2017,00,00*70\r\n"
    b"$GNRMC,000942.00,A,4404.13401,N,12118.85633,W,0.041,,100117,,,A*73\r\n"
    b"$GNVTG,,T,,M,0.041,N,0.076,K,A*39\r\n"
    b"$GNGGA,000942.00,4404.13401,N,12118.85633,W,1,12,1.01,1144.9,M,-21.4,M,,*4C\r\n"
    b"$GNGSA,A,3,23,09,16,07,26,03,27,22,,,,,1.71,1.01,1.38*1B\r\n"
    b"$GNRMC,000943.00,A,4404.13403,N,12118.85633,W,0.023,,100117,,,A*74\r\n"
)


def whole(data: bytes, **kwargs) -> tuple[list, dict]:
    decoder = NmeaDecoder(**kwargs)
    out = decoder.feed(data) + decoder.flush()
    return out, dict(decoder.counters)


def in_pieces(data: bytes, cuts: list[int], **kwargs) -> tuple[list, dict]:
    decoder = NmeaDecoder(**kwargs)
    out = []
    start = 0
    for cut in sorted(set(cuts)) + [len(data)]:
        out += decoder.feed(data[start:cut])
        start = cut
    out += decoder.flush()
    return out, dict(decoder.counters)


def test_the_embedded_stream_decodes():
    fixes, counters = whole(REAL)
    assert len(fixes) == 3 and counters["bad_checksum"] == 0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000), st.booleans())
def test_arbitrary_bytes_never_raise(data, allow_missing):
    fixes, counters = whole(data, allow_missing_checksum=allow_missing)
    for utc, fix in fixes:
        assert -90 <= fix.lat <= 90 and -180 <= fix.lon <= 180
        assert isinstance(utc, float)
    assert all(v >= 0 for v in counters.values())


nmea_alphabet = st.sampled_from(list(b"$!*,.\r\n0123456789ABCDEFGNPRMCVTLSWZ\x00\x1b\xb5b"))


@settings(max_examples=300, deadline=None)
@given(st.lists(nmea_alphabet, max_size=600).map(bytes))
def test_nmea_looking_noise_never_raises(data):
    whole(data, allow_missing_checksum=True)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_real_sentences_never_raise_and_positions_stay_on_earth(data):
    raw = bytearray(REAL)
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        action = data.draw(st.sampled_from(["flip", "delete", "insert", "dup"]))
        if action == "flip":
            raw[pos] = data.draw(st.integers(0, 255))
        elif action == "delete":
            del raw[pos]
        elif action == "insert":
            raw.insert(pos, data.draw(st.integers(0, 255)))
        else:
            raw[pos:pos] = raw[pos:pos + data.draw(st.integers(1, 80))]
    fixes, _ = whole(bytes(raw))
    fixes_lenient, _ = whole(bytes(raw), allow_missing_checksum=True)
    for utc, fix in fixes + fixes_lenient:
        assert -90 <= fix.lat <= 90 and -180 <= fix.lon <= 180


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, len(REAL)), max_size=60), st.binary(max_size=40))
def test_random_splits_give_the_same_fixes_as_the_whole_stream(cuts, noise):
    data = noise + REAL + noise + REAL.replace(b"00094", b"00095")
    assert in_pieces(data, cuts) == whole(data)


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_random_splits_of_real_captures(data):
    logs = sorted(CORPUS_NMEA.glob("*.log"))
    if not logs:  # a user's clone without the shared corpus: the embedded stream still runs above
        return
    log = data.draw(st.sampled_from(logs))
    stream = b"".join(line for line in log.read_bytes().splitlines(keepends=True) if not line.startswith(b"#"))
    sizes = data.draw(st.lists(st.integers(1, 300), min_size=1, max_size=20))
    cuts, pos, i = [], 0, 0
    while pos < len(stream):
        pos += sizes[i % len(sizes)]
        cuts.append(min(pos, len(stream)))
        i += 1
    assert in_pieces(stream, cuts) == whole(stream)


SENTENCES = REAL.splitlines(keepends=True)
junk = st.one_of(
    st.integers(1, 300).map(lambda n: b"\x00" * n),
    st.integers(1, 300).map(lambda n: b" " * n),
    st.integers(1, 300).map(lambda n: b"$GPGGA," + b"9" * n),
    st.binary(min_size=1, max_size=60),
    st.sampled_from([b"\r", b"\n", b"\r\r\n", b"\x1b[2J", b"\xb5b\x01\x07$\r\n"]),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(SENTENCES), junk), max_size=40), st.lists(st.integers(0, 4000), max_size=40))
def test_sentences_among_junk_split_anywhere_decode_like_the_whole(parts, cuts):
    data = b"".join(parts)
    assert in_pieces(data, [c for c in cuts if c <= len(data)]) == whole(data)
