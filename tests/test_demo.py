"""The main job as README's first command runs it: the bundled drive through a pty, the agent process,
a real Mosquitto and the collector process, ending with a summary."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SIM = str(Path(sys.executable).parent / "telematics-sim")


def test_demo_replays_the_bundled_drive_and_summarises(mosquitto, tmp_path):
    workdir = tmp_path / "demo"
    result = subprocess.run(
        [SIM, "demo", "--speed", "40", "--workdir", str(workdir), "--broker", f"127.0.0.1:{mosquitto.port}"],
        capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "device demo-truck-01:" in out and "records stored" in out
    assert "distance 1.78 km" in out, "the bundled drive's length"
    for event in ("geofence_enter", "stop_arrive", "harsh_brake", "overspeed", "trip_start"):
        assert event in out, f"{event} missing from the summary:\n{out}"
    assert (workdir / "collector.sqlite").is_file() and (workdir / "agent.log").is_file()
    assert "Traceback" not in (workdir / "agent.log").read_text()


def test_demo_without_the_drive_is_one_clear_line(tmp_path):
    result = subprocess.run([SIM, "demo", "--nmea", str(tmp_path / "none.nmea")], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.strip().endswith("no such drive")
