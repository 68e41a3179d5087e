"""How the vehicle is driven: harsh acceleration, braking and cornering, and overspeed episodes.

Longitudinal acceleration is the change of speed over at least one second (CAN wheel speed while
it is fresh, else GPS Doppler speed); lateral acceleration is speed times the rate of change of
the GPS course. Both are checked only above ``min_speed_kmh`` (course and Doppler speed are noise
when crawling). One event per manoeuvre: it starts when the threshold is crossed and is emitted
when the acceleration falls back below it, stamped at its start, with ``peak_mps2`` and
``duration_s``.

Overspeed compares the speed with the lowest of the global limit and the speed-zone fences
containing the last fix (``speed_limit_at(lat, lon)`` of the geofence processor). An episode ends once the speed stayed
at or below the limit for ``overspeed_end_s``; episodes of at least ``overspeed_min_s`` give one
``overspeed`` event with ``peak_kmh``, ``duration_s``, ``limit_kmh`` and the zone's ``geofence_id``.
"""

from __future__ import annotations

import math
from typing import Callable

from agent.config import DrivingConfig
from agent.geo import heading_change_deg
from agent.processors.vehicle import WHEEL_SPEED_KMH, signal_value
from agent.record import Event, Fix, Record

# Defaults in m/s^2 by vehicle (accel, brake, corner): common fleet-telematics practice puts harsh
# events for light vans near 0.3-0.4 g and for laden heavy trucks near 0.2-0.3 g (g = 9.81 m/s^2).
PROFILES = {"van": (2.9, 3.9, 3.9), "truck": (2.0, 2.9, 2.5)}
# Speed changes are measured over at least this long (s): per-sample CAN derivatives are noise.
MIN_DERIVATIVE_S = 1.0
# Wheel speed newer than this wins over GPS speed (s); course changes across a gap longer than
# this are not a turn rate (s).
WHEEL_SPEED_FRESH_S = 2.0
MAX_COURSE_GAP_S = 2.0

SpeedLimit = Callable[[float, float], "tuple[float, str] | None"]


class _Episode:
    """A threshold crossing in progress: where it started and its peak."""

    __slots__ = ("utc", "lat", "lon", "peak", "last", "limit", "fence")

    def __init__(self, utc: float, lat: float | None, lon: float | None, value: float) -> None:
        self.utc, self.lat, self.lon, self.peak, self.last = utc, lat, lon, value, utc
        self.limit: float | None = None  # overspeed only: the limit and the zone that set it
        self.fence: str | None = None


