"""``telematics-sim run SCENARIO.yaml``: a drive through a real broker, agent and collector, with faults
injected at given drive times, checked against expectations; exit status 0 only when all of them hold.

The runner starts a private Mosquitto on a free port, the collector (in this process, on SQLite) and
``telematics-agent run`` as its own process (under libfaketime when the scenario steps the clock),
writes the NMEA capture into a pty behind a symlink (so an unplugged and replugged port keeps its
name) and the CAN log into an emulated slcan adapter, and injects the faults on the drive's clock.

"Nothing lost" is judged against what the agent was actually given: the runner feeds every byte it
writes while the agent has the port open into its own :class:`NmeaDecoder`, one per stretch of
reading (a reopened port starts afresh, as the agent does), and through the agent's own fix filter,
so garbage, corrupted checksums, implausible fixes and bytes sent while the agent was down or the
port unplugged are accounted for exactly. The format is
in docs/scenarios.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import glob
import json
import logging
import os
import random
import re
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import tty
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import can
import msgspec
import yaml

from agent.config import ConfigError, parse_config
from agent.decode.nmea import NmeaDecoder
from agent.processors.fix_filter import FixFilter
from agent.record import Fix, Record, iso_utc, parse_iso_utc
from sim.broker import BrokerError, MosquittoBroker, end_process

log = logging.getLogger(__name__)

DEVICE_ID = "bench-scenario"
TOPIC_PREFIX = "bench"
DAY_S = 86_400.0
# Bytes written just before the agent stopped reading (a kill, an unplug) may not have been read.
READ_GRACE_S = 0.5
# The drive is over and delivered when the collector has stored nothing new for this long.
SETTLE_S = 3.0
# The agent writes its status file every status.interval_s (1 s here) with its own wall clock.
CLOCK_SEEN_S = 3.0
# GPS receiver events follow the replay's start, end and the faults; they are judged only when named.
GPS_HEALTH = frozenset(("gps_lost", "gps_regained", "gps_silent"))


# ---- the scenario file ---------------------------------------------------------------------------


class _Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class Inputs(_Strict, kw_only=True):
    """Capture files, relative to the scenario file."""

    nmea: str
    can: str | None = None
    geofences: str | None = None
    truth: str | None = None  # a ground-truth JSON of `telematics-sim generate`


class AgentSpec(_Strict, kw_only=True):
    """The agent's config: ``base`` (a YAML file) with ``config`` merged over it, key by key."""

    base: str | None = None
    config: dict[str, Any] = {}


FaultKind = Literal["serial_unplug", "garbage", "checksum_errors", "can_adapter_loss", "broker_down", "agent_kill",
                    "clock_step"]


class Fault(_Strict, kw_only=True):
    """One fault at drive second ``at``; ``for_s`` drive seconds long where it lasts."""

    at: float
    kind: FaultKind
    for_s: float = 0.0
    bytes: int = 256  # garbage
    count: int = 5  # checksum_errors: this many sentences in a row
    step_s: float = 0.0  # clock_step: the agent's wall clock jumps by this (negative: back)
    seed: int = 9


class Range(_Strict, kw_only=True):
    min: int = 0
    max: int | None = None


class EventExpect(_Strict, kw_only=True):
    """An event the agent must report once: at drive second ``at`` (or ISO ``time``) within ``tolerance_s``."""

    type: str
    at: float | None = None
    time: str | None = None
    tolerance_s: float = 1.0
    geofence_id: str | None = None


class Expect(_Strict, kw_only=True):
    all_fixes: bool = True  # every fix of the bytes the agent read that its fix filter accepts is stored
    no_duplicates: bool = True
    fixes: Range | None = None
    signals: Range | None = None
    signal_names: list[str] = []
    events: list[EventExpect] = []
    event_counts: dict[str, int] = {}
    truth: bool = False  # every event of inputs.truth in its window, attributes within tolerance
    no_unexpected_events: bool = False  # with truth: no event the truth does not name (GPS health aside)
    agent_log: list[str] = []  # regular expressions the agent's log must match
    # The stored records equal what `telematics-agent process` makes of the bytes and frames sent
    # (fixes, events without CAN; with CAN the value sequences of change-policy signals).
    same_as_process: bool = False


class Scenario(_Strict, kw_only=True):
    name: str
    description: str = ""
    inputs: Inputs
    agent: AgentSpec = msgspec.field(default_factory=AgentSpec)
    speed: float = 20.0
    baud: int = 115200
    start_s: float = 0.0
    end_s: float | None = None
    faults: list[Fault] = []
    expect: Expect = msgspec.field(default_factory=Expect)
    timeout_s: float = 300.0


class ScenarioError(Exception):
    """The scenario cannot be run as written; the message names the file and the problem."""


def load_scenario(path: str | Path) -> tuple[Scenario, Path]:
    """The validated scenario and the directory its relative paths start from."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        scenario = msgspec.convert(raw, Scenario, strict=True)
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except (yaml.YAMLError, msgspec.ValidationError) as exc:
        raise ScenarioError(f"{path}: {exc}") from exc
    base = path.resolve().parent
    for name in ("nmea", "can", "geofences", "truth"):
        value = getattr(scenario.inputs, name)
        if value is not None and not (base / value).is_file():
            raise ScenarioError(f"{path}: inputs.{name}: {base / value}: no such file")
    if scenario.expect.truth and scenario.inputs.truth is None:
        raise ScenarioError(f"{path}: expect.truth needs inputs.truth")
    if scenario.speed <= 0:
        raise ScenarioError(f"{path}: speed must be positive")
    return scenario, base


def merge(base: dict, over: dict) -> dict:
    """``over`` merged into ``base`` key by key (mappings recursively, everything else replaced)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# ---- the parts -----------------------------------------------------------------------------------


