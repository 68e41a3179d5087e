"""`telematics-agent status` against the real agent process: GPS on a pty, a real Mosquitto."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from functools import reduce
from pathlib import Path

import pytest
from conftest import wait_until

AGENT = str(Path(sys.executable).parent / "telematics-agent")


def nmea(body: str) -> str:
    """A sentence with its NMEA 0183 checksum (XOR of the bytes between $ and *)."""
    return f"${body}*{reduce(lambda a, c: a ^ ord(c), body, 0):02X}\r\n"


def feed_gps(gps, stop: threading.Event) -> None:
    """A receiver with a fix, once a second like a real one, at the current time."""
    while not stop.is_set():
        t = time.gmtime()
        hms, dmy = time.strftime("%H%M%S", t), time.strftime("%d%m%y", t)
        try:
            gps.write(nmea(f"GPGGA,{hms}.00,5230.000,N,01322.000,E,1,09,0.9,35.0,M,40.0,M,,")
                      + nmea(f"GPRMC,{hms}.00,A,5230.000,N,01322.000,E,0.0,0.0,{dmy},,,A"))
        except OSError:
            return
        stop.wait(1.0)


def status(data_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([AGENT, "status", "--data-dir", str(data_dir), *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
def running_agent(tmp_path, data_dir, pty_gps, mosquitto):
    config = tmp_path / "agent.yaml"
    config.write_text(
        f"device:\n  id: truck-s\n  data_dir: {data_dir}\ngps:\n  port: {pty_gps.path}\n"
        f"mqtt:\n  port: {mosquitto.port}\nstatus:\n  interval_s: 0.5\n"
    )
    stop = threading.Event()
    feeder = threading.Thread(target=feed_gps, args=(pty_gps, stop), daemon=True)
    feeder.start()
    proc = subprocess.Popen([AGENT, "run", "--config", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env={k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"})
    yield proc
    stop.set()
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    feeder.join(5)


def test_status_of_the_running_agent(running_agent, data_dir):
    def ready():
        proc = status(data_dir, "--json")
        if proc.returncode != 0:
            return None
        doc = json.loads(proc.stdout)
        return doc if (doc.get("gps") or {}).get("fix") and (doc.get("broker") or {}).get("connected") else None

    doc = wait_until(ready, timeout=30, interval=0.3, message="a fix and the broker in status.json")
    assert doc["device_id"] == "truck-s" and doc["state"] == "running" and doc["stale"] is False
    assert doc["uptime_s"] > 0 and doc["version"]
    assert doc["buffer"]["depth"] >= 0 and "oldest_utc" in doc["buffer"]
    assert doc["config"]["version"] and "version" in doc["geofences"]
    assert doc["gps"]["last_fix_utc"] is not None and "clock_offset_s" in doc["gps"]
    assert "last_publish_utc" in doc["broker"]

    out = status(data_dir)
    assert out.returncode == 0, out.stdout + out.stderr
    for expected in ("device truck-s", "GPS        fix", "last fix", "Broker     connected, last publish",
                     "Buffer     ", "Versions   config ", "geofences", "Clock      offset", "Records    "):
        assert expected in out.stdout, f"{expected!r} not in:\n{out.stdout}"

    running_agent.send_signal(signal.SIGTERM)
    assert running_agent.wait(30) == 0
    stopped = status(data_dir)
    assert stopped.returncode == 1 and stopped.stdout.startswith("WARNING: agent stopped")
