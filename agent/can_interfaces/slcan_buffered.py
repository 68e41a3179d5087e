"""A buffered slcan (Lawicel ASCII) interface for python-can, registered as ``slcan_buffered``.

python-can's own ``slcan`` backend reads the serial port one byte per call (about 27 reads per
frame), which costs about 21% of a core of the development machine at a typical truck load of
1,850 frames/s and tops out near 8,500 frames/s (../shared/FIELD-NOTES.md). This one reads
everything waiting in one call, at most every ``read_interval_s``, and parses all complete lines
of the chunk: under 3% of a core at 1,850 frames/s (BENCHMARKS.md).

Other differences: it opens listen-only (``L``) unless told otherwise, it does not sleep two
seconds after opening the port (that is for Arduino boards that reset on open; ``sleep_after_open``
brings it back), and a port that vanishes (adapter unplugged) raises :class:`can.CanOperationError`
from ``recv`` so the caller can reopen it. Tested with python-can 4.4.2, 4.5.0 and 4.6.1 (pinned in
pyproject.toml).
"""

from __future__ import annotations

import binascii
import collections
import io
import os
import select
import time
from typing import Any

import can
import serial

# Lawicel "Sn" commands (CANUSB manual, ASCII command set), as python-can's slcan has them.
BITRATE_COMMANDS = {10000: "S0", 20000: "S1", 50000: "S2", 100000: "S3", 125000: "S4", 250000: "S5",
                    500000: "S6", 750000: "S7", 1000000: "S8", 83300: "S9"}
OK = b"\r"
ERROR = b"\a"
# CAN FD DLC codes 9-15 stand for 12, 16, 20, 24, 32, 48 and 64 bytes (ISO 11898-1:2015).
FD_LENGTHS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 32, 48, 64)
# A line longer than this is noise (the longest slcan frame line, an FD frame, is 138 characters).
MAX_LINE = 160


class BufferedSlcanBus(can.BusABC):
    """slcan over a serial port (or any pyserial URL), read in chunks; listen-only by default."""

    def __init__(
        self,
        channel: str,
        bitrate: int | None = None,
        listen_only: bool = True,
        tty_baudrate: int = 115200,
        sleep_after_open: float = 0.0,
        rtscts: bool = False,
        read_interval_s: float = 0.01,
        **kwargs: Any,
    ) -> None:
        if not channel:
            raise ValueError("slcan_buffered needs a serial port as channel, e.g. /dev/ttyACM0")
        if "@" in channel:
            channel, baud = channel.rsplit("@", 1)
            tty_baudrate = int(baud)
        if bitrate is not None and bitrate not in BITRATE_COMMANDS:
            raise ValueError(f"slcan bitrate {bitrate} not one of {sorted(BITRATE_COMMANDS)}")
        self.listen_only = listen_only
        # Reading at most every 10 ms batches about twenty frames of a typical truck bus per read
        # instead of one or two per 1 ms USB slice (CPU 1.6% -> 1% of a core here at 1,850 frames/s);
        # what waits meanwhile (about 1 kB on a saturated 500 kbit/s bus) fits the kernel's tty
        # buffers, and 10 ms of latency is nothing to 1 Hz telemetry.
        self.read_interval_s = read_interval_s
        self._last_read = 0.0
        self.channel_info = f"slcan_buffered {channel}"
        self._pending: collections.deque[can.Message] = collections.deque()
        self._buffer = b""
        self.bad_lines = 0  # malformed lines skipped (noise on the serial link)
        try:
            self._port = serial.serial_for_url(channel, baudrate=tty_baudrate, rtscts=rtscts, timeout=0.05)
        except (serial.SerialException, OSError, ValueError) as exc:
            raise can.CanInitializationError(f"cannot open slcan port {channel}: {exc}") from exc
        try:
            self._fd: int | None = self._port.fileno()
        except (AttributeError, io.UnsupportedOperation):
            self._fd = None
        try:
            if sleep_after_open:
                _pause(sleep_after_open)
            # Close first: an adapter left open by a previous run refuses Sn while open.
            self._write("C")
            if bitrate is not None:
                self._write(BITRATE_COMMANDS[bitrate])
            self._write("L" if listen_only else "O")
        except can.CanOperationError as exc:
            self._port.close()
            raise can.CanInitializationError(str(exc)) from exc
        super().__init__(channel=channel, **kwargs)

    def _write(self, command: str) -> None:
        try:
            self._port.write(command.encode("ascii") + OK)
            self._port.flush()
        except (serial.SerialException, OSError) as exc:
            raise can.CanOperationError(f"slcan write failed: {exc}") from exc

    def _recv_internal(self, timeout: float | None) -> tuple[can.Message | None, bool]:
        if self._pending:
            return self._pending.popleft(), False
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._fill(deadline)
            if self._pending:
                return self._pending.popleft(), False
            if deadline is not None and time.monotonic() >= deadline:
                return None, False

    def _fill(self, deadline: float | None) -> None:
        """Wait for data until ``deadline`` and parse every complete line of what arrived."""
        try:
            if self._fd is not None:
                now = time.monotonic()
                earliest = self._last_read + self.read_interval_s
                if earliest > now:
                    if deadline is not None and deadline < earliest:
                        _pause(max(0.0, deadline - now))  # no read allowed before the deadline
                        return
                    _pause(earliest - now)
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                ready, _, _ = select.select([self._fd], [], [], remaining)
                if not ready:
                    return
                self._last_read = time.monotonic()
                chunk = os.read(self._fd, 65536)
                if not chunk:
                    raise OSError("end of file")
            else:
                # pyserial URL handlers without a file descriptor: the port's own short timeout.
                chunk = self._port.read(max(1, self._port.in_waiting))
                if not chunk:
                    return
        except (serial.SerialException, OSError, TypeError, ValueError) as exc:
            # A USB adapter unplugged reads as EIO or end of file; a port closed under us as TypeError
            # or ValueError (a closed file descriptor).
            raise can.CanOperationError(f"slcan port lost: {exc}") from exc
        self._parse(self._buffer + chunk, time.time())

    def _parse(self, data: bytes, stamp: float) -> None:
        lines = data.replace(ERROR, OK).split(OK)
        self._buffer = lines.pop()
        if len(self._buffer) > MAX_LINE:
            self._buffer = b""
            self.bad_lines += 1
        for line in lines:
            if not line:
                continue  # an OK reply
            try:
                msg = parse_line(line, stamp)
            except (ValueError, IndexError):
                self.bad_lines += 1
                continue
            if msg is not None:
                self._pending.append(msg)

    def send(self, msg: can.Message, timeout: float | None = None) -> None:
        """Transmit (only when opened with ``listen_only=False``)."""
        if self.listen_only:
            raise can.CanOperationError("slcan_buffered is open listen-only: transmitting is not allowed")
        self._write(format_frame(msg))

    def shutdown(self) -> None:
        super().shutdown()
        try:
            self._write("C")
        except can.CanOperationError:
            pass  # the adapter is gone: nothing to close on its side
        try:
            self._port.close()
        except (serial.SerialException, OSError):
            pass

    def fileno(self) -> int:
        if self._fd is None:
            raise NotImplementedError("this slcan port has no file descriptor")
        return self._fd


