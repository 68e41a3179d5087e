"""SAE J1939 identifiers and DBC-driven signal decoding, matched on the PGN whatever the source address.

Pure functions and tables: bytes in, values out. The identifier split follows J1939-21 §5.1.2
(29-bit id = priority 3 bits | EDP 1 | DP 1 | PDU format 8 | PDU specific 8 | source address 8);
not-available and error ranges follow J1939-71 §5.1.4 and are reported as None, never as a value.

Signals are extracted with a shift and a mask on the frame read as one little-endian integer,
which is what J1939's Intel byte order means; cantools does the work only for layouts that are
not plain little-endian integers (big-endian or IEEE floats), so a frame costs about a microsecond.
"""

from __future__ import annotations

import decimal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, NamedTuple

import cantools
import cantools.database

# J1939-21 §5.1.2: PDU formats below 240 are PDU1 (PS is a destination address, not part of the PGN).
PDU2_MIN_PF = 240
GLOBAL_ADDRESS = 0xFF
# cantools matches a DBC frame id on the PGN bits only (EDP, DP, PF, PS), whatever priority and SA.
J1939_FRAME_ID_MASK = 0x03FFFF00

PACKAGED_DBC = Path(__file__).resolve().parent.parent / "data" / "j1939.dbc"


class DbcError(ValueError):
    """A DBC file cannot be read or parsed; the message names the file."""


class J1939Id(NamedTuple):
    """The fields of a 29-bit J1939 identifier; ``da`` is 0xFF (global) for PDU2 PGNs."""

    priority: int
    pgn: int
    sa: int
    da: int


def split_id(can_id: int) -> J1939Id:
    """Split a 29-bit identifier into priority, PGN, source and destination address (J1939-21 §5.1.2)."""
    priority = (can_id >> 26) & 0x7
    pf = (can_id >> 16) & 0xFF
    ps = (can_id >> 8) & 0xFF
    dp = (can_id >> 24) & 0x3  # EDP and DP together: the PGN's top two bits
    if pf < PDU2_MIN_PF:
        return J1939Id(priority, (dp << 16) | (pf << 8), can_id & 0xFF, ps)
    return J1939Id(priority, (dp << 16) | (pf << 8) | ps, can_id & 0xFF, GLOBAL_ADDRESS)


def pgn_of(can_id: int) -> int:
    """The PGN of a 29-bit identifier (the hot path's half of :func:`split_id`)."""
    pf = (can_id >> 16) & 0xFF
    if pf < PDU2_MIN_PF:
        return (can_id >> 8) & 0x3FF00
    return (can_id >> 8) & 0x3FFFF


def make_id(pgn: int, sa: int, priority: int = 6, da: int = GLOBAL_ADDRESS) -> int:
    """The 29-bit identifier for ``pgn`` sent by ``sa`` (to ``da`` for PDU1 PGNs)."""
    if ((pgn >> 8) & 0xFF) < PDU2_MIN_PF:
        pgn = (pgn & 0x3FF00) | da
    return (priority << 26) | (pgn << 8) | sa


def not_available_limit(length: int) -> int | None:
    """The smallest raw value that is not a measurement, for an unsigned ``length``-bit parameter.

    J1939-71 §5.1.4: for byte-sized parameters 0xFB.. are indicators, 0xFE.. errors, 0xFF..
    not available (0xFB00 and up for 16 bits, 0xFB000000 and up for 32); for discrete 2-bit states
    0b10 is an error and 0b11 not available; 4-bit states 0b1110 / 0b1111 likewise.
    Parameters of 1 bit or of odd lengths above 8 bits use the same rule on their top byte.
    """
    if length < 2:
        return None
    if length < 8:
        return (1 << length) - 2
    return 0xFB << (length - 8)


def resolution_digits(scale: float) -> int:
    """Decimal places of a DBC scale factor (0.125 -> 3, 0.05 -> 2, 4 -> 0): the signal's resolution."""
    exponent = decimal.Decimal(repr(float(scale))).normalize().as_tuple().exponent
    return max(0, -int(exponent))


