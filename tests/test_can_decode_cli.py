"""``telematics-agent decode-can`` on the corpus captures and on the formats a technician brings."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import can
import pytest

from agent.decode.can_log import CaptureError, iter_frames

TRUCK = "can/css_FCBF0606_j1939_truck.derived.candump.log"
SESSION = "can/css_7512BE4D_obd2_session.derived_bus1.candump.log"
ASC = "can/pythoncan_logfile_j1939tp.asc"
KEYS = ["time", "bus", "id", "pgn", "sa", "pid", "name", "value", "unit"]
AGENT = str(Path(sys.executable).parent / "telematics-agent")
TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


def decode_can(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([AGENT, "decode-can", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def lines_of(result: subprocess.CompletedProcess) -> list[dict]:
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_truck_capture(corpus):
    lines = lines_of(decode_can(corpus / TRUCK))
    assert all(list(line) == KEYS and TIME.match(line["time"]) for line in lines)
    speed = [line for line in lines if line["name"] == "EngineSpeed"]
    assert len(speed) == 577 and {line["id"] for line in speed} == {"0CF00400"}
    assert all(line["pgn"] == 61444 and line["sa"] == 0 and line["pid"] is None and line["unit"] == "rpm" for line in speed)
    wheel = [line for line in lines if line["name"] == "WheelBasedVehicleSpeed"]
    assert len(wheel) == 184 and {line["sa"] for line in wheel} == {0x47}
    assert {line["value"] for line in wheel} == {0.0}
    vins = {line["value"] for line in lines if line["name"] == "VIN"}
    assert vins == {"1L06130RELP969468"}
    messages = [line for line in lines if line["pgn"] == 65251]  # EC1 by BAM, not in our DBC
    assert len(messages) == 13 and messages[0]["name"] == "PGN0FEE3" and len(messages[0]["value"]) == 56


def test_truck_capture_with_the_tp_dbc_decodes_the_reassembled_message(corpus):
    lines = lines_of(decode_can("--dbc", corpus / "dbc" / "css_tp_j1939.dbc", corpus / TRUCK))
    ec1 = [line for line in lines if line["name"] == "EngineSpeedAtPoint5"]
    assert len(ec1) == 13 and all(line["pgn"] == 65251 for line in ec1)


def test_obd_session(corpus):
    lines = lines_of(decode_can(corpus / SESSION))
    pids = {line["pid"] for line in lines if line["pid"] is not None and line["name"] != "VIN"}
    assert len(pids) == 31
    assert [line["value"] for line in lines if line["name"] == "VIN"] == ["TMBJP7NX5NY084923"]
    assert [line["value"] for line in lines if line["name"] == "DTC"] == [{"codes": []}]
    rpm = [line["value"] for line in lines if line["name"] == "EngineRPM"]
    assert len(rpm) == 273 and max(rpm) == pytest.approx(2957, abs=1)
    assert max(line["value"] for line in lines if line["name"] == "VehicleSpeed") == 86
    assert all(line["pgn"] is None and line["sa"] is None for line in lines)


def test_asc_sample(corpus):
    lines = lines_of(decode_can("--dbc", corpus / "dbc" / "css_tp_j1939.dbc", corpus / ASC))
    # CANalyzer's two reassembled J1939TP lines; the BAM packets without an announcement are not guessed at.
    assert [(line["name"], line["bus"]) for line in lines if line["pgn"] == 65251] == [
        ("EC1", "0"), ("EngineSpeedAtPoint5", "0"), ("EC1", "1"), ("EngineSpeedAtPoint5", "1")]
    assert lines[1]["value"] == 1400.0 and lines[1]["time"].startswith("2017-09-30T15:06:16.488743")


def test_candump_screen_output_with_and_without_timestamps(tmp_path):
    screen = tmp_path / "screen.txt"
    screen.write_text(
        "  can0  18FEF100   [8]  FF FF FE FF FF FF FF FF\n"
        "  can0  0CF00400   [8]  F0 FF 7D 40 1F FF FF FF\n"
        "  can0  123   [2]  remote request\n"
    )
    lines = lines_of(decode_can(screen))
    by_name = {line["name"]: line for line in lines}
    assert by_name["WheelBasedVehicleSpeed"]["value"] is None  # raw 0xFEFF: not available
    assert by_name["EngineSpeed"]["value"] == 1000.0 and by_name["EngineSpeed"]["time"] is None
    stamped = tmp_path / "stamped.log"
    stamped.write_text(" (1622547830.084600)  can1  0CF00400   [8]  F0 FF 7D 40 1F FF FF FF\n")
    lines = lines_of(decode_can(stamped))
    assert lines[3]["time"] == "2021-06-01T11:43:50.084600Z" and lines[3]["bus"] == "can1"


def test_python_can_formats_round_trip(tmp_path, corpus):
    """Frames written by python-can's own writers decode the same as the candump -L original."""
    frames = list(iter_frames(corpus / TRUCK))[:300]
    reference = lines_of(decode_can(corpus / TRUCK))
    for suffix in (".blf", ".asc", ".trc", ".csv"):
        path = tmp_path / f"truck{suffix}"
        with can.Logger(str(path)) as writer:
            for f in frames:
                writer.on_message_received(can.Message(timestamp=f.time, arbitration_id=f.id, is_extended_id=f.extended,
                                                       data=f.data, channel=0))
        lines = lines_of(decode_can(path))
        assert [(line["name"], line["value"]) for line in lines] == [
            (line["name"], line["value"]) for line in reference[: len(lines)]], suffix
        assert len(lines) > 900


def test_bad_inputs_end_in_one_line_and_status_2(tmp_path):
    garbage = tmp_path / "notes.log"
    garbage.write_text("hello there\n")
    missing = tmp_path / "nothing.log"
    bad_dbc = tmp_path / "bad.dbc"
    bad_dbc.write_text("BO_ this is not a dbc\n")
    good = tmp_path / "good.log"
    good.write_text("(1.0) can0 0CF00400#F0FF7D401FFFFFFF\n")
    for args in ([garbage], [missing], ["--dbc", bad_dbc, good], ["--dbc", missing, good]):
        result = decode_can(*args)
        assert result.returncode == 2, args
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
        assert result.stderr.startswith("telematics-agent decode-can: ")


def test_iter_frames_rejects_what_it_cannot_read(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"\x00\x01\x02")
    with pytest.raises(CaptureError):
        list(iter_frames(path))
