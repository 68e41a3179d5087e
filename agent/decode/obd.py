"""OBD-II on CAN (ISO 15765-4): ids, ISO-TP framing, service 01/03/09 answers and a polling schedule.

Formulas are SAE J1979 / J1979-DA (A, B, C, D are the data bytes after the PID). Everything here
is pure: :class:`IsoTpReassembler` reassembles answers passively (for logs and for the poller),
:class:`ObdPoller` decides what to send and when, on a clock the caller passes in.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

from agent.decode.dtc import parse_obd_dtcs

log = logging.getLogger(__name__)

# ISO 15765-4 §6.3: 11-bit functional request 7DF, physical requests 7E0-7E7, answers 7E8-7EF;
# 29-bit functional 18DB33F1, physical 18DA<ecu>F1, answers 18DAF1<ecu>.
FUNCTIONAL_11 = 0x7DF
FUNCTIONAL_29 = 0x18DB33F1
TESTER = 0xF1
# ISO 15765-2 protocol control information (high nibble of byte 0).
SINGLE, FIRST, CONSECUTIVE = 0, 1, 2
# ISO 15765-2 caps an unsegmented-length first frame at 4095 bytes.
MAX_MESSAGE = 4095
# ISO 15765-2 N_Cr: a receiver gives up 1000 ms after the last consecutive frame.
N_CR_S = 1.0
# SAE J1979: the positive response to service s is s + 0x40; 0x7F is a negative response.
POSITIVE = 0x40
NEGATIVE = 0x7F
SERVICE_CURRENT = 0x01
SERVICE_DTCS = 0x03
SERVICE_VEHICLE_INFO = 0x09
VIN_PID = 0x02
# Service 01 PIDs 00, 20, 40, ... report which of the next 32 PIDs the ECU supports (J1979-DA).
SUPPORT_PIDS = tuple(range(0x00, 0x100, 0x20))


def is_response_id(can_id: int, extended: bool) -> bool:
    """True for an ECU's answer id: 7E8-7EF, or 18DAF1xx on 29-bit."""
    if extended:
        return (can_id & 0x1FFFFF00) == 0x18DAF100
    return 0x7E8 <= can_id <= 0x7EF


def request_id_for(response_id: int, extended: bool) -> int:
    """The physical request id of the ECU answering on ``response_id`` (7E8 -> 7E0, 18DAF110 -> 18DA10F1)."""
    if extended:
        return 0x18DA0000 | ((response_id & 0xFF) << 8) | TESTER
    return response_id - 8


def ecu_of(can_id: int, extended: bool) -> int:
    """The ECU number: 0-7 for 7E8-7EF, the source address for 29-bit answers."""
    return can_id & 0xFF if extended else can_id - 0x7E8


class Pid(NamedTuple):
    """One decoded quantity of a service 01 PID."""

    name: str
    unit: str | None
    decode: Callable[[bytes], float]
    length: int  # data bytes the formula needs


def _u16(d: bytes) -> int:
    return (d[0] << 8) | d[1]


def _pct(d: bytes) -> float:
    return round(d[0] * 100 / 255, 2)


def _trim(d: bytes) -> float:
    return round((d[0] - 128) * 100 / 128, 2)


def _temp(d: bytes) -> float:
    return float(d[0] - 40)


