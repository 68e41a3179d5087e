"""Issue 9's check: the bundled drive replayed through a pty into a running agent (to a real
Mosquitto and the collector) gives the same records as ``telematics-agent process`` on the same
file with the same config."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from agent.record import iso_utc
from conftest import REPO, wait_until
from sim.replay import NmeaReplay

DRIVES = REPO / "sim" / "drives"
TRUTH = json.loads((DRIVES / "delivery_route.truth.json").read_text())
NMEA = DRIVES / TRUTH["files"]["nmea"]
FENCES = DRIVES / TRUTH["files"]["geofences"]
SPEED = 40.0
BAUD = 460800  # 40x the drive's ~250 B/s needs more than 9600 baud carries
# The GPS health events of a live agent also follow the replay's start and end; process has neither.
GPS_HEALTH = {"gps_lost", "gps_regained", "gps_silent"}
TOOLS = Path(sys.executable).parent


def _config(tmp_path: Path, port: int, reporting: bool) -> dict:
    edge = {**TRUTH["edge_settings"], "geofences": {**TRUTH["edge_settings"]["geofences"], "file": str(FENCES)},
            "reporting": {"enabled": reporting}}
    return {
        "device": {"id": "bench-box", "data_dir": str(tmp_path / "agent-data")},
        # The drive keeps its recorded dates (to compare times with process): not "too old" for the fix filter.
        "gps": {"baud": BAUD, "filter": {"max_age_s": 1e10}},
        "mqtt": {"host": "127.0.0.1", "port": port, "topic_prefix": "telematics", "ack_timeout_s": 5},
        "buffer": {"commit_window_s": 0.2},
        "edge": edge,
    }


def _offline(tmp_path: Path, config: dict) -> list[dict]:
    path = tmp_path / "offline.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([str(TOOLS / "telematics-agent"), "process", "--nmea", str(NMEA), "--config", str(path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [r for r in map(json.loads, result.stdout.splitlines()) if r["kind"] in ("fix", "event")]


def _live(tmp_path: Path, config: dict, db: Path) -> tuple[list[dict], str]:
    """Replay the drive into ``telematics-agent run``; what the collector stored, and the agent's log."""
    replay = NmeaReplay(NMEA, speed=SPEED, keep_dates=True, baud=BAUD)
    config["gps"]["port"] = replay.open_pty()
    path = tmp_path / "live.yaml"
    path.write_text(yaml.safe_dump(config))
    log = tmp_path / "agent.log"
    agent = subprocess.Popen([str(TOOLS / "telematics-agent"), "run", "--config", str(path)],
                             stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        # pyserial flushes the port when it opens it: start the drive only once the agent has.
        wait_until(lambda: " open at " in log.read_text(), timeout=30, message="the agent opening the pty")
        worker = threading.Thread(target=replay.run)
        worker.start()
        worker.join(60)
        assert not worker.is_alive()
        # Done when nothing new has been stored for 3 s (the publisher sends within batch_max_wait_s).
        last = (-1, time.monotonic())
        while time.monotonic() - last[1] < 3.0:
            count = len(_stored(db))
            if count != last[0]:
                last = (count, time.monotonic())
            time.sleep(0.2)
    finally:
        agent.terminate()
        agent.wait(20)
        replay.close()
    return _stored(db), log.read_text()


def _stored(db: Path) -> list[dict]:
    """Fixes and events the collector stored, in the agent's order, in process's JSON shape."""
    if not db.exists():
        return []
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        rows = conn.execute("SELECT utc, data FROM records WHERE kind IN ('fix', 'event') ORDER BY seq").fetchall()
    out = []
    for utc, data in rows:
        payload = json.loads(data)
        payload.update(payload.pop("attrs", None) or {})
        out.append({**payload, "time": iso_utc(utc)})
    return out


def _at_wire_resolution(fix: dict) -> tuple:
    """Time, position and speed at the resolutions wire format v2 states (docs/wire-format.md):
    what reached the collector is lossless at those, not bit for bit."""
    return fix["time"], round(fix["lat"], 7), round(fix["lon"], 7), round(fix["speed_mps"], 2)


def test_every_fix_of_the_replay_is_the_fix_process_decodes(tmp_path, mosquitto, collector_sqlite):
    config = _config(tmp_path, mosquitto.port, reporting=False)
    want = [_at_wire_resolution(r) for r in _offline(tmp_path, config) if r["kind"] == "fix"]
    assert len(want) == TRUTH["drive"]["fixes"]
    stored, log = _live(tmp_path, config, Path(collector_sqlite.db_path))
    got = [_at_wire_resolution(r) for r in stored if r["kind"] == "fix"]
    assert got == want, log[-2000:]


def test_events_and_reported_fixes_of_the_replay_are_what_process_reports(tmp_path, mosquitto, collector_sqlite):
    config = _config(tmp_path, mosquitto.port, reporting=True)

    def key(r: dict) -> tuple:
        return (r["kind"], r.get("type"), r["time"], r.get("geofence_id"))

    want = [key(r) for r in _offline(tmp_path, config) if r.get("type") not in GPS_HEALTH]
    assert sum(1 for k in want if k[0] == "event") >= 15
    stored, log = _live(tmp_path, config, Path(collector_sqlite.db_path))
    got = [key(r) for r in stored if r.get("type") not in GPS_HEALTH]
    want_events = [k for k in want if k[0] == "event"]
    assert sorted(k for k in got if k[0] == "event") == sorted(want_events), log[-2000:]
    # Every fix process reports, the live agent reported too, but for the capture's last fix: process
    # flushes it at the end of its input, which a live agent cannot see coming.
    got_fixes = {k for k in got if k[0] == "fix"}
    want_fixes = [k for k in want if k[0] == "fix"]
    assert len(want_fixes) > 20
    assert [k for k in want_fixes if k not in got_fixes] in ([], [want_fixes[-1]])