def parse_line(line: bytes, stamp: float) -> can.Message | None:
    """One slcan line (without CR) as a message; None for replies that are not frames (``z``, ``V..``).

    Raises ValueError or IndexError on a malformed frame line.
    """
    kind = line[0]
    if kind in b"tr":
        id_end, extended = 4, False
    elif kind in b"TRx":
        id_end, extended = 9, True
    elif kind in b"dbDB":
        id_end, extended = (9, True) if kind in b"DB" else (4, False)
        length = FD_LENGTHS[int(line[id_end : id_end + 1], 16)]
        data = binascii.unhexlify(line[id_end + 1 : id_end + 1 + 2 * length])
        if len(data) != length:
            raise ValueError("short FD frame")
        return can.Message(timestamp=stamp, arbitration_id=int(line[1:id_end], 16), is_extended_id=extended,
                           is_fd=True, bitrate_switch=kind in b"bB", data=data)
    else:
        return None
    arbitration_id = int(line[1:id_end], 16)
    dlc = line[id_end] - 48
    if not 0 <= dlc <= 8:
        raise ValueError("bad DLC")
    if kind in b"rR":
        return can.Message(timestamp=stamp, arbitration_id=arbitration_id, is_extended_id=extended,
                           is_remote_frame=True, dlc=dlc)
    data = binascii.unhexlify(line[id_end + 1 : id_end + 1 + 2 * dlc])
    if len(data) != dlc:
        raise ValueError("short frame")
    return can.Message(timestamp=stamp, arbitration_id=arbitration_id, is_extended_id=extended, data=data)


def format_frame(msg: can.Message) -> str:
    """The slcan transmit command for a classic CAN frame (``t``/``T``/``r``/``R``)."""
    if msg.is_remote_frame:
        return f"R{msg.arbitration_id:08X}{msg.dlc}" if msg.is_extended_id else f"r{msg.arbitration_id:03X}{msg.dlc}"
    head = f"T{msg.arbitration_id:08X}" if msg.is_extended_id else f"t{msg.arbitration_id:03X}"
    return f"{head}{len(msg.data)}{bytes(msg.data).hex().upper()}"


def _pause(seconds: float) -> None:
    """Sleep by select()'s timeout rather than time.sleep: libfaketime 0.9.10 (Debian 12, the
    scenario runner's clock steps) makes clock_nanosleep, and so time.sleep, fail with EINVAL when
    only the wall clock is faked."""
    select.select([], [], [], seconds)