# SAE J1979-DA service 01 formulas for what fleets read; several PIDs carry more than one quantity.
PIDS: dict[int, tuple[Pid, ...]] = {
    0x01: (Pid("MilOn", None, lambda d: float(d[0] >> 7), 1), Pid("DtcCount", None, lambda d: float(d[0] & 0x7F), 1)),
    0x03: (Pid("FuelSystemStatus", None, lambda d: float(d[0]), 1),),
    0x04: (Pid("CalcEngineLoad", "%", _pct, 1),),
    0x05: (Pid("EngineCoolantTemp", "degC", _temp, 1),),
    0x06: (Pid("ShortFuelTrimBank1", "%", _trim, 1),),
    0x07: (Pid("LongFuelTrimBank1", "%", _trim, 1),),
    0x08: (Pid("ShortFuelTrimBank2", "%", _trim, 1),),
    0x09: (Pid("LongFuelTrimBank2", "%", _trim, 1),),
    0x0A: (Pid("FuelPressure", "kPa", lambda d: float(3 * d[0]), 1),),
    0x0B: (Pid("IntakeManifoldAbsPressure", "kPa", lambda d: float(d[0]), 1),),
    0x0C: (Pid("EngineRPM", "rpm", lambda d: _u16(d) / 4, 2),),
    0x0D: (Pid("VehicleSpeed", "km/h", lambda d: float(d[0]), 1),),
    0x0E: (Pid("TimingAdvance", "deg", lambda d: d[0] / 2 - 64, 1),),
    0x0F: (Pid("IntakeAirTemperature", "degC", _temp, 1),),
    0x10: (Pid("MAFAirFlowRate", "g/s", lambda d: _u16(d) / 100, 2),),
    0x11: (Pid("ThrottlePosition", "%", _pct, 1),),
    0x13: (Pid("OxygenSensorsPresent", None, lambda d: float(d[0]), 1),),
    **{pid: (Pid(f"OxygenSensor{pid - 0x13}Voltage", "V", lambda d: d[0] / 200, 1),) for pid in range(0x14, 0x1C)},
    0x1C: (Pid("OBDStandard", None, lambda d: float(d[0]), 1),),
    0x1F: (Pid("TimeSinceEngineStart", "s", lambda d: float(_u16(d)), 2),),
    0x21: (Pid("DistanceWithMILOn", "km", lambda d: float(_u16(d)), 2),),
    0x2E: (Pid("CommandedEvapPurge", "%", _pct, 1),),
    0x2F: (Pid("FuelTankLevel", "%", _pct, 1),),
    0x30: (Pid("WarmUpsSinceCodesCleared", None, lambda d: float(d[0]), 1),),
    0x31: (Pid("DistanceSinceCodesCleared", "km", lambda d: float(_u16(d)), 2),),
    0x33: (Pid("AbsBarometricPressure", "kPa", lambda d: float(d[0]), 1),),
    **{pid: (Pid(f"OxygenSensor{pid - 0x33}EquivalenceRatio", None, lambda d: round(_u16(d) * 2 / 65536, 5), 4),
             Pid(f"OxygenSensor{pid - 0x33}Current", "mA", lambda d: round(_u16(d[2:]) / 256 - 128, 4), 4))
       for pid in range(0x34, 0x3C)},
    **{pid: (Pid(f"CatalystTempBank{1 + (pid - 0x3C) % 2}Sensor{1 + (pid - 0x3C) // 2}", "degC",
                 lambda d: round(_u16(d) / 10 - 40, 1), 2),) for pid in range(0x3C, 0x40)},
    0x42: (Pid("ControlModuleVoltage", "V", lambda d: _u16(d) / 1000, 2),),
    0x43: (Pid("AbsLoadValue", "%", lambda d: round(_u16(d) * 100 / 255, 2), 2),),
    0x44: (Pid("CommandedEquivalenceRatio", None, lambda d: round(_u16(d) * 2 / 65536, 5), 2),),
    0x45: (Pid("RelativeThrottlePosition", "%", _pct, 1),),
    0x46: (Pid("AmbientAirTemp", "degC", _temp, 1),),
    0x47: (Pid("AbsThrottlePositionB", "%", _pct, 1),),
    0x49: (Pid("AcceleratorPedalPositionD", "%", _pct, 1),),
    0x4A: (Pid("AcceleratorPedalPositionE", "%", _pct, 1),),
    0x4C: (Pid("CommandedThrottleActuator", "%", _pct, 1),),
    0x4D: (Pid("TimeRunWithMILOn", "min", lambda d: float(_u16(d)), 2),),
    0x4E: (Pid("TimeSinceCodesCleared", "min", lambda d: float(_u16(d)), 2),),
    0x51: (Pid("FuelType", None, lambda d: float(d[0]), 1),),
    0x53: (Pid("AbsEvapSystemVaporPressure", "kPa", lambda d: _u16(d) / 200, 2),),
    0x5A: (Pid("RelativeAcceleratorPedalPosition", "%", _pct, 1),),
    0x5C: (Pid("EngineOilTemp", "degC", _temp, 1),),
    0x5E: (Pid("EngineFuelRate", "L/h", lambda d: _u16(d) / 20, 2),),
    0x61: (Pid("DriverDemandEngineTorque", "%", lambda d: float(d[0] - 125), 1),),
    0x62: (Pid("ActualEngineTorque", "%", lambda d: float(d[0] - 125), 1),),
    0x63: (Pid("EngineReferenceTorque", "Nm", lambda d: float(_u16(d)), 2),),
    # J1979-DA PID A4: byte A bit 1 says the ratio is supported; B bits 7-4 the actual gear.
    0xA4: (Pid("TransmissionActualGear", None, lambda d: float(d[1] >> 4), 4),
           Pid("TransmissionGearRatio", None, lambda d: _u16(d[2:]) / 1000 if d[0] & 0x02 else None, 4)),
    0xA6: (Pid("Odometer", "km", lambda d: int.from_bytes(d[:4], "big") / 10, 4),),
}


