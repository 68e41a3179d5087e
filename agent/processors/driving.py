"""How the vehicle is driven: harsh acceleration, braking and cornering, and overspeed episodes.

Longitudinal acceleration is the change of speed over at least one second (CAN wheel speed while
it is fresh, else GPS Doppler speed); lateral acceleration is speed times the rate of change of
the GPS course. A GPS sample counts only when its velocity agrees with where the fixes before and
after it are (a Doppler spike does not move the truck), which delays the checks by one fix. Harsh braking is checked when the speed before was
above ``min_speed_kmh``, harsh acceleration and cornering when the speed was above it at both
ends (receivers pin position and speed near standstill and release them in one step, which reads
as a launch). GPS samples count only from fixes of at least 6 satellites and HDOP at most 2.5, and
accelerations beyond 10 m/s^2 are GPS errors. One event per manoeuvre: it starts when the threshold
is crossed and is emitted when the acceleration falls back below it, stamped at its start, with
``peak_mps2`` and ``duration_s``.

Overspeed compares the (unfiltered) speed with the lowest of the global limit and the speed-zone
fences containing the last fix (``speed_limit_at(lat, lon)`` of the geofence processor). An episode
ends once the speed stayed at or below the limit for ``overspeed_end_s``; episodes of at least
``overspeed_min_s`` give one ``overspeed`` event with ``peak_kmh``, ``duration_s``, ``limit_kmh``
and the zone's ``geofence_id``. An overspeed episode in progress survives a restart
(``<data_dir>/edge-driving.json``, written when it starts and ends, and every ``overspeed_min_s``
of record time in between; the time the agent was down counts as below the limit): one event per episode, also across a reboot. Harsh episodes last seconds and are not kept.
"""

from __future__ import annotations

import math
from collections import deque
from pathlib import Path
from typing import Callable, NamedTuple

from agent.config import DrivingConfig
from agent.geo import LocalFrame, heading_change_deg
from agent.processors.vehicle import WHEEL_SPEED_KMH, signal_value
from agent.record import Event, Fix, Record
from agent.state_file import PERIODIC_SAVE_S, StateFile

# Defaults in m/s^2 by vehicle (accel, brake, corner): common fleet-telematics practice puts harsh
# events for light vans near 0.3-0.4 g and for laden heavy trucks near 0.2-0.3 g (g = 9.81 m/s^2).
PROFILES = {"van": (2.9, 3.9, 3.9), "truck": (2.0, 2.9, 2.5)}
# Speed changes are measured over at least this long (s): per-sample CAN derivatives are noise.
MIN_DERIVATIVE_S = 1.0
# Wheel speed newer than this wins over GPS speed (s); course changes across a gap longer than
# this are not a turn rate (s).
WHEEL_SPEED_FRESH_S = 2.0
MAX_COURSE_GAP_S = 2.0
# GPS fixes from fewer satellites or a worse geometry are not used for harsh driving: their Doppler
# speed and course jump by metres per second from one fix to the next (measured on the Munich
# drive of the corpus: 5 m/s drops and back within 2 s at 4-5 satellites, HDOP 2.2-6).
MIN_SATS_FOR_HARSH = 6
MAX_HDOP_FOR_HARSH = 2.5
# A GPS sample whose velocity, integrated from the fix before to the fix after it, misses the
# measured displacement by more than this (metres, or this share of it) is a Doppler error.
VELOCITY_MISMATCH_M = 5.0
VELOCITY_MISMATCH_SHARE = 0.2
# Tyre-road friction limits a road vehicle to about mu * g with mu <= 1 on dry asphalt: more than
# this (m/s^2) is a GPS error, not driving.
MAX_PLAUSIBLE_MPS2 = 10.0

SpeedLimit = Callable[[float, float], "tuple[float, str] | None"]


class Sample(NamedTuple):
    """One (filtered) speed sample: when, where, m/s, course (GPS only), and whether to trust it."""

    utc: float
    lat: float | None
    lon: float | None
    speed: float
    course: float | None = None
    trusted: bool = True


def _trusted(fix: Fix) -> bool:
    """Whether the fix's Doppler speed and course are good enough for harsh driving (unknown: yes)."""
    return ((fix.sats_used is None or fix.sats_used >= MIN_SATS_FOR_HARSH)
            and (fix.hdop is None or fix.hdop <= MAX_HDOP_FOR_HARSH))