class DrivingMonitor:
    """Emits harsh_accel, harsh_brake, harsh_corner and overspeed."""

    def __init__(self, config: DrivingConfig, speed_limit: SpeedLimit | None = None) -> None:
        self.config = config
        accel, brake, corner = PROFILES[config.vehicle]
        self.thresholds = {
            "harsh_accel": config.harsh_accel_mps2 or accel,
            "harsh_brake": config.harsh_brake_mps2 or brake,
            "harsh_corner": config.harsh_corner_mps2 or corner,
        }
        self._speed_limit = speed_limit
        self._episodes: dict[str, _Episode] = {}
        self._ref: tuple[float, float] | None = None  # (utc, m/s) the last acceleration was measured from
        self._wheel_at: float | None = None
        self._last_fix: tuple[float, Fix] | None = None
        self._pos: tuple[float | None, float | None] = (None, None)

    def process(self, record: Record) -> list[Record]:
        utc = record.utc
        events: list[Record] = []
        wheel = signal_value(record, WHEEL_SPEED_KMH)
        if wheel is not None:
            self._wheel_at = utc
            events += self._on_speed(record, wheel / 3.6)
        fix = record.data
        if isinstance(fix, Fix):
            self._pos = (fix.lat, fix.lon)
            wheel_fresh = self._wheel_at is not None and utc - self._wheel_at <= WHEEL_SPEED_FRESH_S
            if fix.speed_mps is not None and not wheel_fresh:
                events += self._on_speed(record, fix.speed_mps)
            events += self._on_course(record, fix)
        return [*events, record]

    def _on_speed(self, record: Record, speed: float) -> list[Record]:
        utc = record.utc
        events = self._overspeed(record, speed * 3.6)
        if self._ref is None or utc < self._ref[0]:
            self._ref = (utc, speed)
            return events
        t0, v0 = self._ref
        if utc - t0 < MIN_DERIVATIVE_S:
            return events
        self._ref = (utc, speed)
        if max(v0, speed) * 3.6 < self.config.min_speed_kmh:
            accel = 0.0
        else:
            accel = (speed - v0) / (utc - t0)
        events += self._check(record, "harsh_accel", accel)
        events += self._check(record, "harsh_brake", -accel)
        return events

    def _on_course(self, record: Record, fix: Fix) -> list[Record]:
        utc = record.utc
        previous, self._last_fix = self._last_fix, (utc, fix)
        if previous is None or fix.course_deg is None or fix.speed_mps is None:
            return []
        t0, prev = previous
        dt = utc - t0
        if prev.course_deg is None or prev.speed_mps is None or not 0 < dt <= MAX_COURSE_GAP_S:
            return []
        speed = (fix.speed_mps + prev.speed_mps) / 2
        if min(fix.speed_mps, prev.speed_mps) * 3.6 < self.config.min_speed_kmh:
            lateral = 0.0
        else:
            # a_lat = v * omega, the turn rate in rad/s.
            lateral = speed * math.radians(abs(heading_change_deg(prev.course_deg, fix.course_deg))) / dt
        return self._check(record, "harsh_corner", lateral)

    def _check(self, record: Record, kind: str, value: float) -> list[Record]:
        """Start, extend or finish a harsh episode of ``kind`` with this acceleration (m/s^2)."""
        episode = self._episodes.get(kind)
        if value >= self.thresholds[kind]:
            if episode is None:
                self._episodes[kind] = _Episode(record.utc, *self._pos, value)
            else:
                episode.peak, episode.last = max(episode.peak, value), record.utc
            return []
        if episode is None:
            return []
        del self._episodes[kind]
        return [self._event(episode, record.mono, kind, peak_mps2=round(episode.peak, 2),
                            duration_s=round(record.utc - episode.utc, 1))]

    def _overspeed(self, record: Record, kmh: float) -> list[Record]:
        limit, fence_id = self._limit()
        episode = self._episodes.get("overspeed")
        if limit is not None and kmh > limit:
            if episode is None:
                self._episodes["overspeed"] = episode = _Episode(record.utc, *self._pos, kmh)
                episode.limit, episode.fence = limit, fence_id
            episode.peak, episode.last = max(episode.peak, kmh), record.utc
            return []
        if episode is None or record.utc - episode.last < self.config.overspeed_end_s:
            return []
        del self._episodes["overspeed"]
        duration = episode.last - episode.utc
        if duration < self.config.overspeed_min_s:
            return []
        attrs = {"peak_kmh": round(episode.peak, 1), "duration_s": round(duration, 1), "limit_kmh": episode.limit}
        if episode.fence is not None:
            attrs["geofence_id"] = episode.fence
        return [self._event(episode, record.mono, "overspeed", **attrs)]

    def _limit(self) -> tuple[float | None, str | None]:
        """(km/h, zone fence id or None) now in force; (None, None) without any limit."""
        limits: list[tuple[float, str | None]] = []
        if self.config.overspeed_kmh is not None:
            limits.append((self.config.overspeed_kmh, None))
        lat, lon = self._pos
        zone = self._speed_limit(lat, lon) if self._speed_limit and lat is not None else None
        if zone is not None:
            limits.append(zone)
        return min(limits, key=lambda item: item[0]) if limits else (None, None)

    @staticmethod
    def _event(episode: _Episode, mono: float, etype: str, **attrs) -> Record:
        return Record(utc=episode.utc, mono=mono, data=Event(type=etype, lat=episode.lat, lon=episode.lon, attrs=attrs))
