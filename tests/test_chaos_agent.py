"""Chaos with the whole agent: ``telematics-agent run`` reads a real drive replayed into a pty while the
test SIGKILLs and restarts it 50 times at random moments, and restarts the broker and the collector
now and then. Afterwards the collector holds each fix of the drive at most once, in order, and the
fixes it lacks are no more than what the kills can cost: the commit window before each kill, plus
what the receiver sent while no agent was reading (pyserial discards a port's input when it opens
it, as on the truck, where a restarting agent misses the GPS's sentences too).

(tests/test_transport_chaos.py does the same to the buffer and the link alone, with the exact
accepted-record bookkeeping a synthetic producer allows.)
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import wait_until
from sim.replay import NmeaReplay
from test_end_to_end import BAUD, COMMIT_WINDOW_S, REANCHOR_LOSS, AgentProcess, stored_fix_times, time_of_day

pytestmark = pytest.mark.slow

KILLS = 50
SPEED = 10.0
DEVICE = "e2e-truck"


def expected_fix_times(drive: Path, config: Path) -> list[float]:
    """The fixes `telematics-agent process` reports for the drive with the agent's own config
    (the same fix filter; reporting off): what a run without kills must deliver."""
    out = subprocess.run(
        [str(Path(sys.executable).parent / "telematics-agent"), "process", "--nmea", str(drive), "--config", str(config)],
        capture_output=True, text=True, check=True,
    ).stdout
    from agent.record import parse_iso_utc

    return [round(parse_iso_utc(r["time"]), 3) for r in map(json.loads, out.splitlines()) if r["kind"] == "fix"]


@pytest.mark.timeout(1200)
def test_fifty_agent_kills_with_broker_and_collector_restarts(tmp_path, corpus, mosquitto, collector_sqlite):
    drive = corpus / "drives" / "genivi_munich-gps.nmea"  # 31 minutes at 1 Hz, a tunnel, a time step back
    replay = NmeaReplay(drive, speed=SPEED, keep_dates=True, baud=BAUD)
    pty_path = replay.open_pty()
    config = tmp_path / "agent.yaml"
    config.write_text(
        f"device: {{id: {DEVICE}, data_dir: {tmp_path / 'agent-data'}}}\n"
        # A 2009 drive: no week-rollover correction, and not "too old" for the filter.
        f"gps: {{port: {pty_path}, baud: {BAUD}, rollover_floor: 2000-01-01, filter: {{max_age_s: 10000000000.0}}}}\n"
        f"mqtt: {{host: 127.0.0.1, port: {mosquitto.port}, topic_prefix: telematics, ack_timeout_s: 3,"
        " reconnect_min_s: 0.1, reconnect_max_s: 0.5}\n"
        f"buffer: {{commit_window_s: {COMMIT_WINDOW_S}}}\n"
        "edge: {reporting: {enabled: false}}\n"
    )
    expected = expected_fix_times(drive, config)
    assert len(expected) > 1400
    agent = AgentProcess(config, tmp_path / "agent.log")
    agent.start()
    wait_until(lambda: agent.port_opened() == 1, timeout=30, message="the agent opened the GPS pty")
    done = threading.Event()
    threading.Thread(target=lambda: (replay.run(), done.set()), daemon=True).start()

    rng = random.Random(20261128)
    downtimes: list[float] = []
    broker_restarts = collector_restarts = 0
    try:
        for kill in range(KILLS):
            assert not done.is_set(), f"the drive ended after {kill} kills: replay it slower"
            time.sleep(rng.uniform(0.3, 1.5))
            killed_at = time.monotonic()
            agent.kill()
            agent.start()
            wait_until(lambda: agent.port_opened() == kill + 2, timeout=30, message=f"restart {kill + 1} opened the pty")
            downtimes.append(time.monotonic() - killed_at)
            if rng.random() < 0.2:
                mosquitto.restart()
                broker_restarts += 1
            elif rng.random() < 0.2:
                collector_sqlite.stop()
                time.sleep(rng.uniform(0.1, 1.0))
                collector_sqlite.start()
                collector_restarts += 1
        wait_until(done.is_set, timeout=300, message="the drive replayed to its end")
        allowed = sum(math.ceil((COMMIT_WINDOW_S + d) * SPEED) + 3 + REANCHOR_LOSS for d in downtimes)
        db = Path(collector_sqlite.db_path)
        # Settled: nothing new stored for longer than ack_timeout_s (a wrong resend would have doubled
        # something by then).
        last, since = -1, time.monotonic()
        while time.monotonic() - since < 5.0:
            count = len(stored_fix_times(db, DEVICE))
            if count != last:
                last, since = count, time.monotonic()
            time.sleep(0.5)
        rows = stored_fix_times(db, DEVICE)
    finally:
        agent.stop()
        replay.close()
    times = [time_of_day(utc) for _, utc in rows]
    expected = [time_of_day(utc) for utc in expected]
    missing = len(set(expected) - set(times))
    print(f"\nchaos: {KILLS} agent kills, {broker_restarts} broker and {collector_restarts} collector restarts; "
          f"fixes expected {len(expected)}, stored {len(times)}, lost {missing} (allowed {allowed}), "
          f"duplicated {len(times) - len(set(times))}")
    assert len(times) == len(set(times)), "no fix stored twice"
    assert set(times) <= set(expected), "nothing the drive does not hold"
    in_order = [utc for utc in expected if utc in set(times)]
    assert times == in_order, "fixes in the drive's order"
    assert missing <= allowed, f"lost {missing} fixes, the kills allow {allowed}"
