"""The agent's side of an RTS/CTS session sent to it: CTS windows and the end-of-message acknowledgement."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agent.decode.j1939 import split_id
from agent.decode.j1939_tp import PGN_TP_CM
from agent.decode.j1939_tp_receiver import CtsResponder
from test_j1939_tp import bam, packets_of, rts

AGENT, ENGINE = 0xFB, 0x00
VI = bytes([0xEC, 0xFE, 0x00])


def rts_window(size: int, packets: int, pgn: int, per_cts: int) -> bytes:
    data = bytearray(rts(size, packets, pgn))
    data[4] = per_cts  # J1939-21 §5.10.3.1 byte 5: packets the sender takes per CTS
    return bytes(data)


def test_a_session_to_the_agent_in_cts_windows_then_the_acknowledgement():
    r = CtsResponder(AGENT)
    packets = packets_of(bytes(range(18)))  # 3 packets
    can_id, cts = r.cm(ENGINE, AGENT, rts_window(18, 3, 0xFEEC, 2))
    assert can_id == 0x1CEC00FB and cts == bytes([17, 2, 1, 0xFF, 0xFF]) + VI
    assert r.dt(ENGINE, AGENT, packets[0]) is None
    assert r.dt(ENGINE, AGENT, packets[1]) == (0x1CEC00FB, bytes([17, 1, 3, 0xFF, 0xFF]) + VI)
    assert r.dt(ENGINE, AGENT, packets[2]) == (0x1CEC00FB, bytes([19, 18, 0, 3, 0xFF]) + VI)
    assert r.dt(ENGINE, AGENT, packets[2]) is None  # the session is over


def test_no_limit_means_one_cts_for_every_packet():
    r = CtsResponder(AGENT)
    assert r.cm(0x03, AGENT, rts(18, 3, 0xFEEC))[1][:3] == bytes([17, 3, 1])
    packets = packets_of(bytes(18))
    assert [r.dt(0x03, AGENT, p) is None for p in packets] == [True, True, False]


def test_what_is_not_ours_or_not_valid_gets_no_answer():
    r = CtsResponder(AGENT)
    assert r.cm(ENGINE, 0xF9, rts(18, 3, 0xFEEC)) is None  # to another tool
    assert r.cm(ENGINE, 0xFF, bam(18, 3, 0xFEEC)) is None  # broadcast
    assert r.cm(ENGINE, AGENT, rts(18, 4, 0xFEEC)) is None  # packets do not fit the size
    assert r.cm(ENGINE, AGENT, rts(8, 2, 0xFEEC)) is None  # fits a single frame
    assert r.dt(ENGINE, AGENT, packets_of(bytes(18))[0]) is None  # no session
    r.cm(ENGINE, AGENT, rts(18, 3, 0xFEEC))
    r.cm(ENGINE, AGENT, bytes([255, 3, 0xFF, 0xFF, 0xFF]) + VI)  # the sender aborts
    assert [r.dt(ENGINE, AGENT, p) for p in packets_of(bytes(18))] == [None, None, None]


# Frames as a hostile or broken sender makes them: valid announcements, packets with any sequence
# number, and noise.
FRAME_DATA = st.one_of(
    st.binary(max_size=8),
    st.builds(lambda size, per_cts: rts_window(size, -(-size // 7), 0xFEEC, per_cts), st.integers(9, 60),
              st.integers(0, 255)),
    st.builds(lambda seq: bytes([seq]) + bytes(7), st.integers(0, 12)),
)


@given(st.lists(st.tuples(st.booleans(), st.sampled_from([ENGINE, 0x03]), st.sampled_from([AGENT, 0xFF, 0xF9]),
                          FRAME_DATA)))
def test_any_frames_never_raise_and_only_cts_or_ack_go_back_to_the_sender(frames):
    r = CtsResponder(AGENT)
    for is_cm, sender, da, data in frames:
        reply = r.cm(sender, da, data) if is_cm else r.dt(sender, da, data)
        if reply is not None:
            assert da == AGENT
            assert split_id(reply[0]) == (7, PGN_TP_CM, AGENT, sender)
            assert len(reply[1]) == 8 and reply[1][0] in (17, 19)