def libfaketime() -> str | None:
    """The libfaketime shared object (Debian package faketime), or None."""
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1") + glob.glob("/usr/lib/faketime/libfaketime.so.1"))
    return found[0] if found else None


class AgentProcess:
    """``telematics-agent run`` as its own process; with ``faketime`` its wall clock can be stepped."""

    def __init__(self, config: Path, log_path: Path, faketime_file: Path | None) -> None:
        self.config, self.log_path, self.faketime_file = config, log_path, faketime_file
        self.proc: subprocess.Popen | None = None
        self.clock_offset_s = 0.0

    def start(self) -> None:
        env = dict(os.environ)
        if self.faketime_file is not None:
            lib = libfaketime()
            if lib is None:
                raise ScenarioError("clock_step needs libfaketime: apt-get install faketime (or scripts/setup)")
            self.faketime_file.write_text(f"{self.clock_offset_s:+.0f}\n")
            # The offset is re-read from the file every second; the monotonic clock stays real, as in
            # a real clock step (NTP, a GPS time set, an RTC-less Pi finding the time).
            env.update(LD_PRELOAD=lib, FAKETIME_TIMESTAMP_FILE=str(self.faketime_file), FAKETIME_CACHE_DURATION="1",
                       FAKETIME_DONT_FAKE_MONOTONIC="1")
        exe = Path(sys.executable).parent / "telematics-agent"
        with self.log_path.open("ab") as log_file:  # the child keeps its own descriptor
            self.proc = subprocess.Popen([str(exe), "run", "--config", str(self.config)], stdout=log_file,
                                         stderr=subprocess.STDOUT, env=env)

    def step_clock(self, seconds: float) -> None:
        self.clock_offset_s += seconds
        self.faketime_file.write_text(f"{self.clock_offset_s:+.0f}\n")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def port_opens(self) -> int:
        """How often the agent processes of this run opened the GPS port (from the log)."""
        return self.log_text().count(" open at ")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        end_process(self.proc, signal.SIGKILL)

    def stop(self) -> None:
        end_process(self.proc)


class SerialPort:
    """The receiver's end of a pty behind a fixed symlink: unplugging closes it, plugging makes a new one."""

    def __init__(self, link: Path) -> None:
        self.link = link
        self._master: int | None = None
        self._slave: int | None = None

    @property
    def plugged(self) -> bool:
        return self._master is not None

    def plug(self) -> None:
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)  # bytes pass unchanged
        os.set_blocking(self._master, False)
        if self.link.is_symlink():
            self.link.unlink()
        self.link.symlink_to(os.ttyname(self._slave))

    def unplug(self) -> None:
        if self.link.is_symlink():
            self.link.unlink()
        for fd in (self._master, self._slave):
            if fd is not None:
                os.close(fd)
        self._master = self._slave = None

    def write(self, data: bytes, wait_s: float = 0.2) -> bytes:
        """Write what the pty takes within ``wait_s``; returns what was written (a full line is dropped,
        as a UART drops what nobody reads)."""
        done = 0
        deadline = time.monotonic() + wait_s
        while self._master is not None and done < len(data) and time.monotonic() < deadline:
            _, writable, _ = select.select([], [self._master], [], 0.05)
            if writable:
                try:
                    done += os.write(self._master, data[done:])
                except (BlockingIOError, OSError):
                    continue
        return data[:done]


class CanLine:
    """The emulated slcan adapter behind a fixed symlink; losing it closes the pty, a new one comes back."""

    def __init__(self, link: Path) -> None:
        self.link = link
        self.adapter = None
        self.dropped = 0  # frames not delivered: adapter gone, closed by the host, or overrun

    def plug(self) -> None:
        from sim.slcan_adapter import SlcanAdapter

        self.adapter = SlcanAdapter()
        path = self.adapter.open_pty()
        if self.link.is_symlink():
            self.link.unlink()
        self.link.symlink_to(path)

    @property
    def is_open(self) -> bool:
        """The host has opened the adapter's channel (``O`` or ``L``)."""
        return self.adapter is not None and self.adapter.is_open

    def unplug(self) -> None:
        adapter, self.adapter = self.adapter, None
        if self.link.is_symlink():
            self.link.unlink()
        if adapter is not None:
            adapter.close()

    def deliver(self, msg) -> bool:
        adapter = self.adapter
        if adapter is not None and adapter.deliver(msg):
            return True
        self.dropped += 1
        return False


