"""What the edge processors read from CAN signals and ignition status, whatever bus they came from.

J1939 signals carry the project DBC's names (agent/data/j1939.dbc), OBD-II ones the PID table's
names (agent/decode/obd.py); both are listed so a van and a truck feed the same logic.
"""

from __future__ import annotations

from agent.record import Record, Signal, Status

ENGINE_SPEED_RPM = frozenset({"EngineSpeed", "EngineRPM", "engine_speed_rpm"})  # J1939-71 SPN 190; OBD PID 0x0C
WHEEL_SPEED_KMH = frozenset({"WheelBasedVehicleSpeed", "VehicleSpeed", "wheel_speed_kmh"})  # SPN 84; PID 0x0D
FUEL_RATE_LPH = frozenset({"EngineFuelRate", "fuel_rate_lph"})  # SPN 183; PID 0x5E

# A fuel rate is used for this long after its last sample, no longer (the CAN sampler's default
# for the fuel rate is a 10 s mean): beyond that the rate is unknown and nothing is counted.
MAX_RATE_AGE_S = 30.0


def signal_value(record: Record, names: frozenset[str]) -> float | None:
    """The value of a signal record named one of ``names``; None for anything else or not-available."""
    data = record.data
    if isinstance(data, Signal) and data.name in names:
        return data.value
    return None


def ignition(record: Record) -> bool | None:
    """True / False for an ignition status record, None for any other record."""
    data = record.data
    if isinstance(data, Status) and data.type == "ignition":
        return bool(data.attrs.get("on"))
    return None


class FuelMeter:
    """Integrates a fuel rate signal (L/h) over record time into litres."""

    def __init__(self) -> None:
        self.rate_lph: float | None = None
        self._sampled: float | None = None  # utc of the rate's last sample
        self._at: float | None = None  # utc integrated up to
        self.seen = False

    def update(self, utc: float, record: Record) -> float:
        """Litres used since the previous record (0 without a fresh rate); call for every record."""
        used = 0.0
        if self.rate_lph is not None and self._at is not None and self._sampled is not None:
            until = min(utc, self._sampled + MAX_RATE_AGE_S)
            if until > self._at:
                used = self.rate_lph * (until - self._at) / 3600.0
        if self._at is None or utc > self._at:
            self._at = utc
        data = record.data
        if isinstance(data, Signal) and data.name in FUEL_RATE_LPH:
            self.rate_lph = data.value
            self._sampled = utc
            self.seen = self.seen or data.value is not None
        return used
