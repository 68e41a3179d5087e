"""Ignition (debounced), the power sequence after ignition off, and the status LEDs, on gpiozero's MockFactory."""

from __future__ import annotations

import sys
import threading
import time

import pytest
from conftest import wait_until
from gpiozero.pins.mock import MockFactory

from agent.clock import SystemClock
from agent.config import GpioConfig, PowerConfig
from agent.ops.leds import StatusLeds
from agent.ops.power import PowerManager
from agent.ops.status import StatusBoard
from agent.sources.ignition import IgnitionSource

PIN = 17
HOLD = 22
DEBOUNCE = 0.2


class Recorder:
    """The pipeline's emit, keeping what it got."""

    def __init__(self) -> None:
        self.records = []
        self.lock = threading.Lock()

    def __call__(self, record) -> None:
        with self.lock:
            self.records.append(record)

    def of(self, type_: str) -> list[dict]:
        with self.lock:
            return [dict(r.data.attrs) for r in self.records if r.data.type == type_]


@pytest.fixture
def factory():
    factory = MockFactory()
    yield factory
    factory.reset()


@pytest.fixture
def running():
    """Start ``target(*args, stop)`` in a thread; everything started is stopped at the end."""
    started = []

    def start(target, *args):
        stop = threading.Event()
        thread = threading.Thread(target=target, args=(*args, stop), daemon=True)
        thread.start()
        started.append((stop, thread))
        return stop

    yield start
    for stop, thread in started:
        stop.set()
        thread.join(5)
        assert not thread.is_alive()


def ignition(factory, pull_up=False) -> IgnitionSource:
    return IgnitionSource(GpioConfig(ignition_pin=PIN, ignition_pull_up=pull_up, ignition_debounce_s=DEBOUNCE),
                          SystemClock(), pin_factory=factory)


def test_on_and_off(factory, running):
    emit = Recorder()
    running(ignition(factory).run, emit)
    wait_until(lambda: emit.of("ignition") == [{"on": False}], message="the initial state")
    factory.pin(PIN).drive_high()
    wait_until(lambda: emit.of("ignition")[-1:] == [{"on": True}], message="ignition on")
    factory.pin(PIN).drive_low()
    wait_until(lambda: emit.of("ignition")[-1:] == [{"on": False}], message="ignition off")
    assert emit.of("ignition") == [{"on": False}, {"on": True}, {"on": False}]
    assert all(r.kind == "status" for r in emit.records)


def test_a_change_counts_only_after_the_debounce_time(factory, running):
    emit = Recorder()
    running(ignition(factory).run, emit)
    wait_until(lambda: emit.of("ignition"), message="the initial state")
    changed = time.monotonic()
    factory.pin(PIN).drive_high()
    wait_until(lambda: len(emit.of("ignition")) == 2, message="ignition on")
    assert time.monotonic() - changed >= DEBOUNCE


def test_bouncing_is_ignored(factory, running):
    emit = Recorder()
    running(ignition(factory).run, emit)
    wait_until(lambda: emit.of("ignition"), message="the initial state")
    pin = factory.pin(PIN)
    deadline = time.monotonic() + 1.0
    high = False
    while time.monotonic() < deadline:  # a loose contact: every level lasts less than the debounce time
        high = not high
        pin.drive_high() if high else pin.drive_low()
        time.sleep(DEBOUNCE / 4)
    pin.drive_low()
    time.sleep(DEBOUNCE * 2)
    assert emit.of("ignition") == [{"on": False}]
    pin.drive_high()
    wait_until(lambda: len(emit.of("ignition")) == 2, message="the settled level")
    time.sleep(DEBOUNCE * 2)
    assert emit.of("ignition") == [{"on": False}, {"on": True}]


def test_active_low_line(factory, running):
    emit = Recorder()
    factory.pin(PIN)  # created before the device so the pull-up applies from the start
    running(ignition(factory, pull_up=True).run, emit)
    wait_until(lambda: emit.of("ignition") == [{"on": False}], message="pulled up = off")
    factory.pin(PIN).drive_low()
    wait_until(lambda: emit.of("ignition")[-1:] == [{"on": True}], message="pulled low = on")


def test_no_ignition_pin_is_a_configuration_error():
    with pytest.raises(ValueError, match="gpio.ignition_pin"):
        IgnitionSource(GpioConfig(), SystemClock())


def switch_on(factory, source, emit, running) -> None:
    """Start ``source`` (the line reads off), then turn the ignition on."""
    running(source.run, emit)
    wait_until(lambda: emit.of("ignition") == [{"on": False}], message="the initial state")
    factory.pin(PIN).drive_high()
    wait_until(lambda: source.on is True, message="ignition on")