@dataclass
class Stretch:
    """The bytes one agent read in one stretch of an open port, decoded and filtered as the agent does
    (``fix_filter`` is that agent process's: its state lives as long as the process)."""

    decoder: NmeaDecoder
    fix_filter: FixFilter
    fixes: list[tuple[float, float]] = field(default_factory=list)  # (utc, wall time the agent had it)

    def feed(self, data: bytes, wall: float, reference_utc: float) -> None:
        self.decoder.set_reference_utc(reference_utc)
        self._keep(self.decoder.feed(data), wall)

    def flush(self, wall: float) -> None:
        self._keep(self.decoder.flush(), wall)

    def _keep(self, fixes: list[tuple[float, Fix]], wall: float) -> None:
        self.fixes += [(utc, wall) for utc, fix in fixes
                       if self.fix_filter.accept(Record(utc=utc, mono=0.0, data=fix))]


@dataclass
class Outcome:
    """What a run produced: the records the collector stored and what the agent was given."""

    records: list[dict]
    expected_fixes: set[float]
    may_lose: set[float]
    day_shift_s: float
    start_utc: float | None
    agent_log: str
    clock_steps: list[tuple[float, float | None]] = field(default_factory=list)  # (agent offset wanted, seen)
    offline: list[dict] | None = None  # `telematics-agent process` on what was sent
    change_signals: frozenset[str] = frozenset()  # signal names sampled on change (timing-independent)
    can_sent: int = 0
    can_dropped: int = 0


# ---- running -------------------------------------------------------------------------------------


class Rig:
    """The running parts of one scenario and the state of feeding the agent; each fault action is a method.

    ``send`` writes one line of the drive and keeps the account of what the agent was given: one
    :class:`Stretch` per opening of the port by a living agent.
    """

    # Fault kind -> (the action that begins it, the action that ends it).
    LASTING = {"agent_kill": ("agent_kill", "agent_start"), "serial_unplug": ("serial_unplug", "serial_plug"),
               "broker_down": ("broker_down", "broker_up"), "can_adapter_loss": ("can_loss", "can_back")}
    UNDO = frozenset(undo for _, undo in LASTING.values())

    def __init__(self, workdir: Path, config, agent: AgentProcess, gps: SerialPort, broker: MosquittoBroker,
                 can_line: CanLine | None) -> None:
        self.config, self.agent, self.gps, self.broker, self.can_line = config, agent, gps, broker, can_line
        self.floor = _dt.datetime.combine(config.gps.rollover_floor, _dt.time(), _dt.timezone.utc).timestamp()
        self.opens_wanted = 1  # the agent has the port open when its log shows this many openings
        # The filter the agent runs on every fix (gps.filter), on the capture's clock: a new one per process.
        self.fix_filter = FixFilter(config.gps.filter)
        self.stretch: Stretch | None = None
        self.stretches: list[Stretch] = []
        self.may_lose: list[tuple[float, float]] = []  # wall-time windows before a kill or an unplug
        self.corrupt_left = 0
        self.prefix = b""  # garbage going out before the next line
        self.clock_steps: list[tuple[float, float | None]] = []
        self._watchers: list[threading.Thread] = []
        self.sent_can = workdir / "sent.candump.log"
        self._sent = (workdir / "sent.nmea").open("wb")

    def send(self, line: bytes) -> None:
        """Write one line of the drive (with any fault applied) and account for what the agent reads."""
        data, self.prefix = self.prefix + line, b""
        if self.corrupt_left and line.lstrip(b"\x00").startswith((b"$", b"!")) and b"*" in line:
            data = data[: len(data) - len(line)] + corrupt_checksum(line)
            self.corrupt_left -= 1
        ready = self.gps.plugged and self.agent.alive() and self.agent.port_opens() >= self.opens_wanted
        if ready and self.stretch is None:
            self.stretch = Stretch(NmeaDecoder(self.config.gps.allow_missing_checksum, self.floor), self.fix_filter)
            self.stretches.append(self.stretch)
        written = self.gps.write(data) if self.gps.plugged else b""
        self._sent.write(written)
        if ready and written:
            now = time.time()
            self.stretch.feed(written, now, now + self.agent.clock_offset_s)

    def _reader_gone(self, commit_window_s: float, flush: bool) -> None:
        if self.stretch is not None and flush:
            self.stretch.flush(time.time())  # the agent completes its epoch when the port goes
        self.stretch = None
        now = time.time()
        self.may_lose.append((now - READ_GRACE_S - commit_window_s, now))

    # -- the actions --

    def agent_kill(self) -> None:
        self._reader_gone(self.config.buffer.commit_window_s, flush=False)  # a kill loses the commit window
        self.agent.kill()

    def agent_start(self) -> None:
        self.agent.start()
        self.fix_filter = FixFilter(self.config.gps.filter)
        self.opens_wanted += 1

    def serial_unplug(self) -> None:
        self._reader_gone(0.0, flush=True)
        self.gps.unplug()

    def serial_plug(self) -> None:
        self.gps.plug()
        self.opens_wanted += 1

    def garbage(self, junk: bytes) -> None:
        self.prefix += junk

    def checksum_errors(self, count: int) -> None:
        self.corrupt_left += count

    def broker_down(self) -> None:
        self.broker.stop()

    def broker_up(self) -> None:
        self.broker.start()

    def can_loss(self) -> None:
        self.can_line.unplug()

    def can_back(self) -> None:
        self.can_line.plug()

    def clock_step(self, step_s: float) -> None:
        self.agent.step_clock(step_s)
        watcher = threading.Thread(target=self._see_clock, args=(self.agent.clock_offset_s,), daemon=True)
        watcher.start()
        self._watchers.append(watcher)

    def _see_clock(self, offset_s: float) -> None:
        """Wait until the agent's status file (written by its wall clock every second) shows ``offset_s``."""
        status = Path(self.config.device.data_dir) / "status.json"
        deadline = time.monotonic() + CLOCK_SEEN_S
        observed = None
        while time.monotonic() < deadline:
            try:
                observed = json.loads(status.read_text())["updated_utc"] - time.time()
            except (OSError, ValueError, KeyError):
                pass
            if observed is not None and abs(observed - offset_s) < CLOCK_SEEN_S:
                break
            time.sleep(0.2)
        self.clock_steps.append((offset_s, None if observed is None else round(observed)))

    # -- the end --

    def drive_ended(self) -> None:
        if self.stretch is not None:
            self.stretch.flush(time.time())  # the line goes quiet: the agent completes the last epoch
        for watcher in self._watchers:
            watcher.join()

    def expected_fixes(self) -> tuple[set[float], set[float]]:
        """The fix times the agent must have stored, and those of them it may have lost (kill, unplug)."""
        expected = {round(utc, 3) for st in self.stretches for utc, _ in st.fixes}
        may_lose = {round(utc, 3) for st in self.stretches for utc, wall in st.fixes
                    if any(lo <= wall <= hi for lo, hi in self.may_lose)}
        return expected, may_lose

    def close(self) -> None:
        self._sent.close()




