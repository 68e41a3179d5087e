"""``telematics-agent process`` on the bundled simulator drive, checked against its ground truth:
every expected event once within its window, none unexpected, the same output run to run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from agent.record import parse_iso_utc

DRIVES = Path(__file__).resolve().parent.parent / "sim" / "drives"
TRUTH = DRIVES / "delivery_route.truth.json"


def process(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "telematics-agent"  # the installed console command
    return subprocess.run([str(exe), "process", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def route(tmp_path_factory):
    truth = json.loads(TRUTH.read_text())
    config = tmp_path_factory.mktemp("route") / "agent.yaml"
    config.write_text(yaml.safe_dump({"device": {"id": "truck-7"}, "edge": truth["edge_settings"]}))
    files = truth["files"]
    args = ["--nmea", str(DRIVES / files["nmea"]), "--can", str(DRIVES / files["can"]),
            "--geofences", str(DRIVES / files["geofences"]), "--config", str(config)]
    first = process(*args)
    assert first.returncode == 0, first.stderr
    return truth, first.stdout, args


def test_every_expected_event_once_in_its_window_and_none_unexpected(route):
    truth, stdout, _ = route
    lines = [json.loads(line) for line in stdout.splitlines()]
    got = [e for e in lines if e["kind"] == "event"]
    unmatched = list(got)
    for want in truth["events"]:
        lo, hi = (parse_iso_utc(t) for t in want["window"])
        hits = [e for e in unmatched if e["type"] == want["type"] and e.get("geofence_id") == want.get("geofence_id")
                and lo - 0.5 <= parse_iso_utc(e["time"]) <= hi + 0.5]
        assert len(hits) == 1, (want, hits)
        hit = hits[0]
        for key, tolerance in want.get("tolerance", {}).items():
            assert hit[key] == pytest.approx(want[key], abs=tolerance), (want["type"], key)
        unmatched.remove(hit)
    assert [e for e in unmatched if e["type"] not in truth["unchecked_types"]] == []


def test_output_shape(route):
    _, stdout, _ = route
    lines = [json.loads(line) for line in stdout.splitlines()]
    kinds = {line["kind"] for line in lines}
    assert kinds <= {"fix", "signal", "status", "event"} and {"fix", "signal", "event"} <= kinds
    for line in lines:
        if line["kind"] == "event":
            assert {"type", "time", "lat", "lon"} <= set(line)
            assert line["time"].endswith("Z")
        if line["type" if line["kind"] == "event" else "kind"] in ("geofence_enter", "geofence_exit", "geofence_dwell",
                                                                     "stop_approach"):
            assert line["geofence_id"]
    fixes = [line for line in lines if line["kind"] == "fix"]
    # The keys decode-nmea prints, plus kind; thinned by adaptive reporting.
    assert {"time", "lat", "lon", "speed_mps", "course_deg"} <= set(fixes[0])
    total = json.loads(TRUTH.read_text())["drive"]["fixes"]
    assert 0 < len(fixes) <= 0.2 * total


def test_the_same_output_run_to_run(route):
    _, stdout, args = route
    assert process(*args).stdout == stdout


def test_gps_only_without_config_or_fences():
    result = process("--nmea", str(DRIVES / "delivery_route.nmea"))
    assert result.returncode == 0, result.stderr
    types = [json.loads(line).get("type") for line in result.stdout.splitlines()]
    assert "trip_start" in types and "stop_arrive" in types and "geofence_enter" not in types


@pytest.mark.parametrize("content, message", [
    ('{"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {}}]}', "feature 0: needs an id"),
    ("[]", "expected a GeoJSON FeatureCollection"),
])
def test_a_bad_fence_file_is_one_clear_line(tmp_path, content, message):
    fences = tmp_path / "fences.geojson"
    fences.write_text(content)
    result = process("--nmea", str(DRIVES / "delivery_route.nmea"), "--geofences", str(fences))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr and "Traceback" not in result.stderr


def test_a_missing_capture_is_one_clear_line(tmp_path):
    result = process("--nmea", str(tmp_path / "nope.nmea"))
    assert result.returncode == 2 and "cannot read" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.corpus
def test_gps_outage_of_a_real_drive_is_lost_then_regained(corpus):
    result = process("--nmea", str(corpus / "drives" / "genivi_munich-gps.nmea"))
    assert result.returncode == 0, result.stderr
    gps = [json.loads(line) for line in result.stdout.splitlines() if '"gps_' in line]
    assert [e["type"] for e in gps] == ["gps_lost", "gps_regained"]
    assert gps[0]["time"].startswith("2009-04-01T") and gps[1]["outage_s"] > 0


def _sentence(body: str) -> str:
    checksum = 0
    for ch in body.encode("ascii"):
        checksum ^= ch
    return f"${body}*{checksum:02X}\r\n"


def _rmc_gga(t: int, lat: float) -> str:
    """One epoch at 12:00:00 + t s on 2026-03-02, at (lat N, 4.35 E), 10 knots north."""
    hhmmss = f"12{t // 60:02d}{t % 60:02d}.00"
    ddmm = f"{int(lat):02d}{(lat - int(lat)) * 60:07.4f}"
    return (_sentence(f"GPRMC,{hhmmss},A,{ddmm},N,00421.0000,E,10.0,0.0,020326,,,A")
            + _sentence(f"GPGGA,{hhmmss},{ddmm},N,00421.0000,E,1,09,0.9,5.0,M,47.0,M,,"))


def test_a_gap_in_the_capture_is_gps_silent_then_regained(tmp_path):
    capture = tmp_path / "gap.nmea"
    # 20 s of fixes, 30 s of nothing (receiver unplugged), 20 s of fixes.
    capture.write_text("".join(_rmc_gga(t, 52.0 + t * 5.14 / 111_195) for t in [*range(20), *range(50, 70)]))
    result = process("--nmea", str(capture))
    assert result.returncode == 0, result.stderr
    gps = [json.loads(line) for line in result.stdout.splitlines() if '"gps_' in line]
    assert [(e["type"], e["time"]) for e in gps] == [
        ("gps_silent", "2026-03-02T12:00:24.000Z"),  # the last fix at 12:00:19, plus gps.silent_timeout_s (5 s)
        ("gps_regained", "2026-03-02T12:00:50.000Z"),
    ]
