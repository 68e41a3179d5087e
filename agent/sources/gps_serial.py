"""The GPS receiver on a serial port: pyserial bytes -> :class:`NmeaDecoder` -> fix records and GPS events.

The port is opened in :meth:`GpsSerialSource.run`, never in the constructor. When it is missing or
disappears (a USB receiver unplugged, /dev/ttyUSB0 gone) the source logs one line, counts it, and
tries again every ``gps.reopen_interval_s`` until it is back; it logs once more when it is. A line
that goes quiet for ``gps.epoch_timeout_s`` completes the epoch being assembled, so a receiver that
sends only part of what the decoder could wait for still yields one fix per epoch. While epochs end
more often than that (a 10 Hz receiver), reads are coalesced: after each read the thread sleeps
:data:`COALESCE_S` (at most 0.8 x ``epoch_timeout_s``) so that one wake-up reads about two epochs;
fixes are emitted up to that much later.

Besides fixes it emits ``Event`` records for the backend (``gps_lost``, ``gps_regained``,
``gps_silent``) and ``Status`` records about the host clock (``clock_offset``, ``clock_ok``): see
:mod:`agent.sources.gps_health` and :mod:`agent.sources.gps_clock`.
"""

from __future__ import annotations

import datetime as _dt
import errno
import logging
import os
import select
import threading
from typing import Callable

from agent.clock import Clock
from agent.config import GpsConfig
from agent.decode.nmea import NmeaDecoder
from agent.pipeline import Emit
from agent.record import Fix
from agent.sources.gps_health import GpsOutput

log = logging.getLogger(__name__)

def floor_utc(day: _dt.date) -> float:
    """Unix seconds of 00:00 UTC on ``day``."""
    return _dt.datetime(day.year, day.month, day.day, tzinfo=_dt.timezone.utc).timestamp()


# How long a quiet line is waited on between checks for stop and silence (ms: poll's unit).
IDLE_WAIT_MS = 500
# Read coalescing: while a receiver's epochs end more often than gps.epoch_timeout_s (10 Hz), the
# thread lets bytes gather this long after each read, so that one wake-up reads two epochs instead
# of one (each wake-up of the thread costs several times the same work done awake: BENCHMARKS.md).
# A fix is then emitted up to this much later (at 10 Hz: every other fix 0.1 s later). At most
# COALESCE_SHARE of epoch_timeout_s, so the quiet-line check that follows still has time to run.
COALESCE_S = 0.2
COALESCE_SHARE = 0.8
# Baud-rate detection: the rates tried in turn (4800 is NMEA 0183's own; the others are what GPS
# modules ship with or are set to), and how many bytes without one valid sentence mean a wrong rate
# (an NMEA line is at most ~82 characters, so this is several lines' worth).
BAUD_RATES = (4800, 9600, 19200, 38400, 57600, 115200, 230400, 460800)
BAUD_PROBE_BYTES = 600