class ObdValue(NamedTuple):
    """One decoded quantity of an answer; ``value`` None when the formula says not supported."""

    service: int
    pid: int | None
    name: str
    value: object  # float for service 01, list of codes for 03, str for the VIN
    unit: str | None = None


def decode_answer(payload: bytes) -> list[ObdValue]:
    """The quantities in one reassembled answer (service byte first); [] for what we do not decode."""
    if not payload:
        return []
    service = payload[0]
    if service == POSITIVE | SERVICE_CURRENT and len(payload) >= 2:
        out = []
        # A CAN answer may carry several PIDs back to back when several were requested (J1979 §5).
        i = 1
        while i < len(payload):
            pid = payload[i]
            if pid in SUPPORT_PIDS:
                i += 5
                continue
            entries = PIDS.get(pid)
            if entries is None:
                break
            need = entries[0].length
            data = payload[i + 1 : i + 1 + need]
            if len(data) < need:
                break
            out.extend(ObdValue(SERVICE_CURRENT, pid, e.name, e.decode(data), e.unit) for e in entries)
            i += 1 + need
        return out
    if service == POSITIVE | SERVICE_DTCS:
        return [ObdValue(SERVICE_DTCS, None, "DTC", parse_obd_dtcs(payload[1:]))]
    if service == POSITIVE | SERVICE_VEHICLE_INFO and len(payload) >= 3 and payload[1] == VIN_PID:
        # J1979 service 09 PID 02: one data item (count byte) of 17 ASCII characters.
        vin = payload[3:].decode("ascii", "replace").strip("\x00 ")
        return [ObdValue(SERVICE_VEHICLE_INFO, VIN_PID, "VIN", vin)]
    return []


def supported_pids(payload: bytes) -> set[int]:
    """The PIDs a service 01 support answer (PID 00, 20, 40, ...) announces."""
    if len(payload) < 6 or payload[0] != POSITIVE | SERVICE_CURRENT or payload[1] not in SUPPORT_PIDS:
        return set()
    base = payload[1]
    bits = int.from_bytes(payload[2:6], "big")
    return {base + n for n in range(1, 33) if bits & (1 << (32 - n))}


@dataclass
class _Pending:
    size: int
    data: bytearray
    next_seq: int
    deadline: float


