"""After the ignition goes off: keep reporting, flush, and optionally power the box down cleanly.

States: ``on`` -> (ignition off) ``run_on`` for ``power.run_on_s`` -> (ignition still off) ``flushing``
(up to ``power.flush_timeout_s``) -> ``shutting_down`` when ``power.shutdown`` is set (through logind,
which the polkit rule allows the agent's user), else back to ``off`` and waiting. The ignition
coming back during the run-on cancels it. The optional power-hold output is driven from start-up
so the supply stays on through the run-on and the shutdown; the power supply HAT must keep power
for its own delay after the line drops (or use the kernel's gpio-poweroff overlay, docs/device.md).
"""

from __future__ import annotations

import logging
import subprocess
import threading
from typing import Callable

from agent.clock import Clock
from agent.config import PowerConfig
from agent.record import Record, Status

log = logging.getLogger(__name__)


class PowerManager:
    """Runs the run-on / flush / shutdown sequence; ``on_ignition`` is fed by the ignition source."""

    name = "power"

    def __init__(
        self,
        config: PowerConfig,
        clock: Clock,
        flush: Callable[[float], bool],
        *,
        pin_factory=None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.flush = flush
        self.pin_factory = pin_factory
        self.state = "on"
        self._ignition_on = True
        self._off_since: float | None = None
        self._wake = threading.Event()

    def on_ignition(self, on: bool) -> None:
        """The debounced ignition state changed (or was read at start)."""
        self._ignition_on = on
        self._off_since = None if on else self.clock.monotonic()
        self._wake.set()

    def run(self, emit: Callable[[Record], None], stop: threading.Event) -> None:
        """The sequence, in its own thread, until ``stop`` is set or the shutdown was started."""
        hold = None
        if self.config.hold_pin is not None:
            from gpiozero import DigitalOutputDevice

            hold = DigitalOutputDevice(self.config.hold_pin, initial_value=True, pin_factory=self.pin_factory)
            log.info("power hold on GPIO%d asserted", self.config.hold_pin)
        try:
            while not stop.is_set():
                self._wake.clear()
                self._step(emit)
                if self.state == "shutting_down":
                    return
                self._wake.wait(self._timeout())
        finally:
            # Leaving the output asserted until the process ends: releasing it here would cut the
            # supply while systemd is still unmounting file systems.
            if hold is not None and stop.is_set():
                hold.close()

    def _timeout(self) -> float:
        if self.state == "run_on" and self._off_since is not None:
            return max(0.0, self._off_since + self.config.run_on_s - self.clock.monotonic()) + 0.01
        return 1.0

    def _step(self, emit: Callable[[Record], None]) -> None:
        if self._ignition_on:
            if self.state == "run_on":
                self._change("on", emit, "ignition back on: run-on cancelled")
            elif self.state == "off":
                self._change("on", emit, "ignition on")
            return
        if self.state == "on":
            self._change("run_on", emit, f"ignition off: reporting for {self.config.run_on_s:g} s more",
                         run_on_s=self.config.run_on_s)
        elif self.state == "run_on" and self._off_since is not None:
            if self.clock.monotonic() - self._off_since >= self.config.run_on_s:
                self._power_down(emit)

    def _power_down(self, emit: Callable[[Record], None]) -> None:
        self._change("flushing", emit, f"run-on over: flushing the buffer (up to {self.config.flush_timeout_s:g} s)",
                     shutdown=self.config.shutdown)
        flushed = self.flush(self.config.flush_timeout_s)
        if not flushed:
            log.warning("buffer not flushed within %.0f s: the rest stays on disk for the next trip",
                        self.config.flush_timeout_s)
        if not self.config.shutdown:
            self._change("off", emit, "run-on over; staying up (power.shutdown is false)", flushed=flushed)
            return
        command = self.config.shutdown_command
        self._change("shutting_down", emit, f"shutting down: {' '.join(command)}", flushed=flushed)
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            self._shutdown_failed(emit, str(exc))
            return
        if result.returncode != 0:
            self._shutdown_failed(emit, (result.stderr or result.stdout).strip() or f"exit status {result.returncode}")

    def _shutdown_failed(self, emit: Callable[[Record], None], reason: str) -> None:
        log.error("shutdown command %s failed: %s", self.config.shutdown_command, reason)
        self._change("off", emit, "staying up after the failed shutdown", error=reason)

    def _change(self, state: str, emit: Callable[[Record], None], message: str, **attrs) -> None:
        """One log line and one ``power`` status record per state change."""
        self.state = state
        log.info("%s", message)
        emit(Record(utc=self.clock.wall(), mono=self.clock.monotonic(),
                    data=Status(type="power", attrs={"state": state, **attrs})))
