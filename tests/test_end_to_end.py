"""The whole path with real parts: a recorded NMEA drive replayed into a pty, the agent process
reading it with pyserial, a real Mosquitto, the collector storing into SQLite.

Every valid fix of the drive must arrive exactly once and in order, through a broker restart, a
collector restart and a SIGKILL of the agent (minus, for the kill, at most the commit window).
"""

from __future__ import annotations

import math
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agent.decode.nmea import decode_file
from conftest import REPO, wait_until
from sim.replay import NmeaReplay

DRIVE = REPO / "sim" / "drives" / "delivery_route.nmea"
BAUD = 115200
SPEED = 25.0
COMMIT_WINDOW_S = 0.3


DAY_S = 86_400.0
REANCHOR_LOSS = 2  # gps.filter.jump_reanchor (3) - 1


def valid_fix_times(path: Path) -> list[float]:
    """UTC of every fix a correct agent must deliver, unthinned and unfiltered but valid."""
    return [round(utc, 3) for utc, fix in decode_file(path) if fix.quality != 0]


def time_of_day(utc: float) -> float:
    """Fixes compared by time of day: an epoch whose RMC (its date) was missed while the agent restarted
    is dated by the host clock, which a replay of an old drive does not match (a live receiver does)."""
    return round(utc % DAY_S, 3)


def stored_fix_times(db: Path, device: str) -> list[tuple[int, float]]:
    if not db.exists():
        return []
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        rows = conn.execute(
            "SELECT seq, utc FROM records WHERE device = ? AND kind = 'fix' ORDER BY seq", (device,)
        ).fetchall()
    return [(seq, round(utc, 3)) for seq, utc in rows]


class AgentProcess:
    """``telematics-agent run`` as its own process, as systemd runs it."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config, self.log = config, log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        exe = Path(sys.executable).parent / "telematics-agent"
        self.proc = subprocess.Popen(
            [str(exe), "run", "--config", str(self.config)],
            stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
        )

    def port_opened(self) -> int:
        """How many times an agent process of this test opened the GPS port (from its log)."""
        return self.log.read_text(errors="replace").count("open at") if self.log.exists() else 0

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def drive_rig(tmp_path, mosquitto, collector_sqlite):
    """Replay (not yet started), agent process (started) and collector, wired together."""
    replay = NmeaReplay(DRIVE, speed=SPEED, keep_dates=True, baud=BAUD)
    pty_path = replay.open_pty()
    config = tmp_path / "agent.yaml"
    config.write_text(
        f"device: {{id: e2e-truck, data_dir: {tmp_path / 'agent-data'}}}\n"
        # The drive keeps its recorded dates: the edge filter must not call its fixes too old.
        f"gps: {{port: {pty_path}, baud: {BAUD}, filter: {{max_age_s: 10000000000.0}}}}\n"
        f"mqtt: {{host: 127.0.0.1, port: {mosquitto.port}, topic_prefix: telematics, ack_timeout_s: 5,"
        f" reconnect_min_s: 0.2, reconnect_max_s: 1}}\n"
        f"buffer: {{commit_window_s: {COMMIT_WINDOW_S}}}\n"
        "edge: {reporting: {enabled: false}}\n"
    )
    agent = AgentProcess(config, tmp_path / "agent.log")
    agent.start()
    # pyserial discards what waits in the port when it opens it: start the drive once the agent listens.
    wait_until(lambda: agent.port_opened() == 1, timeout=30, message="the agent opened the GPS pty")
    done = threading.Event()
    thread = threading.Thread(target=lambda: (replay.run(), done.set()), daemon=True)
    yield replay, agent, collector_sqlite, mosquitto, done, thread
    agent.stop()
    replay_stop = getattr(replay, "close", None)
    if replay_stop:
        replay_stop()


def _progress(db: Path) -> int:
    return len(stored_fix_times(db, "e2e-truck"))


def test_every_fix_arrives_exactly_once_through_broker_and_collector_restarts(drive_rig):
    replay, agent, collector, broker, done, thread = drive_rig
    expected = valid_fix_times(DRIVE)
    assert len(expected) > 200, "the bundled drive is a few minutes at 1 Hz"
    db = Path(collector.db_path)
    thread.start()

    wait_until(lambda: _progress(db) > len(expected) // 4, timeout=60, message="a quarter of the drive stored")
    broker.restart()  # persistence false: whatever the broker held is gone
    wait_until(lambda: _progress(db) > len(expected) // 2, timeout=60, message="half the drive stored after the broker restart")
    collector.stop()
    wait_until(lambda: done.is_set() or replay_is_past(replay, 0.75), timeout=60, message="replay three quarters through")
    collector.start()
    wait_until(done.is_set, timeout=120, message="replay finished")
    wait_until(lambda: _progress(db) >= len(expected), timeout=120, message="every fix stored")

    rows = stored_fix_times(db, "e2e-truck")
    seqs = [seq for seq, _ in rows]
    times = [utc for _, utc in rows]
    assert len(seqs) == len(set(seqs))
    assert times == expected, "every valid fix exactly once, in the drive's order"


def replay_is_past(replay: NmeaReplay, fraction: float) -> bool:
    total = sum(len(data) for _, data in replay.lines)
    return replay.bytes_written >= fraction * total


def test_sigkill_loses_at_most_the_commit_window(drive_rig):
    replay, agent, collector, broker, done, thread = drive_rig
    expected = valid_fix_times(DRIVE)
    db = Path(collector.db_path)
    thread.start()
    wait_until(lambda: _progress(db) > len(expected) // 3, timeout=60, message="a third of the drive stored")
    killed_at = time.monotonic()
    agent.kill()
    agent.start()  # the drive goes on meanwhile, as a GPS does while the agent restarts
    wait_until(lambda: agent.port_opened() == 2, timeout=30, message="the restarted agent opened the GPS pty")
    downtime_s = time.monotonic() - killed_at
    wait_until(done.is_set, timeout=120, message="replay finished")
    # The run of fixes the kill can cost: what was appended within the last commit window (not yet
    # fsynced), the epoch being assembled and the records between source and buffer, plus what the
    # receiver sent while no agent was reading (pyserial discards a port's input when it opens it),
    # and, when the first epoch read lacks its RMC and is dated by the host clock, the fixes the
    # filter rejects before it re-anchors on the receiver's dates (gps.filter.jump_reanchor - 1).
    allowed = math.ceil((COMMIT_WINDOW_S + downtime_s) * SPEED) + 3 + REANCHOR_LOSS
    wait_until(lambda: _progress(db) >= len(expected) - allowed, timeout=120, message="the drive stored")
    time.sleep(2 * COMMIT_WINDOW_S + 1)  # let resends (wrongly) double something before judging
    rows = stored_fix_times(db, "e2e-truck")
    times = [time_of_day(utc) for _, utc in rows]
    expected = [time_of_day(utc) for utc in expected]
    assert len(times) == len(set(times)), "no fix stored twice"
    assert times == sorted(times), "fixes in order"
    assert set(times) <= set(expected)
    missing = [i for i, utc in enumerate(expected) if utc not in set(times)]
    assert len(missing) <= allowed, f"lost {len(missing)} fixes (allowed {allowed}): {missing}"
    if missing:  # one run around the kill, with at most the re-dated epoch stored inside it
        assert missing[-1] - missing[0] + 1 <= len(missing) + 1, f"losses are one run around the kill: {missing}"