class Runner:
    """Runs one scenario in ``workdir``; :meth:`run` returns the :class:`Outcome`."""

    def __init__(self, scenario: Scenario, base: Path, workdir: Path, *, speed: float | None = None,
                 echo: Callable[[str], None] = lambda line: None) -> None:
        self.s = scenario
        self.base = base
        self.workdir = workdir
        self.speed = speed or scenario.speed
        self.echo = echo
        self.today = _dt.datetime.now(_dt.timezone.utc).date()
        self.truth = json.loads((base / scenario.inputs.truth).read_text()) if scenario.inputs.truth else None

    def path(self, name: str | None) -> Path | None:
        return None if name is None else (self.base / name).resolve()

    def agent_config(self, broker_port: int, gps_link: Path, can_link: Path | None) -> dict:
        """Runner defaults < the truth's edge settings < the base file < the scenario's config < wiring."""
        config: dict = {
            "device": {"id": DEVICE_ID},
            "gps": {"reopen_interval_s": 0.5,
                    # Replayed faster than real time, GPS time runs ahead of the wall clock: the fix
                    # filter's plausibility window against it is opened up (a scenario may narrow it).
                    "filter": {"max_future_s": 10 * DAY_S * 365, "max_age_s": 10 * DAY_S * 365}},
            "mqtt": {"ack_timeout_s": 5, "reconnect_min_s": 0.5, "reconnect_max_s": 2},
            "buffer": {"commit_window_s": 0.2},
            "status": {"interval_s": 1},
        }
        if self.truth is not None:
            config["edge"] = self.truth["edge_settings"]
        if self.s.agent.base is not None:
            base_file = self.path(self.s.agent.base)
            try:
                config = merge(config, yaml.safe_load(base_file.read_text()) or {})
            except (OSError, yaml.YAMLError) as exc:
                raise ScenarioError(f"agent.base: {base_file}: {exc}") from exc
        config = merge(config, self.s.agent.config)
        wiring: dict = {
            "device": {"data_dir": str(self.workdir / "agent-data")},
            "gps": {"port": str(gps_link), "baud": self.s.baud},
            "mqtt": {"host": "127.0.0.1", "port": broker_port, "topic_prefix": TOPIC_PREFIX},
        }
        if self.s.inputs.geofences:
            wiring["edge"] = {"geofences": {"file": str(self.path(self.s.inputs.geofences))}}
        if can_link is not None:
            # One bus, on the emulated adapter; the scenario may set its other keys (name, bitrate, ...).
            bus = {"name": "can0", "reopen_interval_s": 0.5, **((config.get("can") or {}).get("buses") or [{}])[0],
                   "interface": "slcan_buffered", "channel": str(can_link)}
            wiring["can"] = {"buses": [bus]}
        return merge(config, wiring)

    def run(self) -> Outcome:
        from collector.service import Collector
        from sim.capture import can_lead_s, load_candump
        from sim.replay import CanReplay, DriveClock, NmeaReplay

        s = self.s
        nmea = NmeaReplay(self.path(s.inputs.nmea), speed=self.speed, keep_dates=False, today=self.today,
                          start_s=s.start_s, end_s=s.end_s)
        for fault in s.faults:
            if not s.start_s <= fault.at <= nmea.end_s:
                raise ScenarioError(f"the {fault.kind} fault at {fault.at:g} s is outside the drive played "
                                    f"({s.start_s:g} to {nmea.end_s:g} s)")
        first_date = nmea.timeline.first_date
        day_shift_s = (self.today - first_date).days * DAY_S if first_date else 0.0
        gps = SerialPort(self.workdir / "gps0")
        can_line = CanLine(self.workdir / "can0") if s.inputs.can else None
        broker = MosquittoBroker(self.workdir)
        config_path = self.workdir / "agent.yaml"
        config_path.write_text(yaml.safe_dump(self.agent_config(broker.port, gps.link, can_line and can_line.link),
                                              sort_keys=False))
        try:
            config = parse_config(config_path.read_text(), str(config_path))
        except ConfigError as exc:
            raise ScenarioError(f"the agent config the scenario makes is not valid: {exc}") from exc
        faketime = self.workdir / "faketime" if any(f.kind == "clock_step" for f in s.faults) else None
        agent = AgentProcess(config_path, self.workdir / "agent.log", faketime)
        db = self.workdir / "collector.sqlite"
        collector = Collector("127.0.0.1", broker.port, TOPIC_PREFIX, db)
        rig = Rig(self.workdir, config, agent, gps, broker, can_line)
        stop = threading.Event()
        can_replay = can_thread = None
        try:
            broker.start()
            collector.start()
            gps.plug()
            if can_line is not None:
                can_line.plug()
            agent.start()
            self._wait(lambda: agent.port_opens() >= 1 or not agent.alive(), 60, "the agent opening the GPS port")
            if can_line is not None:
                self._wait(lambda: can_line.is_open or not agent.alive(), 60, "the agent opening the CAN adapter")
            if not agent.alive():
                raise ScenarioError(f"the agent exited at start with status {agent.proc.returncode}:\n"
                                    + _tail(agent.log_text()))
            clock = DriveClock(self.speed)
            if can_line is not None:
                frames = load_candump(self.path(s.inputs.can))
                can_replay = CanReplay(frames, can_line.deliver, lead_s=can_lead_s(nmea.timeline, frames),
                                       start_s=nmea.start_s, end_s=nmea.end_s)
                # The frames to be sent, with their recorded time stamps (the replay re-stamps them).
                with can.CanutilsLogWriter(str(rig.sent_can), channel="can0") as writer:
                    for _, msg in can_replay.frames:
                        writer.on_message_received(msg)
                can_thread = threading.Thread(target=can_replay.run, args=(stop, clock), name="can-replay", daemon=True)
                can_thread.start()
            actions = self._actions()
            for offset, data in nmea.lines:
                while actions and actions[0][0] <= offset:
                    at, description, action, args = actions.pop(0)
                    clock.wait_until(at, stop)
                    self.echo(f"  {at:7.1f} s  {description}")
                    getattr(rig, action)(*args)
                clock.wait_until(offset, stop)
                rig.send(data)
            for at, description, action, args in actions:  # faults that would end after the drive end now
                if action in Rig.UNDO:
                    self.echo(f"  {at:7.1f} s  {description} (at the end of the drive)")
                    getattr(rig, action)(*args)
            rig.drive_ended()
            if can_thread is not None:
                can_thread.join(max(1.0, (nmea.duration_s + 5) / self.speed))
            self._settle(db)
            records = stored(db)
            log_text = agent.log_text()
        finally:
            stop.set()
            agent.stop()
            collector.stop()
            broker.stop()
            gps.unplug()
            if can_line is not None:
                can_line.unplug()
            rig.close()
        offline = self._process(config_path, rig.sent_can if can_line else None) if s.expect.same_as_process else None
        change = frozenset(sig.name or sig.signal for sig in (config.can.signals if config.can else [])
                           if sig.policy == "change")
        expected, may_lose = rig.expected_fixes()
        start_utc = nmea.timeline.start_utc + day_shift_s + s.start_s if nmea.timeline.start_utc is not None else None
        return Outcome(records, expected, may_lose, day_shift_s, start_utc, log_text, rig.clock_steps, offline,
                       change, can_replay.sent if can_replay else 0, can_line.dropped if can_line else 0)

    def _process(self, config_path: Path, can_log: Path | None) -> list[dict]:
        """``telematics-agent process`` on the NMEA bytes and CAN frames this run sent, with the agent's config."""
        args = [str(Path(sys.executable).parent / "telematics-agent"), "process", "--nmea",
                str(self.workdir / "sent.nmea"), "--config", str(config_path)]
        if can_log is not None:
            args += ["--can", str(can_log)]
        if self.s.inputs.geofences:
            args += ["--geofences", str(self.path(self.s.inputs.geofences))]
        result = subprocess.run(args, capture_output=True, text=True, timeout=self.s.timeout_s)
        if result.returncode != 0:
            raise ScenarioError(f"telematics-agent process failed: {result.stderr.strip()}")
        out = [json.loads(line) for line in result.stdout.splitlines()]
        for line in out:
            line["utc"] = parse_iso_utc(line["time"])
        return out

    def _actions(self) -> list[tuple[float, str, str, tuple]]:
        """The faults as (drive second, description, Rig method, its arguments) in time order; a lasting
        fault is two actions, its start and its end."""
        out: list[tuple[float, str, str, tuple]] = []
        for f in self.s.faults:
            at = f.at - self.s.start_s
            if f.kind == "garbage":
                out.append((at, f"garbage: {f.bytes} random bytes", "garbage", (random.Random(f.seed).randbytes(f.bytes),)))
            elif f.kind == "checksum_errors":
                out.append((at, f"checksum errors in {f.count} sentences", "checksum_errors", (f.count,)))
            elif f.kind == "clock_step":
                out.append((at, f"the agent's clock steps {f.step_s:+g} s", "clock_step", (f.step_s,)))
            else:
                begin, undo = Rig.LASTING[f.kind]
                out.append((at, f"{f.kind} for {f.for_s:g} s", begin, ()))
                out.append((at + f.for_s, f"{f.kind} ends", undo, ()))
        return sorted(out, key=lambda a: a[0])

    def _wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise ScenarioError(f"timed out after {timeout:g} s waiting for {what}")
            time.sleep(0.05)

    def _settle(self, db: Path) -> None:
        """Wait until the collector has stored nothing new for SETTLE_S (bounded by the scenario's timeout)."""
        deadline = time.monotonic() + self.s.timeout_s
        last, since = -1, time.monotonic()
        while time.monotonic() - since < SETTLE_S and time.monotonic() < deadline:
            count = len(stored(db))
            if count != last:
                last, since = count, time.monotonic()
            time.sleep(0.2)


