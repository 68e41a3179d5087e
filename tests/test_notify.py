"""sd_notify against a real datagram socket that listens the way systemd does."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from agent.ops.notify import Heartbeat, Notifier, watchdog_interval

# A process shaped like the agent: READY after start-up, a main loop that beats, and a pinger
# whose healthy() is the main loop's heartbeat. The loop blocks for good once BLOCK exists.
AGENT_LIKE = textwrap.dedent(
    """
    import os, sys, time
    from agent.ops.notify import Heartbeat, Notifier, WatchdogPinger, watchdog_interval
    block = sys.argv[1]
    notifier = Notifier()
    heartbeat = Heartbeat(max_age_s=0.3)
    pinger = WatchdogPinger(notifier, watchdog_interval(), heartbeat.healthy)
    pinger.start()
    notifier.ready("running")
    while True:
        heartbeat.beat()
        if os.path.exists(block):
            time.sleep(3600)
        time.sleep(0.02)
    """
)


@pytest.fixture
def notify_socket(tmp_path):
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.05)
    yield path, sock
    sock.close()


def _drain(sock: socket.socket, seconds: float) -> list[str]:
    """Every message received within ``seconds``."""
    out: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            out.append(sock.recv(4096).decode())
        except socket.timeout:
            pass
    return out


def test_ready_then_watchdog_then_silence_when_the_main_loop_blocks(notify_socket, tmp_path):
    path, sock = notify_socket
    block = tmp_path / "block"
    env = dict(os.environ, NOTIFY_SOCKET=str(path), WATCHDOG_USEC="200000")  # 0.2 s: pings every 0.1 s
    env.pop("WATCHDOG_PID", None)
    proc = subprocess.Popen([sys.executable, "-c", AGENT_LIKE, str(block)], env=env)
    try:
        first = _drain(sock, 3.0)
        assert any("READY=1" in m and "STATUS=running" in m for m in first), first
        # WATCHDOG keeps coming: about 10 per second at a 0.1 s interval.
        steady = _drain(sock, 1.0)
        assert sum(m == "WATCHDOG=1" for m in steady) >= 5, steady
        block.touch()
        _drain(sock, 0.6)  # heartbeat max age 0.3 s plus one ping interval
        blocked = _drain(sock, 1.0)
        assert "WATCHDOG=1" not in blocked, blocked
    finally:
        proc.kill()
        proc.wait()


def test_abstract_socket_name(tmp_path):
    name = f"telematics-test-{os.getpid()}-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2)
    try:
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert notifier.status("buffer 12 records")
        assert sock.recv(4096) == b"STATUS=buffer 12 records"
    finally:
        sock.close()


def test_without_notify_socket_nothing_is_sent():
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.ready() is False


def test_missing_socket_is_reported_not_raised(tmp_path):
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert notifier.watchdog() is False


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "x"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env, expected):
    assert watchdog_interval(env) == expected


def test_heartbeat_ages_with_the_clock():
    now = [100.0]
    beat = Heartbeat(5.0, monotonic=lambda: now[0])
    now[0] = 104.0
    assert beat.healthy()
    now[0] = 105.5
    assert not beat.healthy()
    beat.beat()
    assert beat.healthy()


def test_a_full_socket_never_blocks_the_agent(tmp_path):
    """systemd not reading (hung, or busy): sends fail fast instead of hanging the agent."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    try:
        notifier = Notifier({"NOTIFY_SOCKET": str(path)})
        start = time.monotonic()
        results = [notifier.watchdog() for _ in range(2000)]  # far more than the receive queue holds
        assert time.monotonic() - start < 5
        assert results[0] is True and results[-1] is False
    finally:
        sock.close()
