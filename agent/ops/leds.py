"""Status LEDs (gpiozero) an installer can read without a laptop.

- GPS (``gpio.led_gps_pin``): steady with a fix, blinking without.
- Link (``gpio.led_link_pin``): steady while connected to the broker, blinking while not.
- Backlog (``gpio.led_backlog_pin``): on while more than ``gpio.backlog_led_records`` wait on disk.

The LEDs show what the StatusBoard shows (``gps.fix``, ``broker.connected``, ``buffer.depth``), so
the LEDs, ``telematics-agent status`` and status.json never disagree.
"""

from __future__ import annotations

import logging
import threading

from agent.config import GpioConfig
from agent.ops.status import StatusBoard

log = logging.getLogger(__name__)

BLINK_S = 0.5  # on and off times of a blinking LED
REFRESH_S = 1.0


class StatusLeds:
    """Drives the fitted LEDs from the StatusBoard once a second; ``run(stop)`` in its own thread."""

    def __init__(self, config: GpioConfig, board: StatusBoard, pin_factory=None, refresh_s: float = REFRESH_S) -> None:
        self.config = config
        self.board = board
        self.pin_factory = pin_factory
        self.refresh_s = refresh_s
        self._shown: dict[str, str] = {}

    def states(self) -> dict[str, str]:
        """What each LED should show now: "on", "off" or "blink"."""
        status = self.board.snapshot()
        depth = (status.get("buffer") or {}).get("depth") or 0
        return {
            "gps": "on" if (status.get("gps") or {}).get("fix") else "blink",
            "link": "on" if (status.get("broker") or {}).get("connected") else "blink",
            "backlog": "on" if depth > self.config.backlog_led_records else "off",
        }

    def run(self, stop: threading.Event) -> None:
        from gpiozero import LED

        pins = {"gps": self.config.led_gps_pin, "link": self.config.led_link_pin, "backlog": self.config.led_backlog_pin}
        leds = {name: LED(pin, pin_factory=self.pin_factory) for name, pin in pins.items() if pin is not None}
        if not leds:
            return
        try:
            while True:
                wanted = self.states()
                for name, led in leds.items():
                    # Only on a change: blink() restarts gpiozero's blink thread on every call.
                    if self._shown.get(name) != wanted[name]:
                        self._shown[name] = wanted[name]
                        if wanted[name] == "on":
                            led.on()
                        elif wanted[name] == "off":
                            led.off()
                        else:
                            led.blink(on_time=BLINK_S, off_time=BLINK_S)
                if stop.wait(self.refresh_s):
                    break
        finally:
            for led in leds.values():
                led.close()