class Flush:
    def __init__(self, result: bool = True) -> None:
        self.calls: list[float] = []
        self.result = result

    def __call__(self, timeout: float) -> bool:
        self.calls.append(timeout)
        return self.result


def shutdown_marker(tmp_path):
    """A shutdown command that leaves a file behind (the real one is `systemctl poweroff`)."""
    marker = tmp_path / "powered-off"
    return marker, [sys.executable, "-c", f"open({str(marker)!r}, 'w').write('bye')"]


def test_run_on_flush_and_shutdown(factory, running, tmp_path):
    marker, command = shutdown_marker(tmp_path)
    flush = Flush()
    power = PowerManager(PowerConfig(run_on_s=0.5, flush_timeout_s=7, hold_pin=HOLD, shutdown=True,
                                     shutdown_command=command), SystemClock(), flush, pin_factory=factory)
    source = ignition(factory)
    source.add_listener(power.on_ignition)
    emit = Recorder()
    switch_on(factory, source, emit, running)
    running(power.run, emit)
    wait_until(lambda: factory.pin(HOLD).state is True, message="the supply held from start-up")

    factory.pin(PIN).drive_low()
    off_at = time.monotonic()
    wait_until(marker.exists, message="the shutdown command")
    assert emit.of("ignition") == [{"on": False}, {"on": True}, {"on": False}]
    assert time.monotonic() - off_at >= 0.5 + DEBOUNCE  # the run-on was kept
    assert [a["state"] for a in emit.of("power")] == ["run_on", "flushing", "shutting_down"]
    assert emit.of("power")[-1] == {"state": "shutting_down", "flushed": True}
    assert flush.calls == [7]
    assert power.state == "shutting_down"
    assert factory.pin(HOLD).state is True  # still held while the system shuts down


def test_ignition_back_on_cancels_the_run_on(factory, running, tmp_path):
    marker, command = shutdown_marker(tmp_path)
    flush = Flush()
    power = PowerManager(PowerConfig(run_on_s=1.5, shutdown=True, shutdown_command=command), SystemClock(), flush)
    source = ignition(factory)
    source.add_listener(power.on_ignition)
    emit = Recorder()
    switch_on(factory, source, emit, running)
    running(power.run, emit)
    factory.pin(PIN).drive_low()
    wait_until(lambda: power.state == "run_on", message="run-on")
    factory.pin(PIN).drive_high()  # a short stop: the driver comes back
    wait_until(lambda: power.state == "on", message="run-on cancelled")
    time.sleep(1.6)
    assert not marker.exists() and flush.calls == []
    assert [a["state"] for a in emit.of("power")] == ["run_on", "on"]


def test_without_shutdown_the_box_stays_up(running):
    flush = Flush(result=False)
    power = PowerManager(PowerConfig(run_on_s=0.1), SystemClock(), flush)
    emit = Recorder()
    running(power.run, emit)
    power.on_ignition(False)
    wait_until(lambda: power.state == "off", message="off after the run-on")
    assert emit.of("power")[-1] == {"state": "off", "flushed": False}


def test_a_refused_shutdown_is_reported(running):
    power = PowerManager(PowerConfig(run_on_s=0.1, shutdown=True, shutdown_command=[sys.executable, "-c",
                         "import sys; sys.exit('Access denied')"]), SystemClock(), Flush())
    emit = Recorder()
    running(power.run, emit)
    power.on_ignition(False)
    wait_until(lambda: power.state == "off", message="staying up")
    assert emit.of("power")[-1]["error"] == "Access denied"


def pin_levels(factory, pin: int, seconds: float) -> set[bool]:
    seen = set()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        seen.add(factory.pin(pin).state)
        time.sleep(0.05)
    return seen


def test_leds_follow_the_status_board(factory, running, data_dir):
    board = StatusBoard(data_dir, SystemClock(), device_id="d")
    depth = {"depth": 10}
    board.update("gps", fix=False)
    board.update("broker", connected=True)
    board.provide("buffer", lambda: dict(depth))
    leds = StatusLeds(GpioConfig(led_gps_pin=5, led_link_pin=6, led_backlog_pin=13, backlog_led_records=100),
                      board, pin_factory=factory, refresh_s=0.1)
    running(leds.run)
    wait_until(lambda: factory.pin(6).state is True, message="link LED on")
    assert pin_levels(factory, 5, 1.2) == {True, False}  # no fix: blinking
    assert pin_levels(factory, 6, 0.3) == {True}
    assert pin_levels(factory, 13, 0.3) == {False}
    board.update("gps", fix=True)
    board.update("broker", connected=False)
    depth["depth"] = 101
    wait_until(lambda: factory.pin(13).state is True, message="backlog LED on")
    assert pin_levels(factory, 5, 0.3) == {True}
    assert pin_levels(factory, 6, 1.2) == {True, False}
