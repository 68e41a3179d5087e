"""The last time the host clock was known to be right, kept across power cuts: a Pi has no RTC.

Raspberry Pi OS's fake-hwclock restores at boot the time it saved at shutdown or hourly; a box
whose power the ignition relay cuts, or an image without fake-hwclock, boots in 1970 or at a stale
time. The agent keeps its own: ``{data_dir}/clock.json`` holds a wall time at which GPS confirmed
the host clock (within ``gps.clock_margin_s``), saved at most once an hour and when the agent
stops. At start, a host clock behind that time is certainly wrong: a ``clock_behind`` status
record says so, and with ``gps.set_clock: true`` (CAP_SYS_TIME, granted by the systemd unit) the
clock is set forward to the last known time, so records, TLS and the edge logic start from a time
near the truth until the first fix sets it exactly.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable

from agent.clock import Clock
from agent.record import Record, Status
from agent.state_file import StateFile

log = logging.getLogger(__name__)

STATE = "clock"  # {data_dir}/clock.json
SAVE_INTERVAL_S = 3600.0  # as fake-hwclock's hourly cron job: one small write an hour
CHECK_INTERVAL_S = 60.0


class LastKnownTime:
    """Restores the host clock at start, then remembers times GPS confirmed; ``settime`` is
    ``time.clock_settime`` (injectable: tests must not move the machine's clock)."""

    def __init__(self, data_dir: str | Path, clock: Clock,
                 settime: Callable[[int, float], None] = time.clock_settime) -> None:
        self.clock = clock
        self._state = StateFile(data_dir, STATE)
        self._settime = settime
        self._saved_at: float | None = None  # wall time of the last save in this run
        self.confirmed = False  # GPS confirmed the host clock during this run

    def last(self) -> float | None:
        """The saved time, or None (none saved, or not a number)."""
        utc = self._state.load().get("utc")
        return float(utc) if isinstance(utc, (int, float)) and not isinstance(utc, bool) else None

    def restore(self, set_clock: bool) -> Record | None:
        """At start: a ``clock_behind`` status record when the host clock is behind the saved time
        (after setting it forward when ``set_clock``), else None."""
        last = self.last()
        wall = self.clock.wall()
        if last is None or wall >= last:
            return None
        corrected = False
        if set_clock:
            try:
                self._settime(time.CLOCK_REALTIME, last)
                corrected = True
            except OSError as exc:
                log.warning("clock: cannot set the system clock: %s (needs CAP_SYS_TIME)", exc.strerror or exc)
        log.warning("clock: the host clock (%s) is %.0f s behind the last time GPS confirmed (%s)%s",
                    _iso(wall), last - wall, _iso(last), ": set forward to it" if corrected else "")
        attrs = {"behind_s": round(last - wall, 3), "last_known_utc": last, "corrected": corrected}
        return Record(utc=self.clock.wall(), mono=self.clock.monotonic(), data=Status(type="clock_behind", attrs=attrs))

    def confirm(self) -> None:
        """GPS agrees with the host clock now: save the time if the last save is an hour old."""
        self.confirmed = True
        wall = self.clock.wall()
        if self._saved_at is None or wall - self._saved_at >= SAVE_INTERVAL_S or wall < self._saved_at:
            self._save(wall)

    def run(self, confirmed: Callable[[], bool], stop: threading.Event) -> None:
        """Every minute, ``confirm()`` when ``confirmed()`` says GPS agrees; at stop, save once more
        if GPS confirmed the clock in this run (the time a power-up will be compared with)."""
        while not stop.wait(CHECK_INTERVAL_S):
            if confirmed():
                self.confirm()
        if self.confirmed or confirmed():
            self._save(self.clock.wall())

    def _save(self, wall: float) -> None:
        self._state.save({"utc": round(wall, 3)})
        self._saved_at = wall


def _iso(utc: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(utc))
