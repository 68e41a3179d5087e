"""``telematics-sim replay``: an NMEA capture into a pseudo-terminal, and a candump log into a CAN bus,
at their recorded pace, in step.

The pty stands in for the GPS receiver's serial port: the agent opens the printed path with
pyserial. NMEA bytes never leave faster than ``--baud`` would carry them (10 bits per byte:
start bit, 8 data bits, stop bit). CAN frames go to a python-can bus: in-process (``virtual``,
for tests and the demo) or through an emulated slcan adapter on a second pty (for an agent in
another process). Dates are moved to today unless ``keep_dates``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import fcntl
import logging
import os
import select
import sys
import termios
import threading
import time
import tty
from collections.abc import Callable
from pathlib import Path

import can

from agent.cli_base import CommandError
from agent.ops.logging import setup_logging
from sim import nmea_writer
from sim.capture import NmeaTimeline, can_lead_s, load_candump, load_nmea
from sim.slcan_adapter import SlcanAdapter

log = logging.getLogger(__name__)

BITS_PER_BYTE = 10  # 8N1 serial framing: start bit + 8 data bits + stop bit
LOOP_GAP_S = 1.0  # pause between passes of --loop, one receiver epoch

# progress(drive seconds done, drive seconds in total); called from the replay thread.
Progress = Callable[[float, float], None]


class NmeaReplay:
    """Write an NMEA capture into a pty at its recorded pace.

    ``speed`` > 1 replays faster; ``baud`` caps the byte rate; ``start_s``/``end_s`` cut the drive
    (seconds from its first epoch); ``today`` is the date the capture's first date moves to
    (default: today, UTC) unless ``keep_dates``. Raises OSError when the file cannot be read.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        speed: float = 1.0,
        keep_dates: bool = False,
        baud: int = 9600,
        loop: bool = False,
        start_s: float = 0.0,
        end_s: float | None = None,
        today: _dt.date | None = None,
        progress: Progress | None = None,
        drain_timeout_s: float = 10.0,
        wait_reader: bool = True,
    ) -> None:
        if speed <= 0 or baud <= 0:
            raise ValueError("speed and baud must be positive")
        self.path = Path(path)
        self.timeline: NmeaTimeline = load_nmea(self.path)
        self.speed = speed
        self.baud = baud
        self.loop = loop
        self.progress = progress
        self.drain_timeout_s = drain_timeout_s
        self.wait_reader = wait_reader
        self.start_s = start_s
        self.end_s = self.timeline.duration_s if end_s is None else min(end_s, self.timeline.duration_s)
        days = 0
        if not keep_dates and self.timeline.first_date is not None:
            days = ((today or _dt.datetime.now(_dt.timezone.utc).date()) - self.timeline.first_date).days
        if days:
            log.info("%s: dates move by %+d days (%s -> today)", self.path, days, self.timeline.first_date)
        self.lines = [
            (line.offset_s - start_s, nmea_writer.shift_date(line.text, days).encode("latin-1"))
            for line in self.timeline.lines
            if start_s <= line.offset_s <= self.end_s
        ]
        self.bytes_written = 0
        self._master: int | None = None
        self._slave: int | None = None
        self._pty_path: str | None = None
        self._link: Path | None = None

    @property
    def duration_s(self) -> float:
        """Drive seconds one pass takes (after --start/--end), before any speed-up."""
        return max(0.0, self.end_s - self.start_s)

    def open_pty(self, link: str | Path | None = None) -> str:
        """Create the pty (slave side raw, so bytes pass unchanged); ``link`` gets a symlink to it."""
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)
        os.set_blocking(self._master, False)
        path = self._pty_path = os.ttyname(self._slave)
        if self.wait_reader:
            # Let go of the slave side: until a reader opens it, the master reports a hang-up.
            os.close(self._slave)
            self._slave = None
        if link is not None:
            self._link = Path(link)
            if self._link.is_symlink():
                self._link.unlink()
            self._link.symlink_to(path)
        return path

    def run(self, stop: threading.Event | None = None, clock: DriveClock | None = None) -> None:
        """Wait for a reader (unless ``wait_reader`` is off), write the capture (every pass when looping)
        until done or ``stop`` is set, then wait for the reader to drain the pty (at most ``drain_timeout_s``)."""
        if self._master is None:
            raise RuntimeError("open_pty() first")
        stop = stop or threading.Event()
        if not self.wait_for_reader(stop):
            return
        clock = clock or DriveClock(self.speed)
        byte_s = BITS_PER_BYTE / self.baud
        wire_free = 0.0
        pass_start = 0.0
        while not stop.is_set():
            last_offset = None
            for offset, data in self.lines:
                if not clock.wait_until(pass_start + offset, stop):
                    return
                # Never faster than the line carries: a line waits until the previous one is on the wire.
                now = time.monotonic()
                if wire_free > now and stop.wait(wire_free - now):
                    return
                began = time.monotonic()
                if not self._write_all(data, stop):
                    return
                wire_free = max(began, wire_free) + len(data) * byte_s
                self.bytes_written += len(data)
                if self.progress is not None and offset != last_offset:
                    self.progress(offset, self.duration_s)
                    last_offset = offset
            if not self.loop:
                break
            pass_start += self.duration_s + LOOP_GAP_S
        self._drain(stop)

    def wait_for_reader(self, stop: threading.Event) -> bool:
        """Block until a process has opened the pty (True) or ``stop`` is set (False).

        pyserial flushes a port's input when it opens it, so a drive written before the agent
        opened the pty would lose its start. Once a reader came, the replay holds the slave side
        open itself, so the pty outlives a reader that closes and reopens it.
        """
        if self._slave is not None:
            return True
        poller = select.poll()
        poller.register(self._master, select.POLLOUT)
        while any(events & select.POLLHUP for _, events in poller.poll(0)):
            if stop.wait(0.02):
                return False
        log.info("a reader opened %s", self._pty_path)
        self._slave = os.open(self._pty_path, os.O_RDWR | os.O_NOCTTY)
        return True

    def pending(self) -> int:
        """Bytes written into the pty that no reader has taken yet."""
        if self._slave is None:
            return 0
        raw = fcntl.ioctl(self._slave, termios.FIONREAD, b"\0\0\0\0")
        return int.from_bytes(raw, sys.byteorder)

    def _drain(self, stop: threading.Event) -> None:
        deadline = time.monotonic() + self.drain_timeout_s
        empty_checks = 0
        # The kernel moves written bytes to the reader's queue asynchronously (the tty flip buffer),
        # so the queue must stay empty for a few checks in a row before the reader has really drained it.
        while empty_checks < 4 and time.monotonic() < deadline and not stop.wait(0.05):
            empty_checks = 0 if self.pending() else empty_checks + 1
        if self.pending():
            log.info("%d bytes were not read from the pty before the replay ended", self.pending())

    def _write_all(self, data: bytes, stop: threading.Event) -> bool:
        """Write ``data``, waiting while the pty is full (nobody reading); False when stopped."""
        while data:
            _, writable, _ = select.select([], [self._master], [], 0.1)
            if stop.is_set():
                return False
            if writable:
                try:
                    data = data[os.write(self._master, data) :]
                except BlockingIOError:
                    continue
        return True

    def close(self) -> None:
        """Close the pty and remove the symlink."""
        if self._link is not None and self._link.is_symlink():
            self._link.unlink()
        for fd in (self._master, self._slave):
            if fd is not None:
                os.close(fd)
        self._master = self._slave = None