def corrupt_checksum(line: bytes) -> bytes:
    """The sentence with its checksum's last hex digit changed (NMEA 0183: XOR of the bytes between $ and *)."""
    star = line.rindex(b"*")
    digit = line[star + 2 : star + 3]
    return line[: star + 2] + (b"0" if digit != b"0" else b"1") + line[star + 3 :]


def stored(db: Path) -> list[dict]:
    """What the collector stored for the scenario's device, in sequence order, flattened like ``process`` prints."""
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            rows = conn.execute("SELECT seq, kind, utc, data FROM records WHERE device = ? ORDER BY seq",
                                (DEVICE_ID,)).fetchall()
    except sqlite3.Error:
        return []
    out = []
    for seq, kind, utc, data in rows:
        payload = json.loads(data)
        payload.update(payload.pop("attrs", None) or {})
        out.append({**payload, "kind": kind, "seq": seq, "utc": utc, "time": iso_utc(utc)})
    return out


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.splitlines()[-lines:])


# ---- judging -------------------------------------------------------------------------------------


@dataclass
class Check:
    """One expectation's verdict, with the differences a person reads."""

    name: str
    ok: bool
    summary: str
    details: list[str] = field(default_factory=list)


def _t(utc: float) -> str:
    return iso_utc(utc)


