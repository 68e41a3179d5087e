"""An emulated Lawicel slcan (CAN232/CANUSB ASCII protocol) adapter on a pseudo-terminal.

A separate agent process opens the pty with python-can's ``slcan`` interface exactly as it would
a CANable or USBtin; the replay hands frames to :meth:`SlcanAdapter.deliver`, and they reach the
host only while the channel is open (``O`` or ``L``), as on a real bus. Commands (Lawicel CANUSB
manual, "ASCII command set"): ``Sn`` and ``sxxyy`` bit rate, ``O`` open, ``L`` open listen-only,
``C`` close, ``V`` version, ``N`` serial number, ``F`` status flags, ``Zn`` time stamps on/off,
``t``/``T``/``r``/``R`` transmit. Replies: ``\\r`` for OK, ``\\a`` (BEL) for an error, ``z\\r`` /
``Z\\r`` after a transmitted standard / extended frame.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import threading
import time
import tty
from collections.abc import Callable

import can

log = logging.getLogger(__name__)

OK = b"\r"
ERROR = b"\a"
# Lawicel "Sn": n = 0..8 selects 10, 20, 50, 100, 125, 250, 500, 800, 1000 kbit/s.
BITRATES_KBIT = (10, 20, 50, 100, 125, 250, 500, 800, 1000)


def encode_frame(msg: can.Message, timestamp_ms: int | None = None) -> bytes:
    """A received frame as the adapter sends it: ``tiiildd..``, ``Tiiiiiiiildd..``, ``riiil`` or ``Riiiiiiiil``,
    then 4 hex digits of milliseconds (0-59999) when time stamps are on, then ``\\r``."""
    if msg.is_remote_frame:
        head = f"R{msg.arbitration_id:08X}" if msg.is_extended_id else f"r{msg.arbitration_id:03X}"
        text = f"{head}{msg.dlc:d}"
    else:
        head = f"T{msg.arbitration_id:08X}" if msg.is_extended_id else f"t{msg.arbitration_id:03X}"
        text = f"{head}{len(msg.data):d}{bytes(msg.data).hex().upper()}"
    if timestamp_ms is not None:
        text += f"{timestamp_ms % 60000:04X}"
    return text.encode("ascii") + b"\r"


def decode_transmit(command: str) -> can.Message:
    """A host's ``t``/``T``/``r``/``R`` command as a message. Raises ValueError when malformed."""
    kind = command[0]
    extended = kind in "TR"
    id_len = 8 if extended else 3
    if len(command) < 2 + id_len:
        raise ValueError(command)
    arbitration_id = int(command[1 : 1 + id_len], 16)
    dlc = int(command[1 + id_len])
    if dlc > 8 or arbitration_id > (0x1FFFFFFF if extended else 0x7FF):
        raise ValueError(command)
    if kind in "rR":
        return can.Message(arbitration_id=arbitration_id, is_extended_id=extended, is_remote_frame=True, dlc=dlc)
    hex_data = command[2 + id_len :]
    if len(hex_data) != 2 * dlc:
        raise ValueError(command)
    return can.Message(arbitration_id=arbitration_id, is_extended_id=extended, data=bytes.fromhex(hex_data))


class SlcanAdapter:
    """An slcan adapter on a pty: ``open_pty()`` gives the path, ``deliver(msg)`` puts a frame on the bus.

    ``on_transmit`` is called (from the adapter's thread) with every frame the host transmits.
    """

    def __init__(
        self,
        version: str = "1013",
        serial_number: str = "SIM1",
        on_transmit: Callable[[can.Message], None] | None = None,
    ) -> None:
        self.version = version
        self.serial_number = serial_number
        self.on_transmit = on_transmit
        self.bitrate_kbit: int | None = None
        self.is_open = False
        self.listen_only = False
        self.timestamps = False
        self.delivered = 0
        self.dropped = 0  # frames lost because the host did not read fast enough (adapter overrun)
        self._master: int | None = None
        self._slave: int | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = time.monotonic()

    def open_pty(self) -> str:
        """Create the pty (raw, so CR reaches the host as CR) and start answering commands."""
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)
        os.set_blocking(self._master, False)
        self._thread = threading.Thread(target=self._serve, name="slcan-adapter", daemon=True)
        self._thread.start()
        return os.ttyname(self._slave)

    def deliver(self, msg: can.Message) -> bool:
        """Send a bus frame to the host; False when the channel is closed or the host is not reading."""
        if not self.is_open or self._master is None:
            return False
        stamp = int((time.monotonic() - self._t0) * 1000) if self.timestamps else None
        if self._write(encode_frame(msg, stamp)):
            self.delivered += 1
            return True
        self.dropped += 1
        return False

    def close(self) -> None:
        """Stop answering and close the pty."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
        for fd in (self._master, self._slave):
            if fd is not None:
                os.close(fd)
        self._master = self._slave = None

    def _write(self, data: bytes) -> bool:
        with self._lock:
            try:
                written = os.write(self._master, data)
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EIO):
                    return False
                raise
            if written < len(data):
                # A partial frame would corrupt the stream: finish it while the host catches up.
                rest = data[written:]
                while rest:
                    select.select([], [self._master], [], 0.1)
                    try:
                        rest = rest[os.write(self._master, rest) :]
                    except BlockingIOError:
                        continue
            return True

    def _serve(self) -> None:
        pending = b""
        while not self._stop.is_set():
            ready, _, _ = select.select([self._master], [], [], 0.1)
            if not ready:
                continue
            try:
                chunk = os.read(self._master, 4096)
            except OSError:
                # EIO: no process has the slave open right now; it may come back.
                time.sleep(0.05)
                continue
            pending += chunk
            *commands, pending = pending.split(b"\r")
            for command in commands:
                reply = self.handle(command.decode("ascii", "replace").strip("\n"))
                if reply:
                    self._write(reply)

    def handle(self, command: str) -> bytes:
        """The adapter's reply to one command (without its CR)."""
        if not command:
            return OK
        kind = command[0]
        if kind == "S" and len(command) == 2 and command[1].isdigit() and int(command[1]) < len(BITRATES_KBIT):
            if self.is_open:
                return ERROR
            self.bitrate_kbit = BITRATES_KBIT[int(command[1])]
            return OK
        if kind == "s" and len(command) == 5:
            return ERROR if self.is_open else OK
        if kind in "OL" and len(command) == 1:
            if self.is_open:
                return ERROR
            self.is_open, self.listen_only = True, kind == "L"
            log.info("slcan channel opened%s", " (listen only)" if self.listen_only else "")
            return OK
        if kind == "C" and len(command) == 1:
            if self.is_open:
                log.info("slcan channel closed")
            self.is_open = False
            return OK
        if kind == "V" and len(command) == 1:
            return f"V{self.version}\r".encode("ascii")
        if kind == "N" and len(command) == 1:
            return f"N{self.serial_number}\r".encode("ascii")
        if kind == "F" and len(command) == 1:
            return b"F00\r" if self.is_open else ERROR
        if kind == "Z" and command in ("Z0", "Z1"):
            self.timestamps = command == "Z1"
            return OK
        if kind in "tTrR":
            if not self.is_open or self.listen_only:
                return ERROR
            try:
                msg = decode_transmit(command)
            except ValueError:
                return ERROR
            if self.on_transmit is not None:
                self.on_transmit(msg)
            return b"z\r" if kind in "tr" else b"Z\r"
        return ERROR
