"""The CAN source: one python-can bus, decoded and sampled in its own thread, reopened when it fails.

Frames are decoded where they are received (no hand-off per frame between threads); only the
sampled records go to the pipeline. Listen-only is the default and is enforced where the
controller is opened: slcan adapters get ``L``, socketcan relies on systemd-networkd's
``ListenOnly=yes`` (firmware_config/80-can0.network), and an interface that cannot be opened
listen-only is refused unless the vehicle's config sets ``can.allow_transmit``. Only then does
the source transmit: the OBD-II poller's requests on obd2 buses, J1939 Requests (PGN 59904) for
``can.j1939.requests`` on j1939 buses; the answers are decoded by the same passive paths as any frame.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import can

from agent.clock import Clock
from agent.config import CanBusConfig, CanConfig
from agent.decode import obd
from agent.decode.can_decoder import obd_items
from agent.decode.j1939 import J1939Database, pgn_of
from agent.decode.j1939_request import PGN_ACK, J1939Requester
from agent.decode.j1939_tp import PGN_TP_CM, PGN_TP_DT
from agent.decode.j1939_tp_receiver import CtsResponder
from agent.pipeline import Emit
from agent.record import Record
from agent.sources.can_sampling import CanSampler

log = logging.getLogger(__name__)

# How each python-can interface is told to open its controller listen-only. socketcan's mode is
# the kernel's (ip link / networkd); virtual buses have no controller to disturb.
LISTEN_ONLY_ARGS: dict[str, dict[str, object]] = {
    "slcan_buffered": {"listen_only": True},
    "slcan": {"listen_only": True},
    "socketcan": {},
    "virtual": {},
}
TRANSMIT_ARGS: dict[str, dict[str, object]] = {"slcan_buffered": {"listen_only": False}, "slcan": {"listen_only": False}}
# Interfaces whose bit rate the agent sets (socketcan's is networkd's).
SETS_BITRATE = frozenset(("slcan_buffered", "slcan"))
# Bit rates tried, most common first, when bitrate is 0 (J1939-11/-14: 250k/500k; ISO 15765-4: 500k/250k).
DETECT_BITRATES = (250000, 500000, 125000, 1000000)
DETECT_WINDOW_S = 1.0
# SocketCAN error frame classes (linux/can/error.h): controller problems, bus-off.
CAN_ERR_CRTL = 0x04
CAN_ERR_BUSOFF = 0x40
CAN_ERR_RESTARTED = 0x100
# Frames drained per batch before the records go out and the OBD-II schedule is looked at.
BATCH = 256


class CanSource:
    """A Source (agent/pipeline.py) for one bus of ``config.buses`` (the first by default)."""

    def __init__(self, config: CanConfig, clock: Clock, bus: CanBusConfig | None = None,
                 db: J1939Database | None = None) -> None:
        self.config = config
        self.bus_config = bus or config.buses[0]
        self.clock = clock
        self.name = f"can:{self.bus_config.name}"
        interface = self.bus_config.interface
        if interface not in can.interfaces.BACKENDS:
            raise ValueError(f"can bus {self.bus_config.name}: python-can has no interface {interface!r} "
                             f"(known: {', '.join(sorted(can.interfaces.BACKENDS))})")
        if not config.allow_transmit and interface not in LISTEN_ONLY_ARGS:
            raise ValueError(
                f"can bus {self.bus_config.name}: the agent cannot open interface {interface!r} listen-only; "
                "use socketcan or slcan_buffered, or set can.allow_transmit: true if this vehicle allows it")
        # OSError or DbcError (naming the file): a bad can.dbc entry stops the start-up.
        self.db = db if db is not None else J1939Database.load(config.dbc)
        self.polling = self.bus_config.protocol == "obd2" and config.allow_transmit
        if self.bus_config.protocol == "obd2" and not config.allow_transmit:
            log.warning("%s: obd2 without can.allow_transmit: only listening to another tester's answers", self.name)
        self.sampler = CanSampler(self.db, config.signals, self.bus_config.name, mono=self._mono,
                                  obd_answers=not self.polling)
        # J1939 requests (agent/decode/j1939_request.py) on a j1939 bus the vehicle lets us transmit on.
        self.requesting = (self.bus_config.protocol == "j1939" and config.allow_transmit
                           and bool(config.j1939.requests))
        self.poller: obd.ObdPoller | None = None
        self.requester: J1939Requester | None = None
        self.responder: CtsResponder | None = None  # CTS for RTS/CTS answers sent to the agent
        self._counts = {"frames": 0, "error_frames": 0, "bus_off": 0, "records": 0, "opens": 0, "failures": 0,
                        "sent": 0}
        self.state = "closed"  # closed, up, bus_off, down
        self.bitrate: int | None = self.bus_config.bitrate or None
        self._bus: can.BusABC | None = None
        # Raw-tap hook: called with every frame received and this bus's name (the recorder,
        # agent/ops/recorder.py); None costs one comparison per frame.
        self.on_frame: Callable[[can.Message, str], None] | None = None

    def _mono(self, t: float) -> float:
        return self.clock.monotonic() - (self.clock.wall() - t)

    def stats(self) -> dict[str, object]:
        """Counters for the status command."""
        tp = self.sampler.decoder.tp(self.bus_config.name)
        out: dict[str, object] = dict(self._counts, state=self.state, bitrate=self.bitrate,
                                      tp_completed=tp.completed, tp_dropped=tp.dropped)
        if self._bus is not None and hasattr(self._bus, "bad_lines"):
            out["bad_lines"] = self._bus.bad_lines  # slcan_buffered: malformed lines from the adapter
        if self.poller is not None:
            out["obd_polled_pids"] = sorted(self.poller.schedule)
            out["obd_dropped_pids"] = sorted(self.poller.dropped_pids)
        if self.requester is not None:
            out["j1939_answered_pgns"] = sorted(self.requester.answered)
            out["j1939_refused_pgns"] = sorted(self.requester.refused)
        return out

    # -- opening -------------------------------------------------------------------------------------

    def _open(self, bitrate: int | None) -> can.BusABC:
        cfg = self.bus_config
        kwargs: dict[str, object] = dict(cfg.options)
        kwargs.update(TRANSMIT_ARGS.get(cfg.interface, {}) if self.config.allow_transmit
                      else LISTEN_ONLY_ARGS[cfg.interface])
        if bitrate and cfg.interface in SETS_BITRATE:
            kwargs["bitrate"] = bitrate
        # receive_own_messages off: the OBD-II poller must not read its own requests back.
        return can.Bus(interface=cfg.interface, channel=cfg.channel, **kwargs)

    def _detect_bitrate(self, stop: threading.Event) -> tuple[can.BusABC, can.Message] | None:
        """Listen at each candidate rate until a valid frame arrives; the bus is left open at that rate."""
        for candidate in DETECT_BITRATES:
            if stop.is_set():
                return None
            bus = self._open(candidate)
            deadline = time.monotonic() + DETECT_WINDOW_S
            while time.monotonic() < deadline:
                msg = bus.recv(timeout=0.1)
                if msg is not None and not msg.is_error_frame:
                    log.info("%s: bit rate detected: %d bit/s", self.name, candidate)
                    self.bitrate = candidate
                    return bus, msg
            bus.shutdown()
        return None

    # -- running -------------------------------------------------------------------------------------

    def run(self, emit: Emit, stop: threading.Event) -> None:
        """Receive until ``stop``; reopen after ``reopen_interval_s`` whenever the bus fails."""
        cfg = self.bus_config
        while not stop.is_set():
            first = None
            try:
                if self.bitrate is None and cfg.interface in SETS_BITRATE:
                    detected = self._detect_bitrate(stop)
                    if detected is None:
                        raise can.CanOperationError("no frames at any bit rate")
                    bus, first = detected
                else:
                    bus = self._open(self.bitrate)
            except (can.CanError, OSError, ValueError) as exc:
                self._failed("cannot open", exc)
                stop.wait(cfg.reopen_interval_s)
                continue
            self._counts["opens"] += 1
            self._bus = bus
            self._set_state("up")
            if self.polling:
                self.poller = obd.ObdPoller(
                    wanted={pid: self.config.obd.period_s for pid in self.config.obd.pids},
                    extended=self.config.obd.extended_ids, timeout_s=self.config.obd.timeout_s,
                    max_misses=self.config.obd.max_misses, default_period_s=self.config.obd.period_s,
                    read_dtcs_every_s=self.config.obd.dtc_period_s)
            if self.requesting:
                j1939 = self.config.j1939
                self.requester = J1939Requester(
                    {r.pgn: r.refresh_s for r in j1939.requests}, sa=j1939.source_address, da=j1939.destination,
                    retry_s=j1939.retry_s, retry_max_s=j1939.retry_max_s)
                self.responder = CtsResponder(j1939.source_address)
                self.sampler.on_message = self._heard
            try:
                self._pump(bus, emit, stop, first)
            except (can.CanError, OSError, ValueError) as exc:
                self._failed("lost", exc)
            finally:
                try:
                    bus.shutdown()
                except (can.CanError, OSError):
                    pass  # the device is already gone
            if not stop.is_set():
                stop.wait(cfg.reopen_interval_s)
        self._emit(emit, self.sampler.tick(self.clock.wall()))
        self._set_state("closed")

    def _failed(self, what: str, exc: Exception) -> None:
        self._counts["failures"] += 1
        if self.state != "down":
            log.warning("%s: bus %s (%s): %s; retrying every %.1f s", self.name, what, self.bus_config.channel,
                        exc, self.bus_config.reopen_interval_s)
        self._set_state("down")

    def _set_state(self, state: str) -> None:
        if state != self.state:
            if state in ("up", "bus_off") or self.state == "bus_off":
                log.info("%s: bus %s -> %s", self.name, self.state, state)
            self.state = state

    def _pump(self, bus: can.BusABC, emit: Emit, stop: threading.Event, first: can.Message | None = None) -> None:
        feed = self.sampler.feed
        counts = self._counts
        on_frame = self.on_frame
        # What the requester has to see of the bus (its PGNs' single frames, acknowledgements) and the
        # CTS responder (transport sessions, which it filters on their destination).
        watched = (self.requester.watched | {PGN_TP_CM, PGN_TP_DT}) if self.requester is not None else frozenset()
        schedulers: list[tuple[obd.ObdPoller | J1939Requester, bool]] = []
        if self.poller is not None:
            schedulers.append((self.poller, self.config.obd.extended_ids))
        if self.requester is not None:
            schedulers.append((self.requester, True))  # J1939 ids are 29-bit
        next_tick = 0.0
        timeout = 0.01 if self.polling else 0.2
        while not stop.is_set():
            out: list[Record] = []
            msg, first = (first, None) if first is not None else (bus.recv(timeout=timeout), None)
            n = 0
            while msg is not None:
                n += 1
                if on_frame is not None:
                    on_frame(msg, self.bus_config.name)
                if msg.is_error_frame:
                    self._error_frame(msg)
                elif not msg.is_remote_frame:
                    if self.state == "bus_off":
                        self._set_state("up")
                    if self.poller is not None and obd.is_response_id(msg.arbitration_id, msg.is_extended_id):
                        out += self._obd_answer(bus, msg)
                    else:
                        out += feed(msg.timestamp, msg.arbitration_id, msg.is_extended_id, bytes(msg.data))
                        if watched and msg.is_extended_id and pgn_of(msg.arbitration_id) in watched:
                            self._j1939_frame(bus, msg)
                if n >= BATCH:
                    break
                msg = bus.recv(timeout=0)
            counts["frames"] += n
            now = self.clock.wall()
            if now >= next_tick:
                out += self.sampler.tick(now)
                next_tick = now + 1.0
            for scheduler, extended in schedulers:
                self._poll(bus, scheduler, extended)
            self._emit(emit, out)

    def _error_frame(self, msg: can.Message) -> None:
        self._counts["error_frames"] += 1
        if msg.arbitration_id & CAN_ERR_BUSOFF:
            self._counts["bus_off"] += 1
            self._set_state("bus_off")
        elif msg.arbitration_id & CAN_ERR_RESTARTED:
            self._set_state("up")

    def _obd_answer(self, bus: can.BusABC, msg: can.Message) -> list[Record]:
        values, flow_control = self.poller.feed(msg.timestamp, msg.arbitration_id, bytes(msg.data))
        if flow_control is not None:
            self._send(bus, obd.request_id_for(msg.arbitration_id, msg.is_extended_id), msg.is_extended_id,
                       flow_control)
        return self.sampler.offer(obd_items(msg.timestamp, self.bus_config.name, msg.arbitration_id,
                                            msg.is_extended_id, values))

    def _j1939_frame(self, bus: can.BusABC, msg: can.Message) -> None:
        """A frame the requester or the CTS responder watches (after the sampler decoded it)."""
        can_id = msg.arbitration_id
        pgn, sa, da = pgn_of(can_id), can_id & 0xFF, (can_id >> 8) & 0xFF
        if pgn == PGN_TP_CM:
            reply = self.responder.cm(sa, da, bytes(msg.data))
        elif pgn == PGN_TP_DT:
            reply = self.responder.dt(sa, da, bytes(msg.data))
        else:
            if pgn == PGN_ACK:
                self.requester.acknowledgement(sa, da, bytes(msg.data))
            else:
                self.requester.heard(pgn, sa, self.clock.monotonic())
            return
        if reply is not None:
            self._send(bus, reply[0], True, reply[1])

    def _heard(self, pgn: int, sa: int) -> None:
        """A J1939 message the transport protocol completed (the sampler's hook)."""
        if self.requester is not None:
            self.requester.heard(pgn, sa, self.clock.monotonic())

    def _poll(self, bus: can.BusABC, scheduler: obd.ObdPoller | J1939Requester, extended: bool) -> None:
        """Send what the OBD-II poller or the J1939 requester wants sent now, if anything."""
        request = scheduler.next_request(self.clock.monotonic())
        if request is not None:
            can_id, data = request
            self._send(bus, can_id, extended, data)

    def _send(self, bus: can.BusABC, can_id: int, extended: bool, data: bytes) -> None:
        bus.send(can.Message(arbitration_id=can_id, is_extended_id=extended, data=data), timeout=0.1)
        self._counts["sent"] += 1

    def _emit(self, emit: Emit, records: list[Record]) -> None:
        self._counts["records"] += len(records)
        for record in records:
            emit(record)
