"""The ignition-sense input (gpiozero), debounced, as Status records of type "ignition".

A record ``Status(type="ignition", attrs={"on": bool})`` is emitted at start (the level found) and
on every debounced change; trips, the reporting profile and the power manager follow it. The line
must hold a new level for ``gpio.ignition_debounce_s`` before it counts: cranking the engine dips
the supply and loose contacts bounce.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from agent.clock import Clock
from agent.config import GpioConfig
from agent.record import Record, Status

log = logging.getLogger(__name__)

# How often the line is sampled; far below any useful debounce time, far above the cost of a read.
POLL_S = 0.02


class IgnitionSource:
    """Samples the ignition pin; emits a record per debounced change; tells listeners (power, LEDs)."""

    name = "ignition"

    def __init__(self, config: GpioConfig, clock: Clock, pin_factory=None) -> None:
        if config.ignition_pin is None:
            raise ValueError("gpio.ignition_pin is not set: no ignition line to read")
        self.config = config
        self.clock = clock
        self.pin_factory = pin_factory
        self.on: bool | None = None  # the debounced state; None until the first reading
        self._listeners: list[Callable[[bool], None]] = []

    def add_listener(self, listener: Callable[[bool], None]) -> None:
        """Call ``listener(on)`` (in this source's thread) at start and on every debounced change."""
        self._listeners.append(listener)

    def run(self, emit: Callable[[Record], None], stop: threading.Event) -> None:
        from gpiozero import DigitalInputDevice

        # pull_up=True: the line pulls the pin low when the ignition is on, and gpiozero reports that
        # as active; either way device.value is 1 with the ignition on.
        device = DigitalInputDevice(self.config.ignition_pin, pull_up=self.config.ignition_pull_up,
                                    pin_factory=self.pin_factory)
        try:
            self._commit(bool(device.value), emit)
            candidate, since = self.on, self.clock.monotonic()
            while not stop.wait(POLL_S):
                level = bool(device.value)
                now = self.clock.monotonic()
                if level != candidate:
                    candidate, since = level, now
                elif level != self.on and now - since >= self.config.ignition_debounce_s:
                    self._commit(level, emit)
        finally:
            device.close()

    def _commit(self, on: bool, emit: Callable[[Record], None]) -> None:
        first = self.on is None
        self.on = on
        log.info("ignition %s%s", "on" if on else "off", " at start" if first else "")
        emit(Record(utc=self.clock.wall(), mono=self.clock.monotonic(), data=Status(type="ignition", attrs={"on": on})))
        for listener in self._listeners:
            listener(on)
