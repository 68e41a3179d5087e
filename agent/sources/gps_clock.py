"""The host clock checked against GPS time: a Raspberry Pi has no real-time clock.

On every valid fix the GPS sources hand ``(fix utc, host wall time)`` to :class:`ClockCheck`. It keeps
the offset (host minus GPS) for the status output, reports a host clock off by more than
``gps.clock_margin_s`` once per state change as a ``Status`` record (``clock_offset``, then
``clock_ok`` when it is back), and, with ``gps.set_clock: true``, sets the system clock to GPS
time (CAP_SYS_TIME, which systemd/telematics-agent.service grants; without it, one log line).
The fix time is set as is: the sentences of an epoch arrive a fraction of a second after it, which
a later NTP sync refines.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from agent.decode.nmea import invalid_reason
from agent.record import Fix, Record, Status

log = logging.getLogger(__name__)


class ClockCheck:
    """Host clock vs GPS time. ``settime`` is ``time.clock_settime`` (injectable: tests must not
    move the machine's clock)."""

    def __init__(
        self, margin_s: float, set_clock: bool, settime: Callable[[int, float], None] = time.clock_settime
    ) -> None:
        self.margin_s = margin_s
        self.set_clock = set_clock
        self._settime = settime
        self.offset_s: float | None = None
        self.ok: bool | None = None  # None until the first valid fix
        self.sets = 0
        self._set_failed = False

    def check(self, utc: float, fix: Fix, wall: float, mono: float) -> Record | None:
        """Check the host clock against a fix (only valid fixes count); a status record or None."""
        if invalid_reason(fix) is not None:
            return None
        status = self.fix(utc, wall)
        return None if status is None else Record(utc=utc, mono=mono, data=status)

    def fix(self, utc: float, wall: float) -> Status | None:
        """A valid fix at GPS time ``utc`` arrived when the host clock said ``wall``."""
        offset = wall - utc
        self.offset_s = round(offset, 3)
        if abs(offset) <= self.margin_s:
            if self.ok is False:
                self.ok = True
                log.info("gps: host clock within %.1f s of GPS time again (%+.3f s)", self.margin_s, offset)
                return Status(type="clock_ok", attrs={"offset_s": self.offset_s})
            self.ok = True
            return None
        corrected = self.set_clock and self._set(utc)
        if self.ok is False and not corrected:
            return None
        self.ok = corrected
        log.warning("gps: host clock is %+.3f s off GPS time%s", offset, "; set it to GPS time" if corrected else "")
        return Status(type="clock_offset", attrs={"offset_s": self.offset_s, "corrected": corrected})

    def _set(self, utc: float) -> bool:
        try:
            self._settime(time.CLOCK_REALTIME, utc)
        except OSError as exc:
            if not self._set_failed:
                log.warning("gps: cannot set the system clock: %s (needs CAP_SYS_TIME)", exc.strerror or exc)
                self._set_failed = True
            return False
        self.sets += 1
        return True
