"""The GPS receiver on a serial port: pyserial bytes -> :class:`NmeaDecoder` -> fix records and GPS events.

The port is opened in :meth:`GpsSerialSource.run`, never in the constructor. When it is missing or
disappears (a USB receiver unplugged, /dev/ttyUSB0 gone) the source logs one line, counts it, and
tries again every ``gps.reopen_interval_s`` until it is back; it logs once more when it is. A line
that goes quiet for ``gps.epoch_timeout_s`` completes the epoch being assembled, so a receiver that
sends only part of what the decoder could wait for still yields one fix per epoch.

Besides fixes it emits ``Event`` records for the backend (see
:class:`agent.sources.gps_health.GpsHealth`): ``gps_lost``, ``gps_regained`` and ``gps_silent``.
"""

from __future__ import annotations

import datetime as _dt
import logging
import select
import threading

from agent.clock import Clock
from agent.config import GpsConfig
from agent.decode.nmea import NmeaDecoder
from agent.pipeline import Emit
from agent.record import Event, Fix, Record
from agent.sources.gps_health import GpsHealth

log = logging.getLogger(__name__)

def floor_utc(day: _dt.date) -> float:
    """Unix seconds of 00:00 UTC on ``day``."""
    return _dt.datetime(day.year, day.month, day.day, tzinfo=_dt.timezone.utc).timestamp()


# How long a quiet line is waited on between checks for stop and silence.
IDLE_WAIT_S = 0.5


class GpsSerialSource:
    """NMEA 0183 from a serial port (``gps.port`` at ``gps.baud``). ``stats`` is read by the status output."""

    name = "gps"

    def __init__(self, config: GpsConfig, clock: Clock) -> None:
        self.config = config
        self.clock = clock
        self._floor = floor_utc(config.rollover_floor)
        self.decoder = NmeaDecoder(allow_missing_checksum=config.allow_missing_checksum, rollover_floor_utc=self._floor)
        self.health = GpsHealth(config.silent_timeout_s)
        self.stats: dict[str, object] = {
            "port": config.port, "port_open": False, "state": "unknown", "fixes": 0, "last_fix_utc": None,
            "bytes": 0, "reopen_count": 0, "open_failures": 0, "decoder": self.decoder.counters,
        }
        self._epochs_seen = 0

    def run(self, emit: Emit, stop: threading.Event) -> None:
        """Read until ``stop`` is set; reopen the port whenever it fails."""
        import serial  # pyserial: imported here so that offline commands never need it

        failing = False
        opened_before = False
        while not stop.is_set():
            try:
                port = serial.Serial(self.config.port, self.config.baud, timeout=self.config.epoch_timeout_s)
            except (serial.SerialException, OSError, ValueError) as exc:
                self.stats["open_failures"] = int(self.stats["open_failures"]) + 1
                if not failing:
                    log.warning("gps: cannot open %s: %s; retrying every %.1f s", self.config.port, _reason(exc),
                                self.config.reopen_interval_s)
                    failing = True
                self._tick(emit)
                stop.wait(self.config.reopen_interval_s)
                continue
            failing = False
            if opened_before:
                self.stats["reopen_count"] = int(self.stats["reopen_count"]) + 1
            opened_before = True
            self.stats["port_open"] = True
            log.info("gps: %s open at %d baud", self.config.port, self.config.baud)
            try:
                self._read(port, emit, stop)
            except (serial.SerialException, OSError) as exc:
                log.warning("gps: %s lost: %s; reopening every %.1f s", self.config.port, _reason(exc),
                            self.config.reopen_interval_s)
                failing = True
            finally:
                self.stats["port_open"] = False
                try:
                    port.close()
                except (serial.SerialException, OSError):
                    pass
            self._emit_all(self.decoder.flush(), emit)
            if not stop.is_set():
                self._tick(emit)
                stop.wait(self.config.reopen_interval_s)

    def _read(self, port, emit: Emit, stop: threading.Event) -> None:
        fd = port.fileno()
        quiet = False
        while not stop.is_set():
            # Wait for bytes: epoch_timeout_s while an epoch may be incomplete, then longer (the
            # thread still wakes for stop and silence checks) so an idle line costs few wake-ups.
            ready, _, _ = select.select([fd], [], [], IDLE_WAIT_S if quiet else self.config.epoch_timeout_s)
            # Everything waiting in one read (a read per byte costs a core at high rates). Readable
            # with nothing waiting is a vanished device: pyserial's read raises SerialException.
            data = port.read(max(1, port.in_waiting)) if ready else b""
            mono = self.clock.monotonic()
            if data:
                quiet = False
                self.stats["bytes"] = int(self.stats["bytes"]) + len(data)
                self.health.data(mono)
                wall = self.clock.wall()
                self.decoder.set_reference_utc(wall if wall >= self._floor else None)
                self._emit_all(self.decoder.feed(data), emit)
            elif not quiet:
                quiet = True  # a quiet line ends the epoch being assembled
                self._emit_all(self.decoder.flush(), emit)
            self._tick(emit)

    def _emit_all(self, fixes: list[tuple[float, Fix]], emit: Emit) -> None:
        mono = self.clock.monotonic()
        epochs = self.decoder.counters["epochs"]
        # Epochs that ended without a usable fix (no position, no date) count towards "lost".
        empty = epochs - self._epochs_seen - len(fixes)
        self._epochs_seen = epochs
        for _ in range(max(0, empty)):
            self._health_event(self.health.epoch(None, mono, None), emit)
        for utc, fix in fixes:
            emit(Record(utc=utc, mono=mono, data=fix))
            self.stats["fixes"] = int(self.stats["fixes"]) + 1
            self.stats["last_fix_utc"] = utc
            self._health_event(self.health.epoch(utc, mono, fix), emit)

    def _tick(self, emit: Emit) -> None:
        self._health_event(self.health.tick(self.clock.monotonic()), emit)

    def _health_event(self, event: Event | None, emit: Emit) -> None:
        self.stats["state"] = self.health.state
        if event is None:
            return
        log.info("gps: %s (%s)", event.type, self.config.port)
        emit(self.health.record(event, self.clock.wall(), self.clock.monotonic()))


def _reason(exc: BaseException) -> str:
    """A short reason for a log line: the OS error text when there is one."""
    errno_text = getattr(exc, "strerror", None)
    return errno_text or str(exc) or type(exc).__name__