class IsoTpReassembler:
    """Passive ISO 15765-2 receive side, one message at a time per arbitration id."""

    def __init__(self) -> None:
        self._pending: dict[int, _Pending] = {}
        self.dropped = 0

    @property
    def open_messages(self) -> int:
        return len(self._pending)

    def feed(self, t: float, can_id: int, data: bytes) -> bytes | None:
        """One frame; returns the message payload when complete. Flow-control frames return None."""
        if not data:
            return None
        pci = data[0] >> 4
        if pci == SINGLE:
            length = data[0] & 0x0F
            self._abandon(can_id)
            if 1 <= length <= len(data) - 1:
                return bytes(data[1 : 1 + length])
            return None
        if pci == FIRST and len(data) >= 2:
            self._abandon(can_id)
            size = ((data[0] & 0x0F) << 8) | data[1]
            if size < 8 or size > MAX_MESSAGE:
                self.dropped += 1
                return None
            self._pending[can_id] = _Pending(size, bytearray(data[2:8]), 1, t + N_CR_S)
            return None
        if pci == CONSECUTIVE:
            pending = self._pending.get(can_id)
            if pending is None:
                return None
            if (data[0] & 0x0F) != pending.next_seq or t > pending.deadline:
                self._abandon(can_id)
                return None
            pending.data += data[1:8]
            pending.next_seq = (pending.next_seq + 1) & 0x0F
            pending.deadline = t + N_CR_S
            if len(pending.data) >= pending.size:
                del self._pending[can_id]
                return bytes(pending.data[: pending.size])
        return None

    def needs_flow_control(self, can_id: int) -> bool:
        """True right after a first frame from ``can_id``: the receiver must answer with flow control."""
        pending = self._pending.get(can_id)
        return pending is not None and pending.next_seq == 1 and len(pending.data) == 6

    def expire(self, now: float) -> None:
        """Forget messages whose next frame is overdue."""
        for can_id in [k for k, p in self._pending.items() if p.deadline < now]:
            self._abandon(can_id)

    def _abandon(self, can_id: int) -> None:
        if self._pending.pop(can_id, None) is not None:
            self.dropped += 1


def single_frame(payload: bytes, pad: int = 0x55) -> bytes:
    """An ISO-TP single frame of up to 7 bytes, padded to 8 (ISO 15765-4 requires DLC 8)."""
    return bytes([len(payload)]) + payload + bytes([pad]) * (7 - len(payload))


# ISO 15765-2 flow control: continue to send, no block limit, no separation time.
FLOW_CONTINUE = bytes([0x30, 0x00, 0x00]) + bytes(5)


@dataclass
class _PidState:
    next_due: float = 0.0
    misses: int = 0


