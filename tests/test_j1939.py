"""J1939 identifiers, the project's DBC and signal decoding, cross-checked against cantools."""

from __future__ import annotations

import cantools
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.decode.can_log import iter_frames
from agent.decode.j1939 import (
    J1939_FRAME_ID_MASK,
    PACKAGED_DBC,
    J1939Database,
    J1939Id,
    make_id,
    not_available_limit,
    pgn_of,
    resolution_digits,
    split_id,
)

TRUCK = "can/css_FCBF0606_j1939_truck.derived.candump.log"
DB = J1939Database.load()


@pytest.fixture(scope="module")
def db() -> J1939Database:
    return DB


@pytest.mark.parametrize(
    "can_id, expected",
    [
        (0x0CF00400, J1939Id(3, 61444, 0x00, 0xFF)),  # EEC1: PDU2
        (0x18FEF147, J1939Id(6, 65265, 0x47, 0xFF)),  # CCVS1 from 0x47
        (0x1CECFF00, J1939Id(7, 0xEC00, 0x00, 0xFF)),  # TP.CM: PDU1, PS is the destination (global)
        (0x18EA0021, J1939Id(6, 0xEA00, 0x21, 0x00)),  # request PGN to address 0
        (0x18DAF110, J1939Id(6, 0xDA00, 0x10, 0xF1)),  # PDU1 with a specific destination
        (0x19FEF100, J1939Id(6, 0x1FEF1, 0x00, 0xFF)),  # data page 1
        (0x1BFEF100, J1939Id(6, 0x3FEF1, 0x00, 0xFF)),  # extended data page + data page
    ],
)
def test_split_id_follows_pdu1_and_pdu2_rules(can_id, expected):
    assert split_id(can_id) == expected
    assert pgn_of(can_id) == expected.pgn


@given(st.integers(0, 7), st.integers(0, 0x3FFFF), st.integers(0, 255), st.integers(0, 255))
def test_make_id_and_split_id_round_trip(priority, pgn, sa, da):
    can_id = make_id(pgn, sa, priority, da)
    split = split_id(can_id)
    assert split.priority == priority and split.sa == sa
    if ((pgn >> 8) & 0xFF) < 240:
        assert split.pgn == pgn & 0x3FF00 and split.da == da
    else:
        assert split.pgn == pgn and split.da == 0xFF


def test_not_available_ranges_follow_j1939_71():
    assert not_available_limit(8) == 0xFB
    assert not_available_limit(16) == 0xFB00
    assert not_available_limit(32) == 0xFB000000
    assert not_available_limit(2) == 2  # 10 error, 11 not available
    assert not_available_limit(4) == 14
    assert not_available_limit(1) is None
    assert resolution_digits(0.125) == 3 and resolution_digits(0.05) == 2 and resolution_digits(1000) == 0


def test_wheel_speed_0xfeff_is_missing_not_255_99(db):
    ccvs = db.by_pgn[65265]
    values = {sig.name: value for sig, value in ccvs.decode(bytes.fromhex("FFFFFEFFFFFFFFFF"))}
    assert values["WheelBasedVehicleSpeed"] is None
    values = {sig.name: value for sig, value in ccvs.decode(bytes.fromhex("FF0032FFFFFFFFFF"))}
    assert values["WheelBasedVehicleSpeed"] == 50.0  # 0x3200 / 256


def test_short_frames_read_the_missing_bytes_as_not_available(db):
    values = {sig.name: value for sig, value in db.by_pgn[65262].decode(bytes([0x7E]))}
    assert values == {"EngineCoolantTemperature": 86.0, "EngineFuelTemperature1": None, "EngineOilTemperature1": None,
                      "EngineTurboOilTemperature": None, "EngineIntercoolerTemperature": None}


FLEET_SPNS = {
    190: "engine speed", 84: "wheel-based speed", 183: "fuel rate", 250: "total fuel used", 96: "fuel level",
    110: "coolant temperature", 175: "oil temperature", 100: "oil pressure", 247: "engine hours",
    917: "total vehicle distance", 91: "accelerator pedal", 597: "brake switch", 595: "cruise control",
    171: "ambient temperature", 523: "current gear",
}


def test_the_project_dbc_covers_what_fleets_read(db):
    spns = {sig.spn for message in db.by_pgn.values() for sig in message.signals}
    missing = {spn: what for spn, what in FLEET_SPNS.items() if spn not in spns}
    assert not missing


def test_the_project_dbc_loads_in_cantools_with_the_j1939_mask():
    dbc = cantools.database.load_file(str(PACKAGED_DBC), frame_id_mask=J1939_FRAME_ID_MASK)
    # Any source address finds the message (the DBC's ids carry 0xFE).
    assert dbc.get_message_by_frame_id(0x0CF00400).name == "EEC1"
    assert dbc.get_message_by_frame_id(0x18FEF147).name == "CCVS1"


@settings(max_examples=300)
@given(st.sampled_from(sorted(DB.by_pgn)), st.binary(min_size=8, max_size=8))
def test_decoding_matches_cantools_except_where_not_available(pgn, data):
    ours = DB.by_pgn[pgn]
    reference = ours.cantools_message.decode(data, decode_choices=False)
    for sig, value in ours.decode(data):
        if value is None:
            raw = (int.from_bytes(data, "little") >> sig.start) & ((1 << sig.length) - 1)
            assert raw >= sig.na_limit
        else:
            assert value == pytest.approx(reference[sig.name], abs=10 ** -sig.digits)


@given(st.integers(0, 0x1FFFFFFF), st.binary(max_size=64))
def test_random_ids_and_payloads_never_raise(can_id, data):
    layout = DB.by_pgn.get(pgn_of(can_id))
    if layout is not None:
        assert len(layout.decode(data)) == len(layout.signals)


def test_truck_capture_matches_cantools_on_the_public_demo_dbc(corpus):
    """Engine speed and wheel speed of the real truck, ours vs cantools on the CSS demo DBC (SA 0xFE ids)."""
    demo_path = corpus / "dbc" / "CSS-Electronics-SAE-J1939-DEMO.dbc"
    ours = J1939Database.load([demo_path], include_packaged=False)
    reference = cantools.database.load_file(str(demo_path), frame_id_mask=J1939_FRAME_ID_MASK)
    compared = 0
    for frame in iter_frames(corpus / TRUCK):
        layout = ours.by_pgn.get(pgn_of(frame.id)) if frame.extended else None
        if layout is None:
            continue
        expected = reference.get_message_by_frame_id(frame.id).decode(frame.data)
        for sig, value in layout.decode(frame.data):
            assert value == pytest.approx(expected[sig.name])
            compared += 1
    assert compared == 577 + 184  # every EEC1 and CCVS1 frame of the capture


def test_a_user_dbc_adds_messages_and_later_files_win(corpus):
    db = J1939Database.load([corpus / "dbc" / "CSS-Electronics-SAE-J1939-DEMO.dbc"])
    assert [s.name for s in db.by_pgn[61444].signals] == ["EngineSpeed"]  # the demo's EEC1 replaced ours
    assert "EngineCoolantTemperature" in db.by_pgn[65262].by_name  # ours still there