def _checked(a: Sample, b: Sample, c: Sample) -> Sample:
    """``b``, no longer trusted when its velocity disagrees with the displacement from ``a`` to ``c``."""
    if not b.trusted or None in (a.lat, c.lat, a.course, b.course, c.course):
        return b
    frame = LocalFrame(a.lat, a.lon)
    x, y = frame.to_xy(c.lat, c.lon)
    # Trapezoid rule over the two intervals: a -> b -> c.
    ex = ey = 0.0
    for (p, q) in ((a, b), (b, c)):
        dt = q.utc - p.utc
        for v in (p, q):
            ex += v.speed * math.sin(math.radians(v.course)) * dt / 2
            ey += v.speed * math.cos(math.radians(v.course)) * dt / 2
    miss = math.hypot(ex - x, ey - y)
    if miss > max(VELOCITY_MISMATCH_M, VELOCITY_MISMATCH_SHARE * math.hypot(x, y)):
        return b._replace(trusted=False)
    return b


class _Episode:
    """A threshold crossing in progress: where it started and its peak."""

    __slots__ = ("utc", "lat", "lon", "peak", "last", "limit", "fence")

    def __init__(self, sample: Sample, value: float) -> None:
        self.utc, self.lat, self.lon, self.peak, self.last = sample.utc, sample.lat, sample.lon, value, sample.utc
        self.limit: float | None = None  # overspeed only: the limit and the zone that set it
        self.fence: str | None = None

    def saved(self) -> dict:
        """The episode as JSON-able state."""
        return {name: getattr(self, name) for name in self.__slots__}

    @classmethod
    def restored(cls, state: dict) -> "_Episode":
        """An episode from :meth:`saved` state (KeyError/TypeError/ValueError when it is not one)."""
        episode = cls.__new__(cls)
        for name in cls.__slots__:
            setattr(episode, name, state[name])
        for name in ("utc", "peak", "last"):
            float(getattr(episode, name))
        return episode


