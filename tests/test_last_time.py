"""The last known time, kept by the agent across power cuts (agent/ops/last_time.py).

``settime`` is injected: a test must not move this machine's clock; what it would set is recorded."""

from __future__ import annotations

import json
import threading
import time

from agent.ops.last_time import SAVE_INTERVAL_S, LastKnownTime


class HandClock:
    """Wall and monotonic time the test sets."""

    def __init__(self, wall: float) -> None:
        self.now = wall

    def wall(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now - 1.7e9


class SetTime:
    """Records clock_settime calls; ``fail`` raises EPERM as an unprivileged process gets."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[int, float]] = []
        self.fail = fail

    def __call__(self, clock_id: int, utc: float) -> None:
        if self.fail:
            raise PermissionError(1, "Operation not permitted")
        self.calls.append((clock_id, utc))


def test_a_clock_behind_the_last_known_time_is_set_forward_and_reported(data_dir):
    (data_dir / "clock.json").write_text(json.dumps({"utc": 1.8e9}))
    settime = SetTime()
    record = LastKnownTime(data_dir, HandClock(86_400.0), settime).restore(set_clock=True)
    assert settime.calls == [(time.CLOCK_REALTIME, 1.8e9)]
    assert record.data.type == "clock_behind"
    assert record.data.attrs == {"behind_s": 1.8e9 - 86_400.0, "last_known_utc": 1.8e9, "corrected": True}


def test_without_set_clock_or_the_capability_it_is_only_reported(data_dir, caplog):
    (data_dir / "clock.json").write_text(json.dumps({"utc": 1.8e9}))
    settime = SetTime()
    record = LastKnownTime(data_dir, HandClock(1.7e9), settime).restore(set_clock=False)
    assert settime.calls == [] and record.data.attrs["corrected"] is False
    record = LastKnownTime(data_dir, HandClock(1.7e9), SetTime(fail=True)).restore(set_clock=True)
    assert record.data.attrs["corrected"] is False
    assert "cannot set the system clock: Operation not permitted (needs CAP_SYS_TIME)" in caplog.text


def test_a_clock_ahead_nothing_saved_or_a_garbled_file_changes_nothing(data_dir):
    settime = SetTime()
    assert LastKnownTime(data_dir, HandClock(1.7e9), settime).restore(set_clock=True) is None  # nothing saved
    for content in ('{"utc": 1.6e9}', '{"utc": "soon"}', '{"utc": true}', "not json", "[]"):
        (data_dir / "clock.json").write_text(content)
        assert LastKnownTime(data_dir, HandClock(1.7e9), settime).restore(set_clock=True) is None, content
    assert settime.calls == []


def test_confirmed_times_are_saved_at_most_hourly_and_at_stop(data_dir):
    clock = HandClock(1.7e9)
    keeper = LastKnownTime(data_dir, clock)
    keeper.confirm()
    assert keeper.last() == 1.7e9
    clock.now += SAVE_INTERVAL_S - 1
    keeper.confirm()
    assert keeper.last() == 1.7e9  # not an hour yet: no write
    clock.now += 1
    keeper.confirm()
    assert keeper.last() == 1.7e9 + SAVE_INTERVAL_S
    clock.now += 10
    stop = threading.Event()
    stop.set()
    keeper.run(lambda: False, stop)  # confirmed earlier in this run: the stop saves the time
    assert keeper.last() == 1.7e9 + SAVE_INTERVAL_S + 10


def test_an_unconfirmed_clock_is_never_saved(data_dir):
    keeper = LastKnownTime(data_dir, HandClock(1.7e9))
    stop = threading.Event()
    stop.set()
    keeper.run(lambda: False, stop)
    assert keeper.last() is None and not (data_dir / "clock.json").exists()


def test_the_agent_reports_a_clock_behind_at_start(tmp_path, data_dir):
    """agent.app.Agent as the daemon runs it (set_clock off: this machine's clock stays as it is)."""
    from conftest import free_port

    from agent.app import Agent
    from agent.buffer.store import DurableBuffer
    from agent.clock import SystemClock
    from agent.config import load_config

    (data_dir / "clock.json").write_text(json.dumps({"utc": time.time() + 86_400}))
    config_path = tmp_path / "agent.yaml"
    config_path.write_text(f"device:\n  id: truck-1\n  data_dir: {data_dir}\ngps:\n  enabled: false\n"
                           f"mqtt:\n  port: {free_port()}\n")
    config = load_config(config_path)
    agent = Agent(config, config_path=config_path)
    agent.start()
    agent.stop()
    buffer = DurableBuffer(data_dir, config.buffer, SystemClock())
    buffer.open()
    try:
        statuses = [r.data for r in buffer.take(100) if r.kind == "status"]
    finally:
        buffer.close()
    (behind,) = [s for s in statuses if s.type == "clock_behind"]
    assert 86_399 < behind.attrs["behind_s"] < 86_401 and behind.attrs["corrected"] is False
