"""Delivery stops: the truck stationary within ``radius_m`` of where it stopped for at least
``min_duration_s``.

``stop_arrive`` carries the time and position of the stop's first fix slower than 1 m/s (the
arrival), and is emitted once the stop lasted ``min_duration_s``; ``stop_depart`` carries the time
of its last slow fix inside the radius (the departure) and ``dwell_s``. Both name the customer-stop fence the stop is in
(``geofence_id``) when there is one. A departure needs the truck outside the radius and moving, or
outside on two fixes in a row, so one GPS outlier does not split a stop. A truck that has not moved
since the agent first started is parked, not at a stop. A stop in progress survives a restart
(``<data_dir>/edge-stops.json``): no second arrival, and the dwell counts from the real arrival.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from agent.config import StopsConfig
from agent.geo import haversine_m
from agent.state_file import StateFile
from agent.record import Event, Fix, Record

log = logging.getLogger(__name__)

# Doppler speed above which a fix outside the radius is a departure at once (m/s).
_DEPART_SPEED_MPS = 1.0

Locate = Callable[[float, float], "str | None"]


class StopDetector:
    """Emits stop_arrive and stop_depart; ``locate(lat, lon)`` names the customer stop fence, if any."""

    def __init__(self, config: StopsConfig, data_dir: str | Path | None, locate: Locate | None = None) -> None:
        self.config = config
        self._locate = locate
        self._state_file = StateFile(data_dir, "edge-stops")
        saved = self._state_file.load()
        self._moved = bool(saved.get("moved", False))
        stop = saved.get("stop") or {}
        # The candidate stop: its first fix (utc, lat, lon) for the radius, its first fix slower than
        # a crawl (the arrival), the last such fix (the departure, so far), whether it was announced.
        self._anchor: tuple[float, float, float] | None = tuple(stop["anchor"]) if stop else None
        self._arrival: tuple[float, float, float] | None = tuple(stop["arrival"]) if stop else None
        self._last_still: float | None = stop.get("last_still")
        self._arrived = bool(stop.get("arrived"))
        self._geofence_id: str | None = stop.get("geofence_id")
        self._outside = 0

    def process(self, record: Record) -> list[Record]:
        fix = record.data
        if not isinstance(fix, Fix):
            return [record]
        return [*self._on_fix(record, fix), record]

    def _on_fix(self, record: Record, fix: Fix) -> list[Record]:
        utc = record.utc
        if self._anchor is None:
            self._start(utc, fix)
            return []
        _, lat0, lon0 = self._anchor
        slow = fix.speed_mps is None or fix.speed_mps < _DEPART_SPEED_MPS
        if haversine_m(lat0, lon0, fix.lat, fix.lon) <= self.config.radius_m:
            self._outside = 0
            if not slow:
                if self._arrival is None:  # still rolling: the radius follows the truck until it stops
                    self._anchor = (utc, fix.lat, fix.lon)
                return []
            self._last_still = utc
            if self._arrival is None:
                # The radius is around where the truck stopped, not where it began to brake.
                self._arrival = self._anchor = (utc, fix.lat, fix.lon)
                self._save()  # a stationary candidate: worth remembering across a restart
            t0, lat1, lon1 = self._arrival
            if not self._arrived and self._moved and utc - t0 >= self.config.min_duration_s:
                self._arrived = True
                self._geofence_id = self._locate(lat1, lon1) if self._locate else None
                self._save()
                log.info("stop at %.5f,%.5f since %.0f (fence %s)", lat1, lon1, t0, self._geofence_id)
                return [self._event(t0, record.mono, "stop_arrive", lat1, lon1)]
            return []
        self._outside += 1
        if slow and self._outside < 2:
            return []
        events = []
        if self._arrived:
            t0, lat1, lon1 = self._arrival
            left = self._last_still if self._last_still is not None else t0
            events.append(self._event(left, record.mono, "stop_depart", lat1, lon1, dwell_s=round(left - t0, 1)))
            log.info("left the stop at %.5f,%.5f after %.0f s", lat1, lon1, left - t0)
        self._moved = True
        self._start(utc, fix)
        return events

    def _start(self, utc: float, fix: Fix) -> None:
        """A new candidate stop at this fix."""
        self._anchor = (utc, fix.lat, fix.lon)
        self._arrival = None
        self._last_still = None
        self._arrived = False
        self._geofence_id = None
        self._outside = 0
        self._save()

    def _event(self, utc: float, mono: float, etype: str, lat: float, lon: float, **attrs) -> Record:
        if self._geofence_id is not None:
            attrs["geofence_id"] = self._geofence_id
        return Record(utc=utc, mono=mono, data=Event(type=etype, lat=lat, lon=lon, attrs=attrs))

    def _save(self) -> None:
        # Only a stationary candidate is kept: while driving the anchor moves with every fix, and
        # the state on disk stays the same. The departure so far is saved at the arrival.
        stop = None
        if self._anchor is not None and self._arrival is not None:
            stop = {"anchor": list(self._anchor), "arrival": list(self._arrival), "last_still": self._last_still,
                    "arrived": self._arrived, "geofence_id": self._geofence_id}
        self._state_file.save({"moved": self._moved, "stop": stop})
