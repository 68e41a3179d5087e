"""Diagnostic trouble code sets: J1939 DM1 (J1939-73 §5.7.1) and OBD-II service 03 (SAE J1979).

A :class:`DtcSet` is what one ECU reports as active now. It travels in a ``Status`` record of type
``"dm1"`` (J1939) or ``"obd_dtcs"`` (OBD-II) whose attrs are :meth:`DtcSet.to_attrs`, and
:meth:`DtcSet.from_attrs` reads it back, so whoever derives ``dtc_on`` / ``dtc_off`` events compares
two sets with :meth:`DtcSet.codes` and never parses bytes.
"""

from __future__ import annotations

from typing import NamedTuple, Union

# The scalar attribute values a Status record carries (agent.record.Scalar; decode imports nothing of the project).
Scalar = Union[str, int, float, bool, None]

# J1939-73 §5.7.1.1: two-bit lamp states.
LAMP_STATES = {0: "off", 1: "on", 2: "error", 3: "not_available"}
LAMPS = ("mil", "red_stop", "amber_warning", "protect")
# SAE J2012 first character of an OBD-II code from the top two bits.
OBD_SYSTEMS = "PCBU"


class J1939Dtc(NamedTuple):
    """One J1939 trouble code: suspect parameter number, failure mode identifier, occurrence count."""

    spn: int
    fmi: int
    oc: int

    @property
    def code(self) -> str:
        """``"SPN-FMI"``, e.g. ``"190-2"``: what identifies the fault (the count is not part of it)."""
        return f"{self.spn}-{self.fmi}"


class DtcSet(NamedTuple):
    """The active codes of one ECU. ``protocol`` is "j1939" or "obd2"; ``ecu`` the source address
    (J1939) or response id (OBD-II); ``lamps`` maps lamp name to state (J1939 only)."""

    protocol: str
    bus: str | None
    ecu: int
    codes: tuple[str, ...]
    counts: tuple[int, ...] = ()
    lamps: dict[str, str] = {}

    def to_attrs(self) -> dict[str, Scalar]:
        """Scalar attrs for a Status record: codes joined by spaces, lamps as ``lamp_<name>``."""
        attrs: dict[str, Scalar] = {"protocol": self.protocol, "bus": self.bus, "ecu": self.ecu,
                                    "codes": " ".join(self.codes), "count": len(self.codes)}
        if self.counts:
            attrs["occurrences"] = " ".join(str(n) for n in self.counts)
        for lamp, state in self.lamps.items():
            attrs[f"lamp_{lamp}"] = state
        return attrs

    @classmethod
    def from_attrs(cls, attrs: dict[str, Scalar]) -> "DtcSet":
        """Inverse of :meth:`to_attrs`."""
        codes = tuple(str(attrs.get("codes") or "").split())
        counts = tuple(int(n) for n in str(attrs.get("occurrences") or "").split())
        lamps = {k[5:]: str(v) for k, v in attrs.items() if k.startswith("lamp_")}
        bus = attrs.get("bus")
        return cls(str(attrs["protocol"]), None if bus is None else str(bus), int(attrs["ecu"]), codes, counts, lamps)

    def to_json(self) -> dict:
        """The ``value`` of a decode-can line."""
        out: dict = {"codes": list(self.codes)}
        if self.counts:
            out["occurrences"] = list(self.counts)
        if self.lamps:
            out["lamps"] = dict(self.lamps)
        return out


def parse_dm1(data: bytes) -> tuple[dict[str, str], list[J1939Dtc]]:
    """Lamps and active codes of a DM1 (PGN 65226) payload, single-frame or reassembled.

    J1939-73 §5.7.1: byte 1 lamp status (MIL bits 8-7, red stop 6-5, amber 4-3, protect 2-1),
    byte 2 flash states, then 4 bytes per code: SPN low 16 bits, SPN high 3 bits | FMI 5 bits,
    conversion method bit | occurrence count 7 bits. "No active codes" is sent as SPN 0 FMI 0;
    all-ones padding marks unused slots. Short or ragged payloads yield what is complete.
    """
    if len(data) < 2:
        return {}, []
    lamp_byte = data[0]
    lamps = {
        "mil": LAMP_STATES[(lamp_byte >> 6) & 3],
        "red_stop": LAMP_STATES[(lamp_byte >> 4) & 3],
        "amber_warning": LAMP_STATES[(lamp_byte >> 2) & 3],
        "protect": LAMP_STATES[lamp_byte & 3],
    }
    codes: list[J1939Dtc] = []
    for i in range(2, len(data) - 3, 4):
        b = data[i : i + 4]
        spn = b[0] | (b[1] << 8) | ((b[2] >> 5) << 16)
        fmi = b[2] & 0x1F
        if spn == 0 or spn == 0x7FFFF:
            continue
        codes.append(J1939Dtc(spn, fmi, b[3] & 0x7F))
    return lamps, codes


def dm1_set(bus: str | None, sa: int, data: bytes) -> DtcSet:
    """A :class:`DtcSet` from a DM1 payload sent by ``sa``."""
    lamps, codes = parse_dm1(data)
    return DtcSet("j1939", bus, sa, tuple(c.code for c in codes), tuple(c.oc for c in codes), lamps)


def obd_code(hi: int, lo: int) -> str:
    """The SAE J2012 five-character code of a two-byte OBD-II DTC, e.g. 0x01 0x33 -> ``P0133``."""
    return f"{OBD_SYSTEMS[hi >> 6]}{(hi >> 4) & 3}{hi & 0xF:X}{lo:02X}"


def parse_obd_dtcs(payload: bytes) -> list[str]:
    """Codes of a service 03/07/0A response after its 0x43/0x47/0x4A byte.

    On CAN (ISO 15765-4) the first byte is the number of codes, then two bytes per code; a code
    0x0000 is padding.
    """
    if not payload:
        return []
    count = payload[0]
    body = payload[1 : 1 + 2 * count]
    return [obd_code(body[i], body[i + 1]) for i in range(0, len(body) - 1, 2) if body[i] or body[i + 1]]