@dataclass(frozen=True)
class SignalLayout:
    """Where one signal sits in a frame and how its raw value scales (a DBC ``SG_`` line)."""

    name: str
    start: int  # Intel (little-endian) start bit
    length: int
    scale: float
    offset: float
    signed: bool
    unit: str | None
    digits: int  # decimal places of the resolution, for rounding scaled values and means
    spn: int | None = None
    shiftable: bool = True  # False for big-endian or IEEE float signals: cantools extracts those
    na_limit: int | None = None

    def scaled(self, raw: int | float) -> float | None:
        """The value in ``unit`` for a raw value; None in the not-available and error ranges."""
        if self.na_limit is not None and raw >= self.na_limit:
            return None
        return round(raw * self.scale + self.offset, self.digits)

    def value(self, payload: int) -> float | None:
        """The scaled value from the frame read as one little-endian integer (shiftable layouts only)."""
        raw = (payload >> self.start) & ((1 << self.length) - 1)
        if self.signed and raw >> (self.length - 1):
            raw -= 1 << self.length
        return self.scaled(raw)


@dataclass(frozen=True)
class MessageLayout:
    """One DBC message: its name, length and signals, keyed by PGN in :class:`J1939Database`."""

    name: str
    pgn: int
    length: int
    signals: tuple[SignalLayout, ...]
    by_name: dict[str, SignalLayout] = field(default_factory=dict, compare=False)
    cantools_message: cantools.database.can.Message | None = field(default=None, compare=False)

    def decode(self, data: bytes, wanted: Iterable[SignalLayout] | None = None) -> list[tuple[SignalLayout, float | None]]:
        """The ``wanted`` signals (default all); bytes past the end of a short frame read as 0xFF (not available)."""
        if len(data) < self.length:
            data = bytes(data).ljust(self.length, b"\xff")
        payload = int.from_bytes(data, "little")
        raw_by_cantools: dict | None = None
        out = []
        for sig in self.signals if wanted is None else wanted:
            if sig.shiftable:
                out.append((sig, sig.value(payload)))
                continue
            if raw_by_cantools is None:
                raw_by_cantools = self.cantools_message.decode(
                    bytes(data[: self.length]), decode_choices=False, scaling=False)
            out.append((sig, sig.scaled(raw_by_cantools[sig.name])))
        return out


def _layout(sig: cantools.database.can.Signal) -> SignalLayout:
    scale = float(sig.scale)
    shiftable = sig.byte_order == "little_endian" and not sig.is_float
    spn = None
    dbc_attrs = getattr(sig, "dbc", None)
    if dbc_attrs is not None and "SPN" in dbc_attrs.attributes:
        spn = int(dbc_attrs.attributes["SPN"].value)
    return SignalLayout(
        name=sig.name,
        start=sig.start,
        length=sig.length,
        scale=scale,
        offset=float(sig.offset),
        signed=sig.is_signed,
        unit=sig.unit or None,
        digits=resolution_digits(scale),
        spn=spn,
        shiftable=shiftable,
        na_limit=None if (sig.is_signed or sig.is_float) else not_available_limit(sig.length),
    )


class J1939Database:
    """DBC messages keyed by PGN: the project's own J1939 DBC plus the user's, later files winning."""

    def __init__(self) -> None:
        self.by_pgn: dict[int, MessageLayout] = {}
        self.standard: dict[int, MessageLayout] = {}  # 11-bit ids of non-J1939 DBC messages

    @classmethod
    def load(cls, paths: Iterable[str | Path] = (), include_packaged: bool = True) -> "J1939Database":
        """Load DBC files; raises OSError (with ``filename``) for a file that cannot be read and
        :class:`DbcError` naming the file for one that cannot be parsed."""
        db = cls()
        files = ([PACKAGED_DBC] if include_packaged else []) + [Path(p) for p in paths]
        for path in files:
            try:
                db.add_dbc(path)
            except OSError:
                raise
            except Exception as exc:  # cantools raises its own parse errors, and ValueError / KeyError
                raise DbcError(f"cannot parse DBC {path}: {type(exc).__name__}: {exc}") from exc
        return db

    def add_dbc(self, path: str | Path) -> None:
        """Add the messages of one DBC; extended ids are keyed by PGN, 11-bit ids by the id itself."""
        dbc = cantools.database.load_file(str(path), database_format="dbc", frame_id_mask=J1939_FRAME_ID_MASK,
                                          strict=False)
        for message in dbc.messages:
            signals = tuple(_layout(sig) for sig in message.signals if sig.multiplexer_ids is None
                            and not sig.is_multiplexer)
            if not signals:
                continue
            pgn = pgn_of(message.frame_id) if message.is_extended_frame else -1
            layout = MessageLayout(message.name, pgn, message.length, signals, {s.name: s for s in signals},
                                   message)
            if message.is_extended_frame:
                self.by_pgn[pgn] = layout
            else:
                self.standard[message.frame_id] = layout
