"""The real agent under a notify socket that listens the way systemd does: READY after start-up,
WATCHDOG keeps coming, stops while the process hangs, STOPPING on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

AGENT = str(Path(sys.executable).parent / "telematics-agent")


def received(sock: socket.socket, seconds: float, until: str | None = None) -> list[str]:
    """Messages within ``seconds``, or up to the first one containing ``until``."""
    out: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            out.append(sock.recv(4096).decode())
        except socket.timeout:
            continue
        if until is not None and until in out[-1]:
            break
    return out


@pytest.fixture
def agent(tmp_path, data_dir):
    """Start the real agent under a notify socket; yields (process, socket, log file)."""
    config = tmp_path / "agent.yaml"
    # No GPS, and a broker that is not there: the agent must still start, buffer and stay healthy.
    config.write_text(f"device:\n  id: truck-n\n  data_dir: {data_dir}\ngps:\n  enabled: false\nmqtt:\n  port: 1\n")
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.05)
    env = dict(os.environ, NOTIFY_SOCKET=str(path), WATCHDOG_USEC="1000000")  # WatchdogSec=1: pings every 0.5 s
    env.pop("WATCHDOG_PID", None)
    log = tmp_path / "agent.log"
    proc = subprocess.Popen([AGENT, "run", "--config", str(config)], env=env, stderr=log.open("w"))
    start = received(sock, 15.0, until="READY=1")
    ready = [m for m in start if "READY=1" in m]
    assert ready and "STATUS=running: device truck-n" in ready[0], start
    yield proc, sock, log
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    sock.close()


def test_watchdog_pings_keep_coming_and_stop_while_hung(agent):
    proc, sock, _ = agent
    steady = received(sock, 2.6)
    assert steady.count("WATCHDOG=1") >= 4, steady
    proc.send_signal(signal.SIGSTOP)  # hung: nothing runs, so nothing pings
    received(sock, 0.6)
    assert "WATCHDOG=1" not in received(sock, 1.5)
    proc.send_signal(signal.SIGCONT)
    assert "WATCHDOG=1" in received(sock, 1.5, until="WATCHDOG=1")


def test_stopping_on_sigterm(agent):
    proc, sock, log = agent
    assert "WATCHDOG=1" in received(sock, 1.5, until="WATCHDOG=1")
    proc.send_signal(signal.SIGTERM)
    assert "STOPPING=1" in "".join(received(sock, 10.0, until="STOPPING=1")), log.read_text()[-3000:]
    assert proc.wait(30) == 0
