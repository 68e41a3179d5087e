"""Frames in, decoded items out: J1939 signals (by PGN), TP-reassembled messages, DM1 sets, the VIN,
and OBD-II answers. Pure: the caller passes each frame's time; no clocks, threads or I/O.

:class:`FrameDecoder` is what ``decode-can`` prints and what the live sampler asks when a frame is
not a plain single-frame J1939 message. Each :class:`Decoded` has the keys of a ``decode-can`` line.
"""

from __future__ import annotations

from typing import NamedTuple

from agent.decode import obd
from agent.decode.dtc import DtcSet, dm1_set
from agent.decode.j1939 import J1939Database, MessageLayout, make_id, split_id
from agent.decode.j1939_tp import PGN_TP_CM, PGN_TP_DT, TransportReassembler

# J1939-73 DM1 active trouble codes; J1939-71 PGN 65260 vehicle identification (SPN 237, ASCII, "*"-terminated).
PGN_DM1 = 0xFECA
PGN_VI = 0xFEEC


class Decoded(NamedTuple):
    """One decoded item. ``kind`` is "signal", "dtcs", "vin" or "message" (a reassembled TP message)."""

    time: float | None
    bus: str | None
    id: int
    extended: bool
    pgn: int | None
    sa: int | None
    pid: int | None
    name: str
    value: object
    unit: str | None
    kind: str = "signal"


def vin_of(data: bytes) -> str:
    """The VIN of a PGN 65260 payload: the letters and digits before the "*" delimiter (J1939-71 SPN 237).

    Some ECUs send no delimiter and pad with other bytes: the VIN ends at the first byte that is
    not an ASCII letter or digit.
    """
    text = data.split(b"*", 1)[0]
    end = next((i for i, b in enumerate(text) if not (48 <= b <= 57 or 65 <= b <= 90 or 97 <= b <= 122)), len(text))
    return text[:end].decode("ascii")


class FrameDecoder:
    """Decodes every frame it is fed, for one or more buses (state is kept per bus).

    ``obd_answers`` decodes OBD-II answer ids (7E8-7EF, 18DAF1xx); J1939 PGNs come from ``db``.
    """

    def __init__(self, db: J1939Database, obd_answers: bool = True) -> None:
        self.db = db
        self.obd_answers = obd_answers
        self._tp: dict[str | None, TransportReassembler] = {}
        self._isotp: dict[str | None, obd.IsoTpReassembler] = {}
        self.frames = 0
        self.error_frames = 0

    def tp(self, bus: str | None) -> TransportReassembler:
        """The TP reassembler of ``bus`` (created on first use)."""
        reassembler = self._tp.get(bus)
        if reassembler is None:
            reassembler = self._tp[bus] = TransportReassembler()
        return reassembler

    def feed(self, t: float | None, bus: str | None, can_id: int, extended: bool, data: bytes,
             error: bool = False) -> list[Decoded]:
        """The items one frame yields (often none)."""
        self.frames += 1
        if error:
            self.error_frames += 1
            return []
        clock = 0.0 if t is None else t
        if extended:
            if self.obd_answers and obd.is_response_id(can_id, True):
                return self._obd(t, clock, bus, can_id, True, data)
            return self._j1939(t, clock, bus, can_id, data)
        if self.obd_answers and obd.is_response_id(can_id, False):
            return self._obd(t, clock, bus, can_id, False, data)
        layout = self.db.standard.get(can_id)
        if layout is None:
            return []
        return self._signals(t, bus, can_id, False, None, None, layout, data)

    def feed_reassembled(self, t: float | None, bus: str | None, pgn: int, sa: int, data: bytes) -> list[Decoded]:
        """A message some other tool already reassembled (Vector ASC ``J1939TP`` lines)."""
        return self._message(t, bus, make_id(pgn, sa), pgn, sa, data)

    def _j1939(self, t, clock, bus, can_id, data) -> list[Decoded]:
        _, pgn, sa, da = split_id(can_id)
        if pgn == PGN_TP_CM:
            self.tp(bus).feed_cm(clock, sa, da, data)
            return []
        if pgn == PGN_TP_DT:
            done = self.tp(bus).feed_dt(clock, sa, da, data)
            if done is None:
                return []
            return self._message(t, bus, can_id, done.pgn, sa, done.data)
        if pgn == PGN_DM1:
            return [self._dm1(t, bus, can_id, sa, data)]
        layout = self.db.by_pgn.get(pgn)
        if layout is None:
            return []
        return self._signals(t, bus, can_id, True, pgn, sa, layout, data)

    def _message(self, t, bus, can_id, pgn, sa, data) -> list[Decoded]:
        """A reassembled message: one line for the message itself, then what it decodes to."""
        if pgn == PGN_DM1:
            return [self._dm1(t, bus, can_id, sa, data)]
        if pgn == PGN_VI:
            return [Decoded(t, bus, can_id, True, pgn, sa, None, "VIN", vin_of(data), None, "vin")]
        layout = self.db.by_pgn.get(pgn)
        name = layout.name if layout else f"PGN{pgn:05X}"
        out = [Decoded(t, bus, can_id, True, pgn, sa, None, name, data.hex().upper(), None, "message")]
        if layout is not None:
            out += self._signals(t, bus, can_id, True, pgn, sa, layout, data)
        return out

    def _dm1(self, t, bus, can_id, sa, data) -> Decoded:
        dtcs: DtcSet = dm1_set(bus, sa, data)
        return Decoded(t, bus, can_id, True, PGN_DM1, sa, None, "DM1", dtcs, None, "dtcs")

    @staticmethod
    def _signals(t, bus, can_id, extended, pgn, sa, layout: MessageLayout, data) -> list[Decoded]:
        return [Decoded(t, bus, can_id, extended, pgn, sa, None, sig.name, value, sig.unit)
                for sig, value in layout.decode(data)]

    def _obd(self, t, clock, bus, can_id, extended, data) -> list[Decoded]:
        isotp = self._isotp.get(bus)
        if isotp is None:
            isotp = self._isotp[bus] = obd.IsoTpReassembler()
        payload = isotp.feed(clock, can_id, data)
        if payload is None:
            return []
        return obd_items(t, bus, can_id, extended, obd.decode_answer(payload))

    def expire(self, now: float) -> None:
        """Time out TP sessions and ISO-TP messages that went quiet before ``now``."""
        for reassembler in self._tp.values():
            reassembler.expire(now)
        for isotp in self._isotp.values():
            isotp.expire(now)


def obd_items(t: float | None, bus: str | None, can_id: int, extended: bool, values: list[obd.ObdValue]) -> list[Decoded]:
    """Decoded items of one OBD-II answer from ``can_id`` (the passive decoder's and the poller's)."""
    out = []
    for item in values:
        if item.service == obd.SERVICE_DTCS:
            value: object = DtcSet("obd2", bus, obd.ecu_of(can_id, extended), tuple(item.value))
            kind = "dtcs"
        else:
            value = item.value
            kind = "vin" if item.name == "VIN" else "signal"
        out.append(Decoded(t, bus, can_id, extended, None, None, item.pid, item.name, value, item.unit, kind))
    return out
