"""Idling: the engine running while the vehicle stands still for longer than ``min_duration_s``.

The engine runs when CAN engine speed is at least ``engine_on_rpm``; without engine speed, when
the ignition is on. Standing still: CAN wheel speed, else GPS speed, below ``still_speed_mps``.
``idle_start`` carries the time idling began (emitted once it lasted ``min_duration_s``);
``idle_end`` the time it ended, ``duration_s`` and ``fuel_l`` (fuel wasted) when the fuel rate is
known. An idle period in progress survives a restart (``<data_dir>/edge-idling.json``, written at
its start, when announced, at its end and once a minute in between for the fuel wasted).
"""

from __future__ import annotations

import logging
from pathlib import Path

from agent.config import IdlingConfig
from agent.state_file import PERIODIC_SAVE_S, StateFile
from agent.processors.vehicle import ENGINE_SPEED_RPM, WHEEL_SPEED_KMH, FuelMeter, ignition, signal_value
from agent.record import Event, Fix, Record

log = logging.getLogger(__name__)

# Wheel speed newer than this wins over GPS speed (seconds of record time).
WHEEL_SPEED_FRESH_S = 2.0


class IdleDetector:
    """Emits idle_start and idle_end."""

    def __init__(self, config: IdlingConfig, engine_on_rpm: float, data_dir: str | Path | None) -> None:
        self.config = config
        self.engine_on_rpm = engine_on_rpm
        self._state_file = StateFile(data_dir, "edge-idling")
        saved = self._state_file.load()
        self._since: float | None = saved.get("since")
        self._announced = bool(saved.get("announced"))
        self._fuel_l = float(saved.get("fuel_l", 0.0))
        self._saved_at = self._since  # utc of the last save while idling
        self._rpm: float | None = None
        self._ignition: bool | None = None
        self._wheel: tuple[float, float] | None = None  # (utc, km/h)
        self._gps_speed: float | None = None
        self._pos: tuple[float | None, float | None] = (None, None)
        self._fuel = FuelMeter()

    def process(self, record: Record) -> list[Record]:
        utc = record.utc
        used = self._fuel.update(utc, record)
        if self._since is not None:
            self._fuel_l += used
        self._observe(record)
        idling = self._engine_running() and self._still(utc)
        events: list[Record] = []
        if idling is None:
            return [record]
        if idling and self._since is None:
            self._since, self._announced, self._fuel_l = utc, False, 0.0
            self._save(utc)
        elif idling and not self._announced and utc - self._since >= self.config.min_duration_s:
            self._announced = True
            self._save(utc)
            log.info("idling since %.0f", self._since)
            events.append(self._event(self._since, record.mono, "idle_start"))
        elif idling and utc - self._saved_at >= PERIODIC_SAVE_S:
            self._save(utc)  # the fuel wasted so far
        elif not idling and self._since is not None:
            if self._announced:
                attrs = {"duration_s": round(utc - self._since, 1)}
                if self._fuel.seen:
                    attrs["fuel_l"] = round(self._fuel_l, 3)
                events.append(self._event(utc, record.mono, "idle_end", **attrs))
                log.info("idling ended after %.0f s", utc - self._since)
            self._since, self._announced, self._fuel_l = None, False, 0.0
            self._save(utc)
        return [*events, record]

    def _observe(self, record: Record) -> None:
        on = ignition(record)
        if on is not None:
            self._ignition = on
        rpm = signal_value(record, ENGINE_SPEED_RPM)
        if rpm is not None:
            self._rpm = rpm
        wheel = signal_value(record, WHEEL_SPEED_KMH)
        if wheel is not None:
            self._wheel = (record.utc, wheel)
        if isinstance(record.data, Fix):
            self._gps_speed = record.data.speed_mps
            self._pos = (record.data.lat, record.data.lon)

    def _engine_running(self) -> bool | None:
        if self._rpm is not None:
            return self._rpm >= self.engine_on_rpm
        return self._ignition

    def _still(self, utc: float) -> bool | None:
        if self._wheel is not None and utc - self._wheel[0] <= WHEEL_SPEED_FRESH_S:
            return self._wheel[1] / 3.6 < self.config.still_speed_mps
        if self._gps_speed is None:
            return None
        return self._gps_speed < self.config.still_speed_mps

    def _event(self, utc: float, mono: float, etype: str, **attrs) -> Record:
        lat, lon = self._pos
        return Record(utc=utc, mono=mono, data=Event(type=etype, lat=lat, lon=lon, attrs=attrs))

    def _save(self, utc: float) -> None:
        self._saved_at = utc
        state = {"since": self._since, "announced": self._announced, "fuel_l": round(self._fuel_l, 3)} if self._since else {}
        self._state_file.save(state)