class DriveClock:
    """Maps drive seconds to monotonic time: drive second ``t`` is due at ``t0 + t / speed``.

    NMEA and CAN replays sharing one clock stay in step however long they run.
    """

    def __init__(self, speed: float = 1.0, t0: float | None = None) -> None:
        self.speed = speed
        self.t0 = time.monotonic() if t0 is None else t0

    def elapsed_drive_s(self) -> float:
        return (time.monotonic() - self.t0) * self.speed

    def wait_until(self, drive_s: float, stop: threading.Event) -> bool:
        """Sleep until drive second ``drive_s``; False when ``stop`` was set meanwhile."""
        delay = self.t0 + drive_s / self.speed - time.monotonic()
        if delay > 0:
            return not stop.wait(delay)
        return not stop.is_set()


class CanReplay:
    """Send a candump log's frames to ``send`` (a bus's ``send`` or an adapter's ``deliver``) at their pace.

    A frame's drive time is ``lead_s`` plus its time after the first frame; frames outside
    ``start_s``..``end_s`` are not sent.
    """

    def __init__(
        self,
        frames: list[can.Message],
        send: Callable[[can.Message], object],
        *,
        lead_s: float = 0.0,
        start_s: float = 0.0,
        end_s: float | None = None,
        loop: bool = False,
        loop_period_s: float | None = None,
        progress: Progress | None = None,
    ) -> None:
        first = frames[0].timestamp if frames else 0.0
        last = lead_s + (frames[-1].timestamp - first if frames else 0.0)
        end = last if end_s is None else end_s
        self.frames = [
            (lead_s + msg.timestamp - first - start_s, msg) for msg in frames if start_s <= lead_s + msg.timestamp - first <= end
        ]
        self.duration_s = max(0.0, min(end, last) - start_s)
        self.send = send
        self.progress = progress
        self.loop = loop
        self.loop_period_s = loop_period_s or self.duration_s + LOOP_GAP_S
        self.sent = 0

    def run(self, stop: threading.Event, clock: DriveClock) -> None:
        """Send every frame at its time (each pass when looping) until done or stopped."""
        pass_start = 0.0
        while not stop.is_set():
            for offset, msg in self.frames:
                if not clock.wait_until(pass_start + offset, stop):
                    return
                # A fresh timestamp: the receiver stamps frames when they arrive, as a real bus would.
                msg.timestamp = time.time()
                self.send(msg)
                self.sent += 1
                if self.progress is not None:
                    self.progress(offset, self.duration_s)
            if not self.loop:
                return
            pass_start += self.loop_period_s