def judge(s: Scenario, out: Outcome, truth: dict | None) -> list[Check]:
    """Every expectation of ``s`` against ``out``."""
    e = s.expect
    checks: list[Check] = []
    fixes = [r for r in out.records if r["kind"] == "fix"]
    events = [r for r in out.records if r["kind"] == "event"]
    signals = [r for r in out.records if r["kind"] == "signal"]
    fix_times = [round(r["utc"], 3) for r in fixes]
    if e.all_fixes:
        got = set(fix_times)
        missing = sorted(out.expected_fixes - got)
        allowed = [t for t in missing if t in out.may_lose]
        lost = [t for t in missing if t not in out.may_lose]
        summary = (f"{len(out.expected_fixes)} good fixes were read by the agent, {len(got)} stored, "
                   f"{len(lost)} lost")
        if allowed:
            summary += f" ({len(allowed)} more within the commit window or read grace before a kill/unplug: allowed)"
        checks.append(Check("all fixes", not lost, summary, [f"lost the fix of {_t(t)}" for t in lost[:20]]
                            + ([f"... and {len(lost) - 20} more"] if len(lost) > 20 else [])))
    if e.no_duplicates:
        dups = _duplicates([(_t(t),) for t in fix_times])
        dups += _duplicates([(r["type"], r["time"], r.get("geofence_id")) for r in events])
        seqs = [r["seq"] for r in out.records]
        checks.append(Check("no duplicates", not dups, f"{len(fixes)} fixes and {len(events)} events, "
                            f"{len(dups)} stored twice; sequence numbers {_ranges(seqs)}",
                            [f"stored {n} times: {' '.join(str(k) for k in key if k is not None)}" for key, n in dups]))
    for name, records, want in (("fixes", fixes, e.fixes), ("signals", signals, e.signals)):
        if want is not None:
            ok = len(records) >= want.min and (want.max is None or len(records) <= want.max)
            bounds = f"at least {want.min}" + (f" and at most {want.max}" if want.max is not None else "")
            checks.append(Check(f"{name} count", ok, f"{len(records)} {name} stored, {bounds} wanted"))
    if e.signal_names:
        names = {r["name"] for r in signals}
        missing_names = [n for n in e.signal_names if n not in names]
        checks.append(Check("signal names", not missing_names, f"{len(names)} signal names stored",
                            [f"no {n} signal stored (got: {', '.join(sorted(names)) or 'none'})" for n in missing_names]))
    for type_, count in e.event_counts.items():
        n = sum(1 for r in events if r["type"] == type_)
        checks.append(Check(f"count of {type_}", n == count, f"{n} {type_} events stored, {count} wanted"))
    if e.events:
        wants = [(ev.type, _when(ev, out), ev.tolerance_s, ev.geofence_id, {}) for ev in e.events]
        checks.append(_match_events("events", wants, events, None))
    if e.truth and truth is not None:
        has_can = s.inputs.can is not None
        wants = []
        for ev in truth["events"]:
            if "can" in ev.get("needs", []) and not has_can:
                continue
            lo, hi = (parse_iso_utc(t) + out.day_shift_s for t in ev["window"])
            tolerances = {k: (ev[k], tol) for k, tol in ev.get("tolerance", {}).items()}
            wants.append((ev["type"], (lo + hi) / 2, (hi - lo) / 2 + 0.5, ev.get("geofence_id"), tolerances))
        unexpected = None
        if e.no_unexpected_events:
            unexpected = set(truth.get("unchecked_types", [])) | GPS_HEALTH
        checks.append(_match_events("ground truth", wants, events, unexpected))
    if e.same_as_process and out.offline is not None:
        checks.append(_same_as_process(out, has_can=s.inputs.can is not None))
    if out.clock_steps:
        wrong = [(want, seen) for want, seen in out.clock_steps if seen is None or abs(seen - want) >= CLOCK_SEEN_S]
        checks.append(Check("clock steps", not wrong, f"{len(out.clock_steps)} steps of the agent's wall clock, "
                            f"{len(out.clock_steps) - len(wrong)} seen in its status file",
                            [f"the agent's clock should be {want:+.0f} s off, its status file says "
                             f"{'nothing' if seen is None else f'{seen:+.0f} s'}" for want, seen in wrong]))
    if e.agent_log:
        missing_patterns = [p for p in e.agent_log if not re.search(p, out.agent_log, re.M)]
        checks.append(Check("agent log", not missing_patterns, f"{len(e.agent_log)} patterns wanted in the agent's log",
                            [f"nothing in the agent's log matches /{p}/" for p in missing_patterns]))
    return checks


