"""StatusBoard -> status.json -> `telematics-agent status`, against a board running in its thread."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from conftest import wait_until

from agent.clock import SystemClock
from agent.ops.status import THROTTLE_BITS, StatusBoard, read_power_flags


AGENT = str(Path(sys.executable).parent / "telematics-agent")


def status_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([AGENT, "status", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
def throttled(tmp_path):
    """A file standing in for /sys/devices/platform/soc/soc:firmware/get_throttled."""
    path = tmp_path / "get_throttled"
    path.write_text("50005\n")  # under-voltage now + throttled now; both occurred since boot
    return path


@pytest.fixture
def running_board(data_dir, throttled):
    board = StatusBoard(data_dir, SystemClock(), device_id="truck-7", interval_s=0.5, throttled_path=throttled)
    now = time.time()
    board.update("gps", fix=True, mode=3, satellites=9, last_fix_utc=now - 0.4)
    board.update("can", can0={"frames_per_s": 812.0, "errors": 3, "state": "active"})
    board.provide("buffer", lambda: {"depth": 1234, "oldest_utc": time.time() - 35, "dropped_total": 2})
    board.provide("broker", lambda: {"connected": True, "state": "up", "last_publish_utc": time.time() - 0.9})
    board.update("config", version="3f2a9c1b7e00")
    board.update("geofences", version="depot-v42", count=17)
    board.update("clock", offset_s=0.125, source="gps")
    board.update("ignition", on=True, since_utc=now - 600)
    board.count("counters", "rejected", 4)
    board.count("counters", "rejected")
    board.count("counters", "dropped", 2)
    board.start()
    wait_until(lambda: (data_dir / "status.json").exists(), message="status.json")
    yield board
    board.close()


def test_status_shows_every_field(running_board, data_dir):
    proc = status_cli("--data-dir", str(data_dir))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for expected in (
        "device truck-7",
        "GPS        fix 3D, 9 satellites, last fix",
        "CAN        can0: 812 frames/s, 3 errors, bus active",
        "Buffer     1234 records waiting, oldest 3",
        "Broker     connected, last publish",
        "config 3f2a9c1b7e00, geofences depot-v42 (17 fences)",
        "Clock      offset +0.125 s against gps",
        "Power      NOW: under_voltage, throttled; since boot: under_voltage, throttling",
        "Ignition   on since 10m",
        "Records    dropped 2, dropped_by_buffer 2, rejected 5",
        "telematics-agent 0.",
        " up ",
    ):
        assert expected in out, f"{expected!r} not in:\n{out}"
    assert "WARNING" not in out


def test_status_json_for_scripts(running_board, data_dir):
    proc = status_cli("--json", "--data-dir", str(data_dir))
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    assert status["gps"]["satellites"] == 9
    assert status["can"]["can0"]["frames_per_s"] == 812.0
    assert status["buffer"]["depth"] == 1234
    assert status["broker"]["connected"] is True
    assert status["counters"] == {"rejected": 5, "dropped": 2}
    assert status["power"]["under_voltage"] is True and status["power"]["get_throttled"] == "0x50005"
    assert status["state"] == "running" and status["stale"] is False
    assert status["uptime_s"] >= 0 and status["version"]


def test_status_is_rewritten_while_running(running_board, data_dir):
    first = json.loads((data_dir / "status.json").read_text())["updated_utc"]
    running_board.update("gps", satellites=4)
    wait_until(lambda: json.loads((data_dir / "status.json").read_text())["gps"]["satellites"] == 4, message="rewrite")
    assert json.loads((data_dir / "status.json").read_text())["updated_utc"] > first


def test_stopped_agent_is_reported(data_dir, throttled):
    board = StatusBoard(data_dir, SystemClock(), device_id="truck-7", interval_s=0.5, throttled_path=throttled)
    stop = threading.Event()
    stop.set()
    board.run(stop)  # writes once, then the final "stopped" state
    proc = status_cli("--data-dir", str(data_dir))
    assert proc.returncode == 1
    assert proc.stdout.startswith("WARNING: agent stopped")


def test_stale_status_is_flagged(data_dir, throttled):
    board = StatusBoard(data_dir, SystemClock(), device_id="truck-7", interval_s=0.5, throttled_path=throttled)
    board.write()
    doc = json.loads((data_dir / "status.json").read_text())
    doc["updated_utc"] -= 60
    (data_dir / "status.json").write_text(json.dumps(doc))
    proc = status_cli("--data-dir", str(data_dir))
    assert proc.returncode == 1
    assert "not updating (hung or killed?)" in proc.stdout


def test_no_status_file_is_one_clear_line(data_dir):
    proc = status_cli("--data-dir", str(data_dir))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"telematics-agent status: no status file at {data_dir}/status.json: is the agent running? "
        "(systemctl status telematics-agent)"
    ]


def test_data_dir_from_the_config(running_board, data_dir, tmp_path):
    config = tmp_path / "agent.yaml"
    config.write_text(f"device:\n  id: truck-7\n  data_dir: {data_dir}\n")
    proc = status_cli("--config", str(config))
    assert proc.returncode == 0 and "device truck-7" in proc.stdout


def test_a_failing_provider_does_not_break_the_file(data_dir, throttled):
    board = StatusBoard(data_dir, SystemClock(), device_id="d", throttled_path=throttled)
    board.provide("broker", lambda: 1 / 0)
    assert board.snapshot()["broker"] == {"error": "ZeroDivisionError: division by zero"}


@pytest.mark.parametrize(
    "text, expected",
    [
        ("0\n", {"under_voltage": False, "throttled": False, "under_voltage_occurred": False}),
        ("50000\n", {"under_voltage": False, "under_voltage_occurred": True, "throttling_occurred": True}),
        ("1\n", {"under_voltage": True, "under_voltage_occurred": False}),
        ("80008", {"soft_temperature_limit": True, "soft_temperature_limit_occurred": True, "throttled": False}),
    ],
)
def test_power_flags(tmp_path, text, expected):
    path = tmp_path / "get_throttled"
    path.write_text(text)
    flags = read_power_flags(path)
    assert {k: flags[k] for k in expected} == expected


def test_power_flags_absent_off_a_pi(tmp_path):
    assert read_power_flags(tmp_path / "missing") is None
    (tmp_path / "garbage").write_text("not hex")
    assert read_power_flags(tmp_path / "garbage") is None


@given(word=st.integers(min_value=0, max_value=2**32 - 1), upper=st.booleans(), newline=st.booleans())
def test_power_flags_decode_every_word(tmp_path_factory, word, upper, newline):
    path = tmp_path_factory.mktemp("sys") / "get_throttled"
    text = f"{word:X}" if upper else f"{word:x}"
    path.write_text(text + ("\n" if newline else ""))
    flags = read_power_flags(path)
    assert flags["get_throttled"] == f"0x{word:x}"
    assert {name: flags[name] for name in THROTTLE_BITS.values()} == {
        name: bool(word & (1 << bit)) for bit, name in THROTTLE_BITS.items()
    }


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def wall(self) -> float:
        return 1.8e9 + self.now

    def monotonic(self) -> float:
        return self.now


def test_can_frame_rates_are_derived_from_the_counters(data_dir, throttled):
    clock = FakeClock()
    frames = {"frames": 0, "error_frames": 2, "bus_off": 1, "state": "active"}
    board = StatusBoard(data_dir, clock, device_id="d", throttled_path=throttled)
    board.provide("can", lambda: {"can0": dict(frames)})
    assert "frames_per_s" not in board.snapshot()["can"]["can0"]  # no rate from one reading
    clock.now += 2.0
    frames["frames"] = 1700
    assert board.snapshot()["can"]["can0"]["frames_per_s"] == 850.0
    clock.now += 0.2  # an LED refresh in between: too short to measure, the last rate stands
    frames["frames"] = 1710
    assert board.snapshot()["can"]["can0"]["frames_per_s"] == 850.0
    clock.now += 1.0
    frames["frames"] = 2510
    assert board.snapshot()["can"]["can0"]["frames_per_s"] == 675.0  # (2510 - 1700) / 1.2 s
    frames["frames"] = 5  # the source restarted its counters
    clock.now += 1.0
    board.snapshot()
    clock.now += 1.0
    frames["frames"] = 105
    assert board.snapshot()["can"]["can0"]["frames_per_s"] == 100.0


def test_render_of_the_sources_own_figures():
    """Keys as the GPS and CAN sources report them: frames/error_frames/bus_off, clock_offset_s."""
    from agent.commands.status import render

    now = 1.8e9
    out = render({
        "state": "running", "stale": False, "updated_utc": now, "uptime_s": 5, "age_s": 0.1,
        "gps": {"fix": True, "state": "ok", "last_fix_utc": now - 1, "clock_offset_s": -0.25},
        "can": {"can0": {"frames": 10, "frames_per_s": 1850.0, "error_frames": 7, "bus_off": 1, "state": "active"}},
        "ignition": {"on": False, "since_utc": now - 30}, "power_state": {"state": "run_on"},
    })
    assert "GPS        fix, receiver ok, last fix 1.0 s ago" in out
    assert "CAN        can0: 1850 frames/s, 7 errors, 1 bus-off, bus active" in out
    assert "Clock      offset -0.250 s against GPS time" in out
    assert "Ignition   off since 30.0 s ago (power run_on)" in out
    assert "Power_state" not in out