class Replay:
    """NMEA into a pty and, optionally, CAN into a bus, on one clock.

    ``can_bus`` is a python-can bus for in-process use (e.g. ``can.Bus(interface="virtual")``);
    with ``slcan=True`` the frames go to an emulated slcan adapter on a second pty instead.
    With NMEA, the cut and the looping are the NMEA replay's; ``start_s``, ``end_s`` and ``loop``
    are for a CAN log replayed alone.
    """

    def __init__(
        self,
        nmea: NmeaReplay | None,
        can_path: str | Path | None = None,
        *,
        can_bus: can.BusABC | None = None,
        slcan: bool = False,
        progress: Progress | None = None,
        wait_readers: bool = True,
        start_s: float = 0.0,
        end_s: float | None = None,
        loop: bool = False,
    ) -> None:
        if nmea is None and can_path is None:
            raise ValueError("nothing to replay")
        self.nmea = nmea
        self.wait_readers = wait_readers
        self.adapter = SlcanAdapter() if slcan and can_path is not None else None
        self.can: CanReplay | None = None
        if can_path is not None:
            frames = load_candump(can_path)
            send = self.adapter.deliver if self.adapter is not None else can_bus.send if can_bus is not None else None
            if send is None:
                raise ValueError("CAN replay needs can_bus or slcan=True")
            self.can = CanReplay(
                frames,
                send,
                # Drive time is the NMEA capture's: CAN frames outside its span (or --start/--end) are not sent.
                lead_s=can_lead_s(nmea.timeline, frames) if nmea else 0.0,
                start_s=nmea.start_s if nmea else start_s,
                end_s=nmea.end_s if nmea else end_s,
                loop=nmea.loop if nmea else loop,
                loop_period_s=nmea.duration_s + LOOP_GAP_S if nmea else None,
                # With NMEA, the NMEA replay reports progress (drive time is its own).
                progress=None if nmea else progress,
            )

    def run(self, stop: threading.Event | None = None, speed: float | None = None) -> None:
        """Replay both until done (or ``stop``); NMEA on this thread, CAN on a helper thread."""
        stop = stop or threading.Event()
        # The drive starts when its readers are there: the NMEA pty opened, the slcan channel opened.
        if self.nmea is not None and not self.nmea.wait_for_reader(stop):
            return
        while self.wait_readers and self.adapter is not None and not self.adapter.is_open:
            if stop.wait(0.02):
                return
        clock = DriveClock(speed or (self.nmea.speed if self.nmea else 1.0))
        worker = None
        if self.can is not None:
            worker = threading.Thread(target=self.can.run, args=(stop, clock), name="can-replay", daemon=True)
            worker.start()
        try:
            if self.nmea is not None:
                self.nmea.run(stop, clock)
            if worker is not None:
                while worker.is_alive() and not stop.is_set():
                    worker.join(0.1)
        finally:
            stop.set()
            if worker is not None:
                worker.join(2)