@dataclass
class ObdPoller:
    """Which request to send next, and when; feed it every answer frame.

    Starts with supported-PID discovery (service 01 PIDs 00, 20, ...), then polls the wanted PIDs the
    ECU announced, each every ``period_s``; reads the VIN (service 09) and stored codes (service 03)
    once. A request unanswered within ``timeout_s`` counts a miss; ``max_misses`` in a row drop the
    PID from the schedule. Only one request is outstanding at a time (J1979 §5: the tester waits).
    """

    wanted: dict[int, float]  # PID -> period in seconds; empty means every decodable supported PID
    extended: bool = False
    timeout_s: float = 0.1  # ISO 15765-4 P2CAN is 50 ms; twice that for slow gateways
    max_misses: int = 3
    default_period_s: float = 1.0
    read_vin: bool = True
    read_dtcs_every_s: float = 60.0
    _iso: IsoTpReassembler = field(default_factory=IsoTpReassembler)
    _discover: list[int] = field(default_factory=lambda: [0x00])
    _supported: set[int] = field(default_factory=set)
    _schedule: dict[int, _PidState] = field(default_factory=dict)
    _outstanding: tuple[int, int | None, float] | None = None  # (service, pid, deadline)
    _vin_done: bool = False
    _dtcs_due: float = 0.0
    dropped_pids: set[int] = field(default_factory=set)

    @property
    def request_id(self) -> int:
        return FUNCTIONAL_29 if self.extended else FUNCTIONAL_11

    @property
    def schedule(self) -> set[int]:
        return set(self._schedule)

    def next_request(self, now: float) -> tuple[int, bytes] | None:
        """The (id, data) to send now, if any; call it often (every few ms)."""
        if self._outstanding is not None:
            service, pid, deadline = self._outstanding
            if now < deadline:
                return None
            self._miss(service, pid)
        request = self._choose(now)
        if request is None:
            return None
        service, pid = request
        self._outstanding = (service, pid, now + self.timeout_s)
        body = bytes([service]) if pid is None else bytes([service, pid])
        return self.request_id, single_frame(body)

    def _choose(self, now: float) -> tuple[int, int | None] | None:
        if self._discover:
            return SERVICE_CURRENT, self._discover[0]
        if self.read_vin and not self._vin_done:
            return SERVICE_VEHICLE_INFO, VIN_PID
        if now >= self._dtcs_due:
            self._dtcs_due = now + self.read_dtcs_every_s
            return SERVICE_DTCS, None
        due = [(state.next_due, pid) for pid, state in self._schedule.items() if state.next_due <= now]
        if not due:
            return None
        _, pid = min(due)
        state = self._schedule[pid]
        state.next_due = max(state.next_due + self._period(pid), now)
        return SERVICE_CURRENT, pid

    def _period(self, pid: int) -> float:
        return self.wanted.get(pid, self.default_period_s)

    def _miss(self, service: int, pid: int | None) -> None:
        self._outstanding = None
        if service == SERVICE_CURRENT and pid in SUPPORT_PIDS and self._discover and self._discover[0] == pid:
            self._finish_discovery()
        elif service == SERVICE_VEHICLE_INFO:
            self._vin_done = True  # not every vehicle answers service 09; do not keep asking
        elif service == SERVICE_CURRENT and pid in self._schedule:
            state = self._schedule[pid]
            state.misses += 1
            if state.misses >= self.max_misses:
                del self._schedule[pid]
                self.dropped_pids.add(pid)
                log.info("OBD-II PID %02X unanswered %d times: dropped from the schedule", pid, state.misses)

    def _finish_discovery(self) -> None:
        self._discover = []
        candidates = set(self.wanted) if self.wanted else set(PIDS)
        for pid in sorted(candidates & self._supported):
            self._schedule[pid] = _PidState()
        log.info("OBD-II supported PIDs: %s; polling %s", _hex(self._supported), _hex(set(self._schedule)))

    def feed(self, t: float, can_id: int, data: bytes) -> tuple[list[ObdValue], bytes | None]:
        """An answer frame: the decoded quantities when it completes a message, and a flow-control
        frame to send to the ECU's physical request id when it starts a multi-frame answer."""
        payload = self._iso.feed(t, can_id, data)
        if payload is None:
            return [], (FLOW_CONTINUE if self._iso.needs_flow_control(can_id) else None)
        self._answered(payload)
        return decode_answer(payload), None

    def _answered(self, payload: bytes) -> None:
        if self._outstanding is None:
            return
        service, pid, _ = self._outstanding
        if payload[0] == NEGATIVE:
            if len(payload) >= 2 and payload[1] == service:
                self._miss(service, pid)
            return
        if payload[0] != service | POSITIVE:
            return
        if len(payload) >= 2 and pid is not None and payload[1] != pid:
            return
        self._outstanding = None
        if service == SERVICE_CURRENT and pid in SUPPORT_PIDS and self._discover:
            announced = supported_pids(payload)
            self._supported |= announced
            self._discover.pop(0)
            following = pid + 0x20
            # J1979-DA: the last bit of each support PID says whether the next range exists.
            if following in announced and following in SUPPORT_PIDS:
                self._discover.append(following)
            else:
                self._finish_discovery()
        elif service == SERVICE_VEHICLE_INFO:
            self._vin_done = True
        elif pid in self._schedule:
            self._schedule[pid].misses = 0


def _hex(pids: set[int]) -> str:
    return " ".join(f"{p:02X}" for p in sorted(pids)) or "none"