def _same_as_process(out: Outcome, has_can: bool) -> Check:
    """The live agent's records against ``process`` on the same bytes: fixes by time and position; events
    (GPS health aside) without CAN, whose frames the live agent stamps on arrival; the value sequence of
    each change-policy signal, which no timing can change."""
    def fixes(records: list[dict]) -> list[tuple]:
        # Positions in units of the wire's stated resolution, 1e-7 degree (docs/wire-format.md).
        return [(iso_utc(r["utc"]), round(r["lat"] * 1e7), round(r["lon"] * 1e7)) for r in records if r["kind"] == "fix"]

    def unmatched(these: list[tuple], those: list[tuple]) -> list[tuple]:
        # Lossless at 1e-7 degree means within half a unit; each side rounded once more: within one.
        by_time = {f[0]: f for f in those}
        return sorted(f for f in these if not (f[0] in by_time and abs(f[1] - by_time[f[0]][1]) <= 1
                                               and abs(f[2] - by_time[f[0]][2]) <= 1))

    def events(records: list[dict]) -> list[tuple]:
        return sorted((r["type"], iso_utc(r["utc"]), r.get("geofence_id")) for r in records
                      if r["kind"] == "event" and r["type"] not in GPS_HEALTH)

    def values(records: list[dict]) -> dict[str, list]:
        out_: dict[str, list] = {}
        for r in records:
            if r["kind"] == "signal" and r["name"] in out.change_signals:
                out_.setdefault(r["name"], []).append(r["value"])
        return out_

    details: list[str] = []
    live, offline = fixes(out.records), fixes(out.offline)
    only_offline, only_live = unmatched(offline, live), unmatched(live, offline)
    compared = [f"{len(offline)} fixes"]
    # Two differences at the ends are by design: epochs before the capture's first date are dated by
    # the live agent's clock (process has none and drops them), and process ends by flushing the
    # adaptive reporter (a live agent reports that fix when it stops).
    early = [f for f in only_live if offline and f[0] < offline[0][0]]
    final = [f for f in only_offline if live and f[0] > live[-1][0] and f == offline[-1]]
    if early or final:
        compared.append(f"{len(early)} fixes before the capture's first date and {len(final)} final reporter flush "
                        "allowed")
    details += [f"fix {t} {lat / 1e7:.7f},{lon / 1e7:.7f}: process has it, the live agent did not store it"
                for t, lat, lon in only_offline if (t, lat, lon) not in final][:20]
    details += [f"fix {t} {lat / 1e7:.7f},{lon / 1e7:.7f}: stored, process does not have it"
                for t, lat, lon in only_live if (t, lat, lon) not in early][:20]
    if not has_can:
        live_e, offline_e = events(out.records), events(out.offline)
        details += [f"event {' '.join(filter(None, k))}: process has it, not stored" for k in offline_e if k not in live_e]
        details += [f"event {' '.join(filter(None, k))}: stored, process does not have it" for k in live_e if k not in offline_e]
        compared.append(f"{len(offline_e)} events")
    else:
        live_v, offline_v = values(out.records), values(out.offline)
        for name in sorted(set(live_v) | set(offline_v)):
            a, b = live_v.get(name, []), offline_v.get(name, [])
            if a != b:
                at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                details.append(f"signal {name}: {len(a)} values stored, {len(b)} from process; first difference "
                               f"at value {at + 1}: {a[at] if at < len(a) else 'none'} vs {b[at] if at < len(b) else 'none'}")
        compared.append(f"{sum(len(v) for v in offline_v.values())} change-sampled signal values "
                        f"({', '.join(sorted(offline_v)) or 'none'}); {out.can_sent} CAN frames sent, {out.can_dropped} not delivered")
    return Check("same as process", not details, "compared " + ", ".join(compared), details)


