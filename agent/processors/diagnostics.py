"""Vehicle health events: ``dtc_on`` / ``dtc_off`` as trouble codes appear and clear, ``low_fuel``,
and ``maintenance_due`` by engine hours or odometer.

Trouble codes come as the CAN sampler's Status records ("dm1" for J1939, "obd_dtcs" for OBD-II),
one per ECU whenever its active set changes; each code that appears gives ``dtc_on``, each that
disappears ``dtc_off`` (attrs ``code``, ``protocol``, ``ecu``, ``bus``). The sets known, the low
fuel episode and the maintenance already announced survive a restart
(``<data_dir>/edge-diagnostics.json``), so a reboot does not announce active codes again.
"""

from __future__ import annotations

import logging
from pathlib import Path

from agent.config import DiagnosticsConfig
from agent.state_file import StateFile
from agent.record import Event, Fix, Record, Signal, Status

log = logging.getLogger(__name__)

DTC_STATUS_TYPES = ("dm1", "obd_dtcs")
FUEL_LEVEL_PCT = frozenset({"FuelLevel1", "FuelTankLevel"})  # J1939-71 SPN 96; OBD-II PID 0x2F
ENGINE_HOURS_H = frozenset({"EngineTotalHoursOfOperation"})  # SPN 247
# Odometer signals and their factor to km: SPN 245 (km), SPN 917 (m), OBD-II PID 0xA6 (km).
ODOMETER_TO_KM = {"TotalVehicleDistance": 1.0, "TotalVehicleDistanceHighRes": 0.001, "Odometer": 1.0}


class DiagnosticsMonitor:
    """Emits dtc_on, dtc_off, low_fuel and maintenance_due."""

    def __init__(self, config: DiagnosticsConfig, data_dir: str | Path | None) -> None:
        self.config = config
        self._state_file = StateFile(data_dir, "edge-diagnostics")
        saved = self._state_file.load()
        self._dtcs: dict[str, list[str]] = {k: list(v) for k, v in saved.get("dtcs", {}).items()}
        self._low_fuel = bool(saved.get("low_fuel"))
        self._announced: dict[str, float] = dict(saved.get("maintenance", {}))  # basis -> threshold announced
        self._pos: tuple[float | None, float | None] = (None, None)

    def process(self, record: Record) -> list[Record]:
        data = record.data
        if isinstance(data, Fix):
            self._pos = (data.lat, data.lon)
            return [record]
        if isinstance(data, Status) and data.type in DTC_STATUS_TYPES:
            events = self._dtc_change(record, data)
        elif isinstance(data, Signal) and data.value is not None:
            events = self._signal(record, data)
        else:
            return [record]
        if events:
            self._save()
        return [*events, record]

    def _dtc_change(self, record: Record, status: Status) -> list[Record]:
        attrs = status.attrs
        key = f"{attrs.get('protocol')}/{attrs.get('bus')}/{attrs.get('ecu')}"
        codes = str(attrs.get("codes") or "").split()
        before = self._dtcs.get(key, [])
        if codes == before:
            return []
        self._dtcs[key] = codes
        base = {"protocol": attrs.get("protocol"), "ecu": attrs.get("ecu"), "bus": attrs.get("bus")}
        events = [self._event(record, "dtc_on", code=c, **base) for c in codes if c not in before]
        events += [self._event(record, "dtc_off", code=c, **base) for c in before if c not in codes]
        if not events:
            self._save()  # same codes in another order: nothing to say, but remember it
        return events

    def _signal(self, record: Record, signal: Signal) -> list[Record]:
        value = signal.value
        if signal.name in FUEL_LEVEL_PCT:
            if not self._low_fuel and value < self.config.low_fuel_pct:
                self._low_fuel = True
                log.info("fuel low: %.1f %%", value)
                return [self._event(record, "low_fuel", fuel_pct=round(value, 1))]
            if self._low_fuel and value >= self.config.low_fuel_pct + self.config.low_fuel_clear_pct:
                self._low_fuel = False
                self._save()
            return []
        if signal.name in ENGINE_HOURS_H:
            return self._maintenance(record, "engine_h", value, self.config.service_due_engine_h)
        factor = ODOMETER_TO_KM.get(signal.name)
        if factor is not None:
            return self._maintenance(record, "km", value * factor, self.config.service_due_km)
        return []

    def _maintenance(self, record: Record, basis: str, value: float, due: float | None) -> list[Record]:
        if due is None or value < due or self._announced.get(basis) == due:
            return []
        self._announced[basis] = due
        log.info("maintenance due: %s %.1f >= %.1f", basis, value, due)
        return [self._event(record, "maintenance_due", basis=basis, value=round(value, 1), due=due)]

    def _event(self, record: Record, etype: str, **attrs) -> Record:
        lat, lon = self._pos
        return Record(utc=record.utc, mono=record.mono, data=Event(type=etype, lat=lat, lon=lon, attrs=attrs))

    def _save(self) -> None:
        self._state_file.save({"dtcs": self._dtcs, "low_fuel": self._low_fuel, "maintenance": self._announced})