class ProgressBar:
    """``[#####.....] 01:23 of 05:00, 03:37 left`` on one stderr line, redrawn at most 4 times a second."""

    WIDTH = 30

    def __init__(self, stream=sys.stderr) -> None:
        self.stream = stream
        self._last = 0.0

    def __call__(self, done_s: float, total_s: float) -> None:
        now = time.monotonic()
        if now - self._last < 0.25 and done_s < total_s:
            return
        self._last = now
        self.stream.write("\r" + render_progress(done_s, total_s, self.WIDTH))
        self.stream.flush()

    def finish(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


def render_progress(done_s: float, total_s: float, width: int = 30) -> str:
    """The progress line: a bar, the drive time done, the total and what is left (mm:ss or h:mm:ss)."""
    fraction = 1.0 if total_s <= 0 else min(1.0, max(0.0, done_s / total_s))
    filled = round(fraction * width)
    left = max(0.0, total_s - done_s)
    return f"[{'#' * filled}{'.' * (width - filled)}] {_clock(done_s)} of {_clock(total_s)}, {_clock(left)} left"


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nmea", metavar="FILE", help="NMEA capture to write into a pty ('#' lines are skipped)")
    parser.add_argument("--can", metavar="FILE", help="candump -L log to replay through an emulated slcan adapter")
    parser.add_argument("--speed", type=float, default=1.0, help="replay N times faster than recorded (default 1)")
    parser.add_argument("--keep-dates", action="store_true", help="keep the capture's dates (default: move them to today)")
    parser.add_argument("--baud", type=int, default=9600, help="the serial rate to pace NMEA no faster than (default 9600)")
    parser.add_argument("--loop", action="store_true", help="start again at the end, until interrupted")
    parser.add_argument("--start", type=float, default=0.0, metavar="S", help="begin S seconds into the drive")
    parser.add_argument("--end", type=float, default=None, metavar="S", help="stop S seconds into the drive")
    parser.add_argument("--link", metavar="PATH", help="create a symlink PATH to the NMEA pty (e.g. /tmp/gps0)")
    parser.add_argument("--can-link", metavar="PATH", help="create a symlink PATH to the slcan pty")
    parser.add_argument("--no-wait", action="store_true",
                        help="start at once instead of when the readers have opened the ptys (what they miss is lost)")
    parser.add_argument("--progress", action="store_true", help="draw a progress bar on stderr even when it is not a terminal")
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def run(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    if not args.nmea and not args.can:
        raise CommandError("give --nmea FILE, --can FILE or both")
    if args.speed <= 0 or args.baud <= 0:
        raise CommandError("--speed and --baud must be positive")
    for path in filter(None, (args.nmea, args.can)):
        if not Path(path).is_file():
            raise CommandError(f"{path}: no such file")
    show = sys.stderr.isatty() or args.progress
    bar = ProgressBar() if show else None
    try:
        nmea = (
            NmeaReplay(
                args.nmea,
                speed=args.speed,
                keep_dates=args.keep_dates,
                baud=args.baud,
                loop=args.loop,
                start_s=args.start,
                end_s=args.end,
                progress=bar,
                wait_reader=not args.no_wait,
            )
            if args.nmea
            else None
        )
        replay = Replay(nmea, args.can, slcan=True, progress=bar, wait_readers=not args.no_wait,
                        start_s=args.start, end_s=args.end, loop=args.loop)
    except OSError as exc:
        raise CommandError(f"cannot read the capture: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise CommandError(f"{args.can}: not a candump -L log: {exc}") from exc
    try:
        if nmea is not None:
            print(f"pty: {nmea.open_pty(args.link)}", flush=True)
        if replay.adapter is not None:
            path = replay.adapter.open_pty()
            if args.can_link:
                link = Path(args.can_link)
                if link.is_symlink():
                    link.unlink()
                link.symlink_to(path)
            print(f"slcan: {path}", flush=True)
        replay.run(speed=args.speed)
    except FileExistsError as exc:
        raise CommandError(f"{exc.filename}: exists and is not a symlink") from exc
    finally:
        if bar is not None:
            bar.finish()
        if nmea is not None:
            nmea.close()
        if replay.adapter is not None:
            if replay.adapter.dropped:
                log.warning("%d CAN frames were dropped: the host did not read the slcan pty fast enough",
                            replay.adapter.dropped)
            replay.adapter.close()
            if args.can_link and Path(args.can_link).is_symlink():
                Path(args.can_link).unlink()
    return 0
