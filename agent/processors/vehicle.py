"""What the edge processors read from CAN signals and ignition status, whatever bus they came from.

J1939 signals carry the project DBC's names (agent/data/j1939.dbc), OBD-II ones the PID table's
names (agent/decode/obd.py); both are listed so a van and a truck feed the same logic.
"""

from __future__ import annotations

from agent.record import Record, Signal, Status

ENGINE_SPEED_RPM = frozenset({"EngineSpeed", "EngineRPM", "engine_speed_rpm"})  # J1939-71 SPN 190; OBD PID 0x0C
WHEEL_SPEED_KMH = frozenset({"WheelBasedVehicleSpeed", "VehicleSpeed", "wheel_speed_kmh"})  # SPN 84; PID 0x0D
FUEL_RATE_LPH = frozenset({"EngineFuelRate", "fuel_rate_lph"})  # SPN 183; PID 0x5E

# A gap in a signal longer than this is not integrated over (fuel used): the value is unknown there.
MAX_INTEGRATION_GAP_S = 5.0


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
        self._at: float | None = None
        self.seen = False

    def update(self, utc: float, record: Record) -> float:
        """Litres used since the previous record (0 without a known rate); call for every record."""
        used = 0.0
        if self.rate_lph is not None and self._at is not None and 0 < utc - self._at <= MAX_INTEGRATION_GAP_S:
            used = self.rate_lph * (utc - self._at) / 3600.0
        if self._at is None or utc >= self._at:
            self._at = utc
        data = record.data
        if isinstance(data, Signal) and data.name in FUEL_RATE_LPH:
            self.rate_lph = data.value
            self.seen = self.seen or data.value is not None
        return used
