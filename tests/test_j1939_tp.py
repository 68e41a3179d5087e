"""Passive J1939 transport protocol reassembly, DM1 trouble codes and the VIN."""

from __future__ import annotations

import cantools
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.decode.can_decoder import FrameDecoder, vin_of
from agent.decode.can_log import iter_frames
from agent.decode.dtc import DtcSet, J1939Dtc, dm1_set, parse_dm1
from agent.decode.j1939 import J1939_FRAME_ID_MASK, J1939Database
from agent.decode.j1939_tp import T1_S, T2_S, TransportReassembler

TRUCK = "can/css_FCBF0606_j1939_truck.derived.candump.log"


def bam(size: int, packets: int, pgn: int) -> bytes:
    return bytes([32, size & 0xFF, size >> 8, packets, 0xFF, pgn & 0xFF, (pgn >> 8) & 0xFF, pgn >> 16])


def rts(size: int, packets: int, pgn: int) -> bytes:
    return bytes([16, size & 0xFF, size >> 8, packets, 0xFF, pgn & 0xFF, (pgn >> 8) & 0xFF, pgn >> 16])


def packets_of(payload: bytes) -> list[bytes]:
    chunks = [payload[i : i + 7] for i in range(0, len(payload), 7)]
    return [bytes([n + 1]) + chunk.ljust(7, b"\xff") for n, chunk in enumerate(chunks)]


def test_bam_reassembles_and_ignores_packets_without_an_announcement():
    tp = TransportReassembler()
    payload = bytes(range(20))
    assert tp.feed_dt(0.0, 0x00, 0xFF, packets_of(payload)[0]) is None  # no session yet
    tp.feed_cm(0.0, 0x00, 0xFF, bam(20, 3, 0xFEE3))
    results = [tp.feed_dt(0.05 * (i + 1), 0x00, 0xFF, p) for i, p in enumerate(packets_of(payload))]
    assert results[:2] == [None, None]
    assert results[2].pgn == 0xFEE3 and results[2].data == payload and results[2].sa == 0
    assert tp.open_sessions == 0 and tp.completed == 1


def test_rts_cts_reassembles_with_retransmission_and_keeps_sessions_per_address_pair():
    tp = TransportReassembler()
    a, b = bytes(range(16)), bytes(range(100, 116))
    tp.feed_cm(0.0, 0x00, 0x21, rts(16, 3, 0xFECA))
    tp.feed_cm(0.0, 0x03, 0x21, rts(16, 3, 0xFEEC))
    tp.feed_cm(0.01, 0x21, 0x00, bytes([17, 2, 1, 0xFF, 0xFF, 0xCA, 0xFE, 0x00]))  # CTS to 0x00
    pa, pb = packets_of(a), packets_of(b)
    assert tp.feed_dt(0.02, 0x00, 0x21, pa[0]) is None
    assert tp.feed_dt(0.02, 0x03, 0x21, pb[0]) is None
    assert tp.feed_dt(0.03, 0x00, 0x21, pa[0]) is None  # retransmitted after a CTS asking again
    assert tp.feed_dt(0.04, 0x00, 0x21, pa[1]) is None
    done = tp.feed_dt(0.05, 0x00, 0x21, pa[2])
    assert done.data == a and done.da == 0x21
    assert tp.open_sessions == 1  # 0x03's session is still going


def test_abort_from_either_side_ends_the_session():
    tp = TransportReassembler()
    tp.feed_cm(0.0, 0x00, 0x21, rts(16, 3, 0xFECA))
    tp.feed_cm(0.1, 0x21, 0x00, bytes([255, 1, 0xFF, 0xFF, 0xFF, 0xCA, 0xFE, 0x00]))  # receiver aborts
    assert tp.open_sessions == 0 and tp.dropped == 1


def test_sessions_time_out_on_the_frames_clock():
    tp = TransportReassembler()
    tp.feed_cm(0.0, 0x00, 0xFF, bam(20, 3, 0xFEE3))
    tp.feed_cm(0.0, 0x01, 0x21, rts(20, 3, 0xFEE3))
    assert tp.expire(T1_S - 0.01) == 0
    assert tp.expire(T1_S + 0.01) == 1  # BAM: T1
    assert tp.expire(T2_S + 0.01) == 1  # RTS/CTS: T2
    assert tp.open_sessions == 0


def test_malformed_announcements_are_dropped():
    tp = TransportReassembler()
    tp.feed_cm(0.0, 0x00, 0xFF, bam(20, 9, 0xFEE3))  # packet count does not fit the size
    tp.feed_cm(0.0, 0x00, 0xFF, bam(4000, 255, 0xFEE3))  # larger than 1785 bytes
    tp.feed_cm(0.0, 0x00, 0x21, bam(20, 3, 0xFEE3))  # a BAM must go to the global address
    tp.feed_cm(0.0, 0x00, 0xFF, bytes([32, 1]))  # short frame
    assert tp.open_sessions == 0 and tp.dropped == 3


def test_a_sequence_number_out_of_range_drops_the_session():
    tp = TransportReassembler()
    tp.feed_cm(0.0, 0x00, 0xFF, bam(20, 3, 0xFEE3))
    assert tp.feed_dt(0.05, 0x00, 0xFF, bytes([9]) + bytes(7)) is None
    assert tp.open_sessions == 0


