"""Chaos: an agent process (buffer + link) is SIGKILLed and restarted at random moments, 50 times,
while the broker and the collector are stopped and restarted at random too. Afterwards the collector
holds every record accepted more than the commit window before each kill, none twice, in order."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from collector.service import Collector
from conftest import wait_until

REPO = Path(__file__).resolve().parent.parent
WINDOW_S = 0.2
# Beyond the window: the commit's own duration and scheduling on a loaded 2-core machine.
SLACK_S = 0.3
KILLS = 50

CHILD = r"""
import sys, threading, time
from pathlib import Path
from agent.buffer.store import DurableBuffer
from agent.clock import SystemClock
from agent.config import BufferConfig, MqttConfig
from agent.publish.mqtt_link import MqttLink
from agent.record import Record, Signal
data, port, life, window = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
buf = DurableBuffer(Path(data), BufferConfig(commit_window_s=window), SystemClock())
buf.open(); buf.start()
config = MqttConfig(port=port, batch_max_wait_s=0.05, ack_timeout_s=2.0, reconnect_min_s=0.1, reconnect_max_s=0.5)
link = MqttLink(config, "chaos-1", buf, SystemClock())
threading.Thread(target=link.run, args=(threading.Event(),), daemon=True).start()
n = 0
while True:
    ids = [life * 1_000_000 + n + k for k in range(5)]
    buf.append([Record(utc=time.time(), mono=time.monotonic(), data=Signal(name="chaos", value=float(i))) for i in ids])
    n += 5
    print(ids[-1], time.monotonic(), flush=True)
    time.sleep(0.02)
"""


class AgentLife:
    """One run of the agent process; remembers what it reported appended, and when."""

    def __init__(self, data_dir: Path, port: int, life: int) -> None:
        self.appended: list[tuple[int, float]] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(data_dir), str(port), str(life), str(WINDOW_S)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            last, at = line.split()
            self.appended.append((int(last), float(at)))

    def kill(self) -> float:
        killed_at = time.monotonic()
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._reader.join()
        self.proc.stdout.close()
        return killed_at

    def ids(self, before: float | None = None) -> set[int]:
        out = set()
        for last, at in self.appended:
            if before is None or at < before:
                out.update(range(last - 4, last + 1))
        return out


def stored_ids(db: Path) -> list[tuple[int, int]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        rows = conn.execute("SELECT seq, data FROM records WHERE device = 'chaos-1' ORDER BY seq").fetchall()
    return [(seq, int(json.loads(data)["value"])) for seq, data in rows]


@pytest.mark.slow
def test_chaos_kills_and_restarts_lose_nothing_beyond_the_window(data_dir, mosquitto, tmp_path):
    rng = random.Random(int(os.environ.get("CHAOS_SEED", "5")))
    collector = Collector("127.0.0.1", mosquitto.port, "telematics", tmp_path / "collector.sqlite").start()
    must_have: set[int] = set()
    produced: set[int] = set()
    events = {"agent_kills": 0, "broker_restarts": 0, "collector_restarts": 0}
    try:
        for life in range(1, KILLS + 1):
            agent = AgentLife(data_dir, mosquitto.port, life)
            time.sleep(rng.uniform(0.4, 1.2))
            action = rng.random()
            if action < 0.2:
                mosquitto.stop()
                time.sleep(rng.uniform(0.1, 0.6))
                mosquitto.start()
                events["broker_restarts"] += 1
            elif action < 0.4:
                collector.stop()
                time.sleep(rng.uniform(0.1, 0.6))
                collector.start(wait_connected=0)
                events["collector_restarts"] += 1
            time.sleep(rng.uniform(0.0, 0.5))
            killed_at = agent.kill()
            events["agent_kills"] += 1
            must_have |= agent.ids(before=killed_at - WINDOW_S - SLACK_S)
            produced |= agent.ids()
        final = AgentLife(data_dir, mosquitto.port, KILLS + 1)
        try:
            wait_until(lambda: must_have <= {i for _, i in stored_ids(collector.db_path)}, 90, interval=0.5,
                       message="every record accepted before the window of each kill")
        finally:
            final.kill()
        produced |= final.ids()
    finally:
        collector.stop()
    rows = stored_ids(tmp_path / "collector.sqlite")
    ids = [i for _, i in rows]
    stored, lost = set(ids), must_have - set(ids)
    duplicated = len(ids) - len(stored)
    print(
        f"\nchaos: {events}; records produced {len(produced)}, required (older than window+slack at each kill) "
        f"{len(must_have)}, stored {len(stored)}, lost of required {len(lost)}, "
        f"lost within the last window before a kill {len((produced - must_have) - stored)}, duplicated {duplicated}"
    )
    assert events["agent_kills"] >= 50
    assert not lost, f"{len(lost)} records accepted before the commit window were lost, e.g. {sorted(lost)[:5]}"
    assert duplicated == 0
    assert ids == sorted(ids), "the stream's order (by seq) matches the order it was accepted in"
    assert stored <= produced
