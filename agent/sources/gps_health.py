"""What every GPS source does with what it decoded: fix records, the status events (fix lost, fix
regained, receiver silent), the host-clock check, and the counters the status output reads."""

from __future__ import annotations

import logging

from agent.clock import Clock
from agent.config import GpsConfig
from agent.decode.nmea import invalid_reason
from agent.pipeline import Emit
from agent.record import Event, Fix, Record
from agent.sources.gps_clock import ClockCheck

log = logging.getLogger(__name__)

# A fix is lost when this many epochs in a row bring no valid fix (one bad epoch is noise).
LOST_AFTER_EPOCHS = 2


class GpsHealth:
    """Turns what a receiver does into ``gps_lost`` / ``gps_regained`` / ``gps_silent`` events.

    States: ``unknown`` (start), ``fix``, ``no_fix``, ``silent``. ``gps_lost`` when a fix was held and
    :data:`LOST_AFTER_EPOCHS` epochs brought no valid one; ``gps_silent`` when nothing came for
    ``silent_timeout_s`` (port gone, receiver dead, wrong baud rate); ``gps_regained`` at the first
    valid fix after either. Pure state machine: the caller passes the clocks' readings.
    """

    def __init__(self, silent_timeout_s: float) -> None:
        self.silent_timeout_s = silent_timeout_s
        self.state = "unknown"
        self.last_data_mono: float | None = None
        self.last_fix: tuple[float, float, Fix] | None = None  # (utc, mono, fix) of the last valid fix
        self._bad_epochs = 0
        self._since_mono: float | None = None  # when the current outage began

    def data(self, mono: float) -> None:
        """Bytes (or a report) arrived."""
        self.last_data_mono = mono
        if self._since_mono is None:
            self._since_mono = mono

    def epoch(self, utc: float | None, mono: float, fix: Fix | None) -> Event | None:
        """One receiver epoch ended, with its fix (None: no position). Returns an event or None."""
        if fix is not None and invalid_reason(fix) is None and utc is not None:
            self._bad_epochs = 0
            previous, self.state = self.state, "fix"
            self.last_fix = (utc, mono, fix)
            if previous in ("no_fix", "silent"):
                outage = None if self._since_mono is None else round(mono - self._since_mono, 3)
                self._since_mono = None
                return Event(type="gps_regained", lat=fix.lat, lon=fix.lon, attrs={"outage_s": outage})
            self._since_mono = None
            return None
        self._bad_epochs += 1
        if self.state == "fix" and self._bad_epochs >= LOST_AFTER_EPOCHS:
            self.state = "no_fix"
            self._since_mono = mono
            return self._event("gps_lost")
        if self.state == "unknown" and self._bad_epochs >= LOST_AFTER_EPOCHS:
            self.state = "no_fix"
            self._since_mono = mono
        return None

    def tick(self, mono: float) -> Event | None:
        """Called regularly; reports silence once per silent spell."""
        if self.state == "silent":
            return None
        last = self.last_data_mono
        if last is None:
            last = self._since_mono
            if last is None:
                self._since_mono = mono
                return None
        if mono - last >= self.silent_timeout_s:
            self.state = "silent"
            self._bad_epochs = 0
            if self._since_mono is None:
                self._since_mono = last
            return self._event("gps_silent", {"silent_s": round(mono - last, 3)})
        return None

    def _event(self, kind: str, attrs: dict | None = None) -> Event:
        if self.last_fix is None:
            return Event(type=kind, attrs=attrs or {})
        fix = self.last_fix[2]
        return Event(type=kind, lat=fix.lat, lon=fix.lon, attrs=attrs or {})

    def record(self, event: Event, wall: float, mono: float) -> Record:
        """``event`` as a record, stamped by :meth:`event_utc`."""
        return Record(utc=self.event_utc(wall, mono), mono=mono, data=event)

    def event_utc(self, wall: float, mono: float) -> float:
        """The UTC to stamp an event with: the last GPS time carried forward by the monotonic clock
        (the host clock of a Pi may be unset), else the wall clock."""
        if self.last_fix is None:
            return wall
        utc, fix_mono, _ = self.last_fix
        return utc + (mono - fix_mono)


class GpsOutput:
    """Turns a source's epochs into records and keeps ``stats`` (shared with the source's own keys).

    ``label`` names the receiver in log lines (the port, or the gpsd server).
    """

    def __init__(self, config: GpsConfig, clock: Clock, stats: dict, label: str) -> None:
        self.clock = clock
        self.stats = stats
        self.label = label
        self.health = GpsHealth(config.silent_timeout_s)
        self.clock_check = ClockCheck(config.clock_margin_s, config.set_clock)
        stats.update({"state": "unknown", "fixes": 0, "last_fix_utc": None, "clock_offset_s": None, "clock_ok": None})

    def data(self) -> None:
        """Bytes or a report arrived from the receiver."""
        self.health.data(self.clock.monotonic())

    def fix(self, utc: float, fix: Fix, emit: Emit) -> None:
        """An epoch with a fix."""
        mono = self.clock.monotonic()
        emit(Record(utc=utc, mono=mono, data=fix))
        self.stats["fixes"] += 1
        self.stats["last_fix_utc"] = utc
        self.stats["satellites"] = fix.sats_used
        self.stats["mode"] = fix.mode
        status = self.clock_check.check(utc, fix, self.clock.wall(), mono)
        if status is not None:
            emit(status)
        self.stats["clock_offset_s"] = self.clock_check.offset_s
        self.stats["clock_ok"] = self.clock_check.ok
        self._event(self.health.epoch(utc, mono, fix), emit)

    def no_fix(self, emit: Emit) -> None:
        """An epoch without a usable fix (no position, no date)."""
        self._event(self.health.epoch(None, self.clock.monotonic(), None), emit)

    def tick(self, emit: Emit) -> None:
        """Called regularly: reports silence."""
        self._event(self.health.tick(self.clock.monotonic()), emit)

    def _event(self, event: Event | None, emit: Emit) -> None:
        self.stats["state"] = self.health.state
        if event is not None:
            log.info("gps: %s (%s)", event.type, self.label)
            emit(self.health.record(event, self.clock.wall(), self.clock.monotonic()))