def _when(ev: EventExpect, out: Outcome) -> float:
    if ev.time is not None:
        return parse_iso_utc(ev.time) + out.day_shift_s
    if ev.at is None or out.start_utc is None:
        raise ScenarioError(f"expect.events: {ev.type} needs `time`, or `at` with a dated NMEA capture")
    return out.start_utc + ev.at


def _match_events(name: str, wants: list, events: list[dict], ignore_unexpected: set[str] | None) -> Check:
    """Each wanted (type, utc, tolerance, fence, attribute tolerances) matched once, nearest first."""
    left = list(events)
    details: list[str] = []
    for type_, utc, tol, fence, attrs in wants:
        same = [r for r in left if r["type"] == type_ and (fence is None or r.get("geofence_id") == fence)]
        hits = [r for r in same if abs(r["utc"] - utc) <= tol]
        where = f" ({fence})" if fence else ""
        if not hits:
            nearest = min(same, key=lambda r: abs(r["utc"] - utc), default=None)
            hint = (f"; nearest {type_} at {nearest['time']} ({nearest['utc'] - utc:+.1f} s)" if nearest
                    else f"; no {type_}{where} at all")
            details.append(f"missing {type_}{where} at {_t(utc)} ±{tol:.1f} s{hint}")
            continue
        hit = min(hits, key=lambda r: abs(r["utc"] - utc))
        left.remove(hit)
        for key, (value, tolerance) in attrs.items():
            if hit.get(key) is None or abs(hit[key] - value) > tolerance:
                details.append(f"{type_}{where} at {hit['time']}: {key} {hit.get(key)} is not {value} ±{tolerance}")
    if ignore_unexpected is not None:
        details += [f"unexpected {r['type']} at {r['time']}" + (f" ({r['geofence_id']})" if r.get("geofence_id") else "")
                    for r in left if r["type"] not in ignore_unexpected]
    return Check(name, not details, f"{len(wants)} events wanted, {len(events)} stored", details)


def _duplicates(keys: list[tuple]) -> list[tuple[tuple, int]]:
    counts: dict[tuple, int] = {}
    for key in keys:
        counts[key] = counts.get(key, 0) + 1
    return [(key, n) for key, n in counts.items() if n > 1]


def _ranges(seqs: list[int]) -> str:
    """``1-340, 343-470`` for the sequence numbers stored (a gap is what never arrived or was never committed)."""
    parts: list[list[int]] = []
    for seq in sorted(set(seqs)):
        if parts and seq == parts[-1][1] + 1:
            parts[-1][1] = seq
        else:
            parts.append([seq, seq])
    return ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in parts) or "none"


def render(s: Scenario, checks: list[Check], out: Outcome | None = None) -> str:
    """The verdict as a person reads it."""
    lines = [f"scenario {s.name}: {len(checks)} expectations"]
    for c in checks:
        lines.append(f"  {'ok  ' if c.ok else 'FAIL'}  {c.name}: {c.summary}")
        lines += [f"          {d}" for d in c.details]
    failed = sum(1 for c in checks if not c.ok)
    lines.append(f"verdict: {'PASS' if not failed else 'FAIL'}"
                 + (f" ({failed} of {len(checks)} expectations not met)" if failed else ""))
    return "\n".join(lines)


def run_scenario(path: str | Path, workdir: Path, *, speed: float | None = None,
                 echo: Callable[[str], None] = lambda line: None) -> tuple[Scenario, list[Check], Outcome]:
    """Load, run and judge one scenario file (the test suite's and the command's entry point)."""
    scenario, base = load_scenario(path)
    workdir.mkdir(parents=True, exist_ok=True)
    runner = Runner(scenario, base, workdir, speed=speed, echo=echo)
    echo(f"scenario {scenario.name}: {scenario.description.strip()}" if scenario.description else
         f"scenario {scenario.name}")
    outcome = runner.run()
    return scenario, judge(scenario, outcome, runner.truth), outcome


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scenario", type=Path, help="the scenario's YAML file (see docs/scenarios.md)")
    parser.add_argument("--speed", type=float, default=None, help="replay N times faster than recorded "
                        "(default: the scenario's speed)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the run's files here "
                        "(agent config and log, collector database); default: a temporary directory, removed")
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def run(args: argparse.Namespace) -> int:
    from agent.cli_base import CommandError
    from agent.ops.logging import setup_logging

    setup_logging(args.log_level)
    if args.speed is not None and args.speed <= 0:
        raise CommandError("--speed must be positive")
    keep = args.workdir is not None
    workdir = args.workdir.resolve() if keep else Path(tempfile.mkdtemp(prefix="scenario-"))
    if keep and workdir.is_dir() and any(workdir.iterdir()):
        # Emptied only when it holds an earlier run: a stale database would mix two runs.
        if not (workdir / "agent.yaml").exists():
            raise CommandError(f"{workdir}: not empty and not an earlier scenario run; give another --workdir")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        scenario, checks, _ = run_scenario(args.scenario, workdir, speed=args.speed,
                                           echo=lambda line: print(line, flush=True))
    except (ScenarioError, BrokerError) as exc:
        raise CommandError(str(exc)) from exc
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(render(scenario, checks))
    return 0 if all(c.ok for c in checks) else 1
