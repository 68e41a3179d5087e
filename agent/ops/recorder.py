"""Recording on the device: the raw NMEA bytes and CAN frames the agent receives, for a technician.

Off by default (``record.enabled``). The GPS source hands every chunk it reads to
:meth:`Recorder.nmea` (its ``on_raw`` hook), each CAN source every frame to :meth:`Recorder.can`
(its ``on_frame`` hook). Files go to ``record.dir``: ``nmea-<UTC start>.nmea`` (the bytes exactly as
received, replayable with ``telematics-sim replay --nmea``) and ``can-<UTC start>.log`` (``candump -L``
lines, readable by python-can and can-utils, replayable with ``telematics-sim replay --can``). A file
is closed and a new one started past ``record.max_file_bytes``; the oldest recordings are deleted
while all of them together exceed ``record.max_total_bytes``, so the card never fills.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable

from agent.config import RecordConfig

log = logging.getLogger(__name__)

# Buffered writes reach the file at least this often (a technician copying a file gets recent data
# without a write per CAN frame).
FLUSH_INTERVAL_S = 1.0
# A frame's own timestamp is used when it is a Unix time (python-can interfaces stamp with time.time());
# earlier values are relative clocks and get the host's wall time.
MIN_UNIX_TIME = 1e9


def candump_line(timestamp: float, channel: str, arbitration_id: int, is_extended_id: bool, data: bytes,
                 is_remote_frame: bool = False, is_fd: bool = False, bitrate_switch: bool = False,
                 error_state_indicator: bool = False) -> str:
    """One ``candump -L`` line: ``(1709368200.123456) can0 18FEF100#FFFF...`` (can-utils lib.c format).

    11-bit identifiers have 3 hex digits, 29-bit 8; ``R`` marks a remote frame; CAN FD frames use
    ``##`` and a flags digit (1: bit rate switch, 2: error state indicator).
    """
    ident = f"{arbitration_id:08X}" if is_extended_id else f"{arbitration_id:03X}"
    if is_fd:
        flags = (1 if bitrate_switch else 0) | (2 if error_state_indicator else 0)
        body = f"{ident}##{flags:X}{data.hex().upper()}"
    elif is_remote_frame:
        body = f"{ident}#R"
    else:
        body = f"{ident}#{data.hex().upper()}"
    return f"({timestamp:.6f}) {channel} {body}\n"


class RotatingFiles:
    """One stream of recordings (``<prefix>-<UTC>.<suffix>`` in ``directory``), rotated and size-capped.

    ``others`` lists the recordings of the sibling streams, so the total cap covers the whole directory.
    Thread-safe: several sources may write to one stream.
    """

    def __init__(self, directory: Path, prefix: str, suffix: str, max_file_bytes: int, max_total_bytes: int,
                 wall: Callable[[], float] = time.time) -> None:
        self.directory, self.prefix, self.suffix = directory, prefix, suffix
        self.max_file_bytes, self.max_total_bytes = max_file_bytes, max_total_bytes
        self.wall = wall
        self.others: list[RotatingFiles] = []
        self._lock = threading.Lock()
        self._file = None
        self._path: Path | None = None
        self._size = 0
        self._last_flush = 0.0
        self.files_started = 0
        self.files_deleted = 0

    def write(self, data: bytes) -> None:
        """Append ``data`` (never split across files) and flush at most every FLUSH_INTERVAL_S."""
        with self._lock:
            if self._file is not None and self._size + len(data) > self.max_file_bytes:
                self._close_file()
            if self._file is None:
                self._open_file()
            self._file.write(data)
            self._size += len(data)
            now = time.monotonic()
            if now - self._last_flush >= FLUSH_INTERVAL_S:
                self._file.flush()
                self._last_flush = now

    def recordings(self) -> list[Path]:
        """This stream's files, oldest first."""
        return sorted(self.directory.glob(f"{self.prefix}-*.{self.suffix}"), key=_age)

    def close(self) -> None:
        with self._lock:
            self._close_file()

    def _open_file(self) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(self.wall()))
        path = self.directory / f"{self.prefix}-{stamp}Z.{self.suffix}"
        n = 1
        while path.exists():  # several files within one second: numbered
            path = self.directory / f"{self.prefix}-{stamp}Z-{n}.{self.suffix}"
            n += 1
        self._file = open(path, "wb")
        self._path, self._size = path, 0
        self.files_started += 1
        self._enforce_total()

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _enforce_total(self) -> None:
        """Delete the oldest closed recordings (of every stream) while the directory is over its cap."""
        files = sorted((p for stream in (self, *self.others) for p in stream.recordings()), key=_age)
        total = sum(p.stat().st_size for p in files)
        for path in files:
            if total <= self.max_total_bytes:
                break
            if path == self._path or any(path == other._path for other in self.others):
                continue  # a file being written is never deleted
            total -= path.stat().st_size
            path.unlink(missing_ok=True)
            self.files_deleted += 1
            log.info("record: %s deleted (recordings over %d bytes)", path.name, self.max_total_bytes)


def _age(path: Path) -> tuple[int, str]:
    # Oldest first by last write: several files may begin within the second their names carry.
    try:
        return path.stat().st_mtime_ns, path.name
    except FileNotFoundError:
        return 0, path.name


class Recorder:
    """The raw-data recorder: ``nmea(bytes)`` and ``can(msg, channel)`` are the sources' hooks."""

    def __init__(self, config: RecordConfig, wall: Callable[[], float] = time.time) -> None:
        self.config = config
        self.wall = wall
        self.directory = Path(config.dir)
        self.nmea_files = RotatingFiles(self.directory, "nmea", "nmea", config.max_file_bytes, config.max_total_bytes, wall)
        self.can_files = RotatingFiles(self.directory, "can", "log", config.max_file_bytes, config.max_total_bytes, wall)
        self.nmea_files.others = [self.can_files]
        self.can_files.others = [self.nmea_files]
        self._failed = False

    def open(self) -> None:
        """Create the directory. Raises OSError when it cannot be created."""
        self.directory.mkdir(parents=True, exist_ok=True)
        log.info("record: raw NMEA and CAN go to %s (files up to %d bytes, %d in all)", self.directory,
                 self.config.max_file_bytes, self.config.max_total_bytes)

    def nmea(self, data: bytes) -> None:
        """The GPS source's ``on_raw`` hook: bytes exactly as read from the port."""
        if self.config.nmea:
            self._write(self.nmea_files, data)

    def can(self, msg, channel: str) -> None:
        """A CAN source's ``on_frame`` hook: one python-can message received on bus ``channel``."""
        if not self.config.can or msg.is_error_frame:
            return
        stamp = msg.timestamp if msg.timestamp >= MIN_UNIX_TIME else self.wall()
        line = candump_line(stamp, channel, msg.arbitration_id, msg.is_extended_id, bytes(msg.data),
                            msg.is_remote_frame, msg.is_fd, msg.bitrate_switch, msg.error_state_indicator)
        self._write(self.can_files, line.encode("ascii"))

    def _write(self, files: RotatingFiles, data: bytes) -> None:
        # A full or read-only card must not stop the agent: recording stops, logged once.
        try:
            files.write(data)
        except OSError as exc:
            if not self._failed:
                log.warning("record: cannot write to %s: %s; recording paused", self.directory, exc.strerror or exc)
                self._failed = True
            return
        if self._failed:
            log.info("record: writing to %s again", self.directory)
            self._failed = False

    def close(self) -> None:
        self.nmea_files.close()
        self.can_files.close()