class DrivingMonitor:
    """Emits harsh_accel, harsh_brake, harsh_corner and overspeed."""

    def __init__(self, config: DrivingConfig, speed_limit: SpeedLimit | None = None,
                 data_dir: str | Path | None = None) -> None:
        self.config = config
        accel, brake, corner = PROFILES[config.vehicle]
        self.thresholds = {
            "harsh_accel": config.harsh_accel_mps2 or accel,
            "harsh_brake": config.harsh_brake_mps2 or brake,
            "harsh_corner": config.harsh_corner_mps2 or corner,
        }
        self._speed_limit = speed_limit
        self._episodes: dict[str, _Episode] = {}
        self._state = StateFile(data_dir, "edge-driving")
        saved = self._state.load().get("overspeed")
        if saved:
            try:
                self._episodes["overspeed"] = _Episode.restored(saved)
            except (KeyError, TypeError, ValueError):
                self._state.save({})  # not an episode: start without one
        self._saved_at = self._episodes["overspeed"].last if "overspeed" in self._episodes else None
        self._gps: deque[Sample] = deque(maxlen=3)
        self._ref: Sample | None = None  # the filtered sample the last acceleration was measured from
        self._last_course: Sample | None = None
        self._wheel_at: float | None = None
        self._pos: tuple[float | None, float | None] = (None, None)

    def process(self, record: Record) -> list[Record]:
        utc = record.utc
        mono = record.mono
        events: list[Record] = []
        wheel = signal_value(record, WHEEL_SPEED_KMH)
        if wheel is not None:
            self._wheel_at = utc
            sample = Sample(utc, *self._pos, wheel / 3.6)
            events += self._overspeed(sample, mono)
            events += self._longitudinal(sample, mono)
        fix = record.data
        if isinstance(fix, Fix):
            self._pos = (fix.lat, fix.lon)
            if fix.speed_mps is not None:
                sample = Sample(utc, fix.lat, fix.lon, fix.speed_mps, fix.course_deg, _trusted(fix))
                wheel_fresh = self._wheel_at is not None and utc - self._wheel_at <= WHEEL_SPEED_FRESH_S
                if not wheel_fresh:
                    events += self._overspeed(sample, mono)
                events += self._gps_sample(sample, mono, speed=not wheel_fresh)
        return [*events, record]

    def _gps_sample(self, sample: Sample, mono: float, speed: bool) -> list[Record]:
        """Check the previous GPS sample, now that the one after it is known."""
        window = self._gps
        if window and sample.utc <= window[-1].utc:
            window.clear()  # time went backwards: start again
        window.append(sample)
        if len(window) < 3:
            return []
        middle = _checked(*window)
        events = self._longitudinal(middle, mono) if speed else []
        return events + self._lateral(middle, mono)

    def _longitudinal(self, sample: Sample, mono: float) -> list[Record]:
        if not sample.trusted:
            self._ref = None  # no acceleration across a doubtful speed
            return []
        if self._ref is None or sample.utc < self._ref.utc:
            self._ref = sample
            return []
        ref = self._ref
        if sample.utc - ref.utc < MIN_DERIVATIVE_S:
            return []
        self._ref = sample
        accel = (sample.speed - ref.speed) / (sample.utc - ref.utc)
        if abs(accel) > MAX_PLAUSIBLE_MPS2:
            accel = 0.0
        floor = self.config.min_speed_kmh / 3.6
        speeding_up = accel if min(ref.speed, sample.speed) >= floor else 0.0
        braking = -accel if ref.speed >= floor else 0.0
        return self._check(sample, mono, "harsh_accel", speeding_up) + self._check(sample, mono, "harsh_brake", braking)

    def _lateral(self, sample: Sample, mono: float) -> list[Record]:
        previous = self._last_course
        self._last_course = sample if sample.trusted and sample.course is not None else None
        if previous is None or self._last_course is None:
            return []
        dt = sample.utc - previous.utc
        if not 0 < dt <= MAX_COURSE_GAP_S:
            return []
        # a_lat = v * omega, the turn rate in rad/s.
        omega = math.radians(abs(heading_change_deg(previous.course, sample.course))) / dt
        lateral = (sample.speed + previous.speed) / 2 * omega
        if min(sample.speed, previous.speed) * 3.6 < self.config.min_speed_kmh or lateral > MAX_PLAUSIBLE_MPS2:
            lateral = 0.0
        return self._check(sample, mono, "harsh_corner", lateral)

    def _check(self, sample: Sample, mono: float, kind: str, value: float) -> list[Record]:
        """Start, extend or finish a harsh episode of ``kind`` with this acceleration (m/s^2)."""
        episode = self._episodes.get(kind)
        if value >= self.thresholds[kind]:
            if episode is None:
                self._episodes[kind] = _Episode(sample, value)
            else:
                episode.peak, episode.last = max(episode.peak, value), sample.utc
            return []
        if episode is None:
            return []
        del self._episodes[kind]
        return [self._event(episode, mono, kind, peak_mps2=round(episode.peak, 2),
                            duration_s=round(sample.utc - episode.utc, 1))]

    def _overspeed(self, sample: Sample, mono: float) -> list[Record]:
        kmh = sample.speed * 3.6
        limit, fence_id = self._limit()
        episode = self._episodes.get("overspeed")
        if limit is not None and kmh > limit:
            if episode is None:
                self._episodes["overspeed"] = episode = _Episode(sample, kmh)
                episode.limit, episode.fence = limit, fence_id
                self._save(episode)
            episode.peak, episode.last = max(episode.peak, kmh), sample.utc
            # Often enough that a restart keeps an episode long enough to report (a few writes each).
            if sample.utc - self._saved_at >= min(PERIODIC_SAVE_S, self.config.overspeed_min_s):
                self._save(episode)
            return []
        if episode is None or sample.utc - episode.last < self.config.overspeed_end_s:
            return []
        del self._episodes["overspeed"]
        self._save(None)
        duration = episode.last - episode.utc
        if duration < self.config.overspeed_min_s:
            return []
        attrs = {"peak_kmh": round(episode.peak, 1), "duration_s": round(duration, 1), "limit_kmh": episode.limit}
        if episode.fence is not None:
            attrs["geofence_id"] = episode.fence
        return [self._event(episode, mono, "overspeed", **attrs)]

    def _save(self, episode: _Episode | None) -> None:
        self._state.save({"overspeed": episode.saved()} if episode is not None else {})
        self._saved_at = episode.last if episode is not None else None

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