class GpsSerialSource:
    """NMEA 0183 from a serial port (``gps.port`` at ``gps.baud``). ``stats`` is read by the status output."""

    name = "gps"

    def __init__(self, config: GpsConfig, clock: Clock) -> None:
        self.config = config
        self.clock = clock
        self._floor = floor_utc(config.rollover_floor)
        self.decoder = NmeaDecoder(allow_missing_checksum=config.allow_missing_checksum, rollover_floor_utc=self._floor)
        self.stats: dict[str, object] = {
            "port": config.port, "port_open": False, "baud": config.baud, "bytes": 0, "reopen_count": 0,
            "open_failures": 0, "decoder": self.decoder.counters,
        }
        self._baud = config.baud  # the rate in use: the configured one, or the one detection found
        self._baud_found = not config.baud_detect
        self._unproven = 0  # bytes read at the current rate, while no sentence has had a valid checksum
        self.output = GpsOutput(config, clock, self.stats, config.port)
        self._epochs_seen = 0
        self._last_epoch_mono: float | None = None  # when the decoder last completed an epoch
        self._fast = False  # the last two completions were less than epoch_timeout_s apart
        # Raw-tap hook: called with every chunk read from the port (the recorder, agent/ops/recorder.py).
        self.on_raw: Callable[[bytes], None] | None = None

    def run(self, emit: Emit, stop: threading.Event) -> None:
        """Read until ``stop`` is set; reopen the port whenever it fails."""
        import serial  # pyserial: imported here so that offline commands never need it

        failing = False
        opened_before = False
        while not stop.is_set():
            try:
                port = serial.Serial(self.config.port, self._baud, timeout=self.config.epoch_timeout_s)
            except (serial.SerialException, OSError, ValueError) as exc:
                self.stats["open_failures"] = int(self.stats["open_failures"]) + 1
                if not failing:
                    log.warning("gps: cannot open %s: %s; retrying every %.1f s", self.config.port, _reason(exc),
                                self.config.reopen_interval_s)
                    failing = True
                self.output.tick(emit)
                stop.wait(self.config.reopen_interval_s)
                continue
            failing = False
            if opened_before:
                self.stats["reopen_count"] = int(self.stats["reopen_count"]) + 1
            opened_before = True
            self.stats["port_open"] = True
            log.info("gps: %s open at %d baud", self.config.port, self._baud)
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
                self.output.tick(emit)
                stop.wait(self.config.reopen_interval_s)

    def _read(self, port, emit: Emit, stop: threading.Event) -> None:
        fd = port.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        epoch_wait_ms = self.config.epoch_timeout_s * 1000
        coalesce_s = min(COALESCE_S, COALESCE_SHARE * self.config.epoch_timeout_s)
        self._fast = False
        quiet = False
        wait_ms = epoch_wait_ms
        while not stop.is_set():
            # Wait for bytes: epoch_timeout_s while an epoch may be incomplete, then longer (the
            # thread still wakes for stop and silence checks) so an idle line costs few wake-ups.
            ready = poller.poll(IDLE_WAIT_MS if quiet else wait_ms)
            # Everything waiting in one read, straight from the descriptor pyserial opened: its own
            # read() would select() again and ask for in_waiting first (measured: a third of the
            # source's CPU at 10 Hz). Readable with nothing to read is a vanished device.
            data = _read_ready(fd) if ready else b""
            if data:
                quiet = False
                self.stats["bytes"] += len(data)  # type: ignore[operator]
                if self.on_raw is not None:
                    self.on_raw(data)
                self.output.data()
                wall = self.clock.wall()
                self.decoder.set_reference_utc(wall if wall >= self._floor else None)
                self._emit_all(self.decoder.feed(data), emit)
                if not self._baud_found:
                    self._detect_baud(port, len(data))
                wait_ms = epoch_wait_ms
                if self._fast:
                    # Such a receiver's line is never quiet for epoch_timeout_s between its epochs,
                    # so gathering bytes cannot hide a quiet line from the wait that follows, which
                    # still ends epoch_timeout_s after this read.
                    # stop.wait, not time.sleep: it ends at a stop, and libfaketime (the clock-step
                    # scenario) makes time.sleep fail with EINVAL, which would read as a lost port.
                    if stop.wait(coalesce_s):
                        break
                    wait_ms = epoch_wait_ms - coalesce_s * 1000
                continue  # bytes just came: the silence check (output.tick) has nothing to find
            if not quiet:
                quiet = True  # a quiet line ends the epoch being assembled
                self._fast = False
                self._emit_all(self.decoder.flush(), emit)
            self.output.tick(emit)

    def _detect_baud(self, port, size: int) -> None:
        """With ``gps.baud_detect``: move to the next rate while bytes come but no valid sentence does."""
        if self.decoder.counters["sentences"] + self.decoder.counters["ignored"]:  # a good checksum
            self._baud_found = True
            log.info("gps: %s speaks NMEA at %d baud", self.config.port, self._baud)
            return
        self._unproven += size
        if self._unproven < BAUD_PROBE_BYTES:
            return
        rates = BAUD_RATES if self._baud in BAUD_RATES else (self._baud, *BAUD_RATES)
        following = rates[(rates.index(self._baud) + 1) % len(rates)]
        log.info("gps: no NMEA from %s at %d baud; trying %d", self.config.port, self._baud, following)
        port.baudrate = following  # pyserial reconfigures the open port
        port.reset_input_buffer()  # what came at the old rate is noise
        self._baud = following
        self.stats["baud"] = following
        self._unproven = 0

    def _emit_all(self, fixes: list[tuple[float, Fix]], emit: Emit) -> None:
        epochs = self.decoder.counters["epochs"]
        if epochs != self._epochs_seen:
            now, last = self.clock.monotonic(), self._last_epoch_mono
            self._fast = last is not None and now - last < self.config.epoch_timeout_s
            self._last_epoch_mono = now
        # Epochs that ended without a usable fix (no position, no date) count towards "lost".
        empty = epochs - self._epochs_seen - len(fixes)
        self._epochs_seen = epochs
        for _ in range(max(0, empty)):
            self.output.no_fix(emit)
        for utc, fix in fixes:
            self.output.fix(utc, fix, emit)


def _read_ready(fd: int) -> bytes:
    """What a readable descriptor holds (up to 64 KiB); raises OSError when the device is gone."""
    try:
        data = os.read(fd, 65536)
    except BlockingIOError:  # pyserial opens non-blocking: a spurious wake-up, nothing lost
        return b""
    if not data:
        raise OSError(errno.ENODEV, "the device returned no data: unplugged?")
    return data


def _reason(exc: BaseException) -> str:
    """A short reason for a log line: the OS error text when there is one."""
    errno_text = getattr(exc, "strerror", None)
    return errno_text or str(exc) or type(exc).__name__