tp_frames = st.lists(
    st.tuples(
        st.booleans(),  # CM or DT
        st.sampled_from([0x00, 0x01, 0x21, 0xFF]),
        st.sampled_from([0x00, 0x21, 0xFF]),
        st.one_of(
            st.binary(max_size=8),
            st.builds(lambda size, n, pgn: bam(size, n, pgn), st.integers(0, 2000), st.integers(0, 255),
                      st.sampled_from([0xFECA, 0xFEEC, 0xFEE3])),
            st.builds(lambda size, n, pgn: rts(size, n, pgn), st.integers(0, 2000), st.integers(0, 255),
                      st.sampled_from([0xFECA, 0xFEEC])),
            st.builds(lambda seq, body: bytes([seq]) + body, st.integers(0, 255), st.binary(max_size=7)),
        ),
        st.floats(0, 2.0),
    ),
    max_size=80,
)


@settings(max_examples=300)
@given(tp_frames)
def test_random_tp_sequences_never_raise_and_never_leak_sessions(frames):
    tp = TransportReassembler(max_sessions=4)
    t = 0.0
    for is_cm, sa, da, data, dt in frames:
        t += dt
        if is_cm:
            tp.feed_cm(t, sa, da, data)
        else:
            done = tp.feed_dt(t, sa, da, data)
            assert done is None or 9 <= len(done.data) <= 1785
        assert tp.open_sessions <= 4
    tp.expire(t + T2_S + 0.001)
    assert tp.open_sessions == 0


def test_dm1_lamps_and_codes():
    # J1939-73 example: MIL on, amber on; SPN 190 FMI 2 seen 3 times, SPN 524287-range padding ignored.
    data = bytes([0b01000100, 0xFF, 190, 0, 2, 3, 0xFF, 0xFF, 0xFF, 0xFF])
    lamps, codes = parse_dm1(data)
    assert lamps == {"mil": "on", "red_stop": "off", "amber_warning": "on", "protect": "off"}
    assert codes == [J1939Dtc(190, 2, 3)]
    # SPN's high 3 bits sit in byte 5's top bits: SPN 0x7FFFE would be 524286.
    assert parse_dm1(bytes([0, 0xFF, 0x2C, 0x0F, 0b10100000 | 4, 1]))[1] == [J1939Dtc(0x50F2C, 4, 1)]
    assert parse_dm1(bytes([0, 0xFF, 0, 0, 0, 0, 0xFF, 0xFF]))[1] == []  # "no active codes"


@given(st.binary(max_size=64))
def test_dm1_never_raises_and_round_trips_through_status_attrs(data):
    dtcs = dm1_set("can0", 0x00, data)
    assert DtcSet.from_attrs(dtcs.to_attrs()) == dtcs


def test_multi_packet_dm1_through_the_frame_decoder():
    decoder = FrameDecoder(J1939Database.load())
    payload = bytes([0x04, 0xFF]) + bytes([110, 0, 0, 1]) + bytes([100, 0, 1, 5]) + bytes([0x5B, 0x00, 0x03, 0x02])
    decoder.feed(0.0, "can0", 0x1CECFF00, True, bam(len(payload), 2, 0xFECA))
    out = []
    for i, packet in enumerate(packets_of(payload)):
        out += decoder.feed(0.05 * (i + 1), "can0", 0x1CEBFF00, True, packet)
    assert [(d.name, d.kind, d.pgn, d.sa) for d in out] == [("DM1", "dtcs", 0xFECA, 0)]
    assert out[0].value.codes == ("110-0", "100-1", "91-3")
    assert out[0].value.counts == (1, 5, 2)
    assert out[0].value.lamps["amber_warning"] == "on"


def test_vin_delimiter_and_padding():
    assert vin_of(b"1FUJGLDR12LM12345*") == "1FUJGLDR12LM12345"
    assert vin_of(b"1L06130RELP969468>,\x05)]") == "1L06130RELP969468"


def test_truck_capture_tp_sessions_reassemble(corpus):
    """The truck's BAMs: EC1 (PGN 65251) decoded with the corpus DBC and the VIN (PGN 65260)."""
    tp_dbc = corpus / "dbc" / "css_tp_j1939.dbc"
    decoder = FrameDecoder(J1939Database.load([tp_dbc]))
    reference = cantools.database.load_file(str(tp_dbc), frame_id_mask=J1939_FRAME_ID_MASK).get_message_by_name("EC1")
    messages, vins, speeds = [], set(), []
    announcements = 0
    for frame in iter_frames(corpus / TRUCK):
        announcements += frame.id == 0x1CECFF00
        for item in decoder.feed(frame.time, frame.bus, frame.id, frame.extended, frame.data):
            if item.kind == "message":
                messages.append(item)
            elif item.kind == "vin":
                vins.add(item.value)
            elif item.name == "EngineSpeedAtPoint5":
                speeds.append((item, messages[-1]))
    assert announcements == 16 and len(messages) + 3 == 16  # 13 EC1 and 3 VIN sessions, all complete
    assert vins == {"1L06130RELP969468"}
    assert decoder.tp("can1").dropped == 0 and decoder.tp("can1").open_sessions == 0
    for item, message in speeds:
        data = bytes.fromhex(message.value).ljust(reference.length, b"\xff")
        assert item.value == pytest.approx(reference.decode(data)["EngineSpeedAtPoint5"])
    assert len(speeds) == 13
