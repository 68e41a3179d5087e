"""Trips: ``trip_start`` and ``trip_end`` from the best source the vehicle has.

The ignition line (Status "ignition") when the vehicle has one, else CAN engine speed, else
movement (faster than ``moving_speed_mps`` starts a trip; standing still for ``movement_end_s``
ends it, stamped at the moment it stopped). Once a better source has been seen, the worse ones are
ignored. ``trip_end`` carries ``distance_m``, ``duration_s``, ``idle_s`` (standing still in the
trip) and ``fuel_l`` when the engine reports its fuel rate. A trip in progress survives a restart
(``<data_dir>/edge-trips.json``, written at start, end, and once a minute in between).
"""

from __future__ import annotations

import logging
from pathlib import Path

from agent.config import TripsConfig
from agent.geo import haversine_m
from agent.state_file import PERIODIC_SAVE_S, StateFile
from agent.processors.vehicle import ENGINE_SPEED_RPM, FuelMeter, ignition, signal_value
from agent.record import Event, Fix, Record

log = logging.getLogger(__name__)

SOURCES = ("movement", "engine", "ignition")  # worst to best
# Standing still below this Doppler speed (m/s): counts as idle time, adds no distance.
STILL_SPEED_MPS = 1.0
# Consecutive fixes further apart than this speed allows are a GPS jump, not distance (m/s).
MAX_PLAUSIBLE_SPEED_MPS = 70.0


class TripDetector:
    """Emits trip_start and trip_end with the trip's distance, duration, idle time and fuel."""

    def __init__(self, config: TripsConfig, data_dir: str | Path | None) -> None:
        self.config = config
        self._state_file = StateFile(data_dir, "edge-trips")
        saved = self._state_file.load()
        self._source = saved.get("source", "movement")
        trip = saved.get("trip")
        self._trip: dict | None = dict(trip) if trip else None  # start, distance_m, idle_s, fuel_l, saved
        self._last_fix: tuple[float, Fix] | None = None
        self._still_since: float | None = None
        self._fuel = FuelMeter()

    def process(self, record: Record) -> list[Record]:
        utc = record.utc
        used = self._fuel.update(utc, record)
        if self._trip is not None:
            self._trip["fuel_l"] += used
        source, running = self._observe(record)
        events: list[Record] = []
        if source is not None and SOURCES.index(source) > SOURCES.index(self._source):
            log.info("trips now follow the %s (was %s)", source, self._source)
            self._source = source
            self._save()
        if source == self._source and running is not None:
            if running and self._trip is None:
                events.append(self._start(record))
            elif not running and self._trip is not None:
                events.append(self._end(record, utc))
        if isinstance(record.data, Fix):
            events += self._on_fix(record, record.data)
        if self._trip is not None and utc - self._trip["saved"] >= PERIODIC_SAVE_S:
            self._trip["saved"] = utc
            self._save()
        return [*events, record]

    def _observe(self, record: Record) -> tuple[str | None, bool | None]:
        """(source, running) that this record tells, or (None, None)."""
        on = ignition(record)
        if on is not None:
            return "ignition", on
        rpm = signal_value(record, ENGINE_SPEED_RPM)
        if rpm is not None:
            return "engine", rpm >= self.config.engine_on_rpm
        return None, None

    def _on_fix(self, record: Record, fix: Fix) -> list[Record]:
        utc = record.utc
        speed = fix.speed_mps
        events: list[Record] = []
        if self._trip is not None and self._last_fix is not None:
            t_prev, prev = self._last_fix
            dt = utc - t_prev
            if dt > 0:
                step = haversine_m(prev.lat, prev.lon, fix.lat, fix.lon)
                still = speed is not None and speed < STILL_SPEED_MPS
                if still:
                    self._trip["idle_s"] += dt
                elif step <= MAX_PLAUSIBLE_SPEED_MPS * dt:
                    self._trip["distance_m"] += step
        self._last_fix = (utc, fix)
        if self._source != "movement" or speed is None:
            return events
        if speed >= self.config.moving_speed_mps:
            self._still_since = None
            if self._trip is None:
                events.append(self._start(record))
        elif speed < STILL_SPEED_MPS and self._trip is not None:
            if self._still_since is None:
                self._still_since = utc
            elif utc - self._still_since >= self.config.movement_end_s:
                # Standing still ended the trip when the truck stopped, not when we noticed.
                self._trip["idle_s"] -= utc - self._still_since
                events.append(self._end(record, self._still_since))
        return events

    def _start(self, record: Record) -> Record:
        self._trip = {"start": record.utc, "distance_m": 0.0, "idle_s": 0.0, "fuel_l": 0.0, "saved": record.utc}
        self._still_since = None
        self._save()
        log.info("trip started (%s)", self._source)
        return self._event(record.utc, record.mono, "trip_start", source=self._source)

    def _end(self, record: Record, end: float) -> Record:
        trip, self._trip = self._trip, None
        self._still_since = None
        self._save()
        attrs = {
            "source": self._source,
            "distance_m": round(trip["distance_m"]),
            "duration_s": round(end - trip["start"], 1),
            "idle_s": round(max(0.0, trip["idle_s"]), 1),
        }
        if self._fuel.seen:
            attrs["fuel_l"] = round(trip["fuel_l"], 2)
        log.info("trip ended: %.0f m in %.0f s", trip["distance_m"], end - trip["start"])
        return self._event(end, record.mono, "trip_end", **attrs)

    def _event(self, utc: float, mono: float, etype: str, **attrs) -> Record:
        lat = lon = None
        if self._last_fix is not None:
            lat, lon = self._last_fix[1].lat, self._last_fix[1].lon
        return Record(utc=utc, mono=mono, data=Event(type=etype, lat=lat, lon=lon, attrs=attrs))

    def _save(self) -> None:
        self._state_file.save({"source": self._source, "trip": self._trip})
