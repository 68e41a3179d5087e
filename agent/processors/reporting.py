"""Adaptive position reporting: which fixes leave the truck. Runs last: every fix has already fed
the geofence and event processors before this one thins them.

A fix is reported when, since the last reported one, the profile's period, distance, heading change
or speed change is exceeded; when the truck switches between the moving and the parked profile;
and at every event (the fix that comes with it). On top of these (what commercial trackers do),
each profile bounds the error of the backend's map: before the track since the last report
strays more than ``tolerance_m`` from the straight, constant-speed line between two reports
(linear interpolation in time, what the backend draws), the previous fix is reported. That fix is
therefore sent one fix late; everything else at once. ``flush()`` returns a fix still held back
(at the end of a capture).
"""

from __future__ import annotations

import math

from agent.config import ReportingConfig, ReportingProfile
from agent.geo import LocalFrame, haversine_m, heading_change_deg
from agent.processors.vehicle import ignition
from agent.record import Event, Fix, Record


class AdaptiveReporter:
    """Thins fix records; passes every other record through."""

    def __init__(self, config: ReportingConfig) -> None:
        self.config = config
        self._anchor: Record | None = None  # the last reported fix
        self._frame: LocalFrame | None = None  # metres around the anchor
        self._window: list[tuple[float, float, float, Record]] = []  # unreported fixes since: (t, x, y, record)
        self._force = False
        self._ignition: bool | None = None
        self._moving: bool | None = None
        self.seen = 0
        self.reported = 0

    def process(self, record: Record) -> list[Record]:
        data = record.data
        if isinstance(data, Event):
            self._force = True  # the fix that caused it comes right after its events
            return [record]
        on = ignition(record)
        if on is not None:
            self._ignition = on
        if not isinstance(data, Fix):
            return [record]
        self.seen += 1
        if not self.config.enabled:
            self.reported += 1
            return [record]
        return self._on_fix(record, data)

    def flush(self) -> list[Record]:
        """The last unreported fix, if any (end of input): the track's end is not lost."""
        if not self._window:
            return []
        record = self._window[-1][3]
        self._report(record)
        return [record]

    def _on_fix(self, record: Record, fix: Fix) -> list[Record]:
        force, self._force = self._force, False
        moving = self._ignition is not False and (fix.speed_mps is None or fix.speed_mps >= self.config.moving_speed_mps)
        switched = self._moving is not None and moving != self._moving
        self._moving = moving
        if self._anchor is None:
            self._report(record)
            return [record]
        profile = self.config.moving if moving else self.config.parked
        out: list[Record] = []
        t = record.utc
        x, y = self._frame.to_xy(fix.lat, fix.lon)
        if profile.tolerance_m > 0 and self._window and not self._fits(t, x, y, profile.tolerance_m):
            held = self._window[-1][3]
            self._report(held)
            out.append(held)
            x, y = self._frame.to_xy(fix.lat, fix.lon)
        if force or switched or self._due(record, fix, profile):
            self._report(record)
            out.append(record)
        else:
            self._window.append((t, x, y, record))
        return out

    def _fits(self, t: float, x: float, y: float, tolerance: float) -> bool:
        """Whether every held fix lies within ``tolerance`` of its time-interpolated place on anchor -> (x, y)."""
        span = t - self._anchor.utc
        if span <= 0:
            return True
        limit = tolerance * tolerance
        t0 = self._anchor.utc
        for tw, xw, yw, _ in self._window:
            f = (tw - t0) / span
            dx, dy = xw - f * x, yw - f * y
            if dx * dx + dy * dy > limit:
                return False
        return True

    def _due(self, record: Record, fix: Fix, profile: ReportingProfile) -> bool:
        """Whether the profile's period, distance, heading or speed criterion is exceeded."""
        last: Fix = self._anchor.data  # type: ignore[assignment]
        if record.utc - self._anchor.utc >= profile.period_s:
            return True
        if profile.distance_m > 0 and haversine_m(last.lat, last.lon, fix.lat, fix.lon) >= profile.distance_m:
            return True
        if (profile.heading_deg > 0 and fix.course_deg is not None and last.course_deg is not None
                and min(fix.speed_mps or 0.0, last.speed_mps or 0.0) >= self.config.moving_speed_mps
                and abs(heading_change_deg(last.course_deg, fix.course_deg)) >= profile.heading_deg):
            return True
        if (profile.speed_change_mps > 0 and fix.speed_mps is not None and last.speed_mps is not None
                and abs(fix.speed_mps - last.speed_mps) >= profile.speed_change_mps):
            return True
        return False

    def _report(self, record: Record) -> None:
        fix: Fix = record.data  # type: ignore[assignment]
        self._anchor = record
        self._frame = LocalFrame(fix.lat, fix.lon)
        # Held fixes after the new anchor stay held, re-expressed around it.
        later = [r for _, _, _, r in self._window if r.utc > record.utc]
        self._window = [(r.utc, *self._frame.to_xy(r.data.lat, r.data.lon), r) for r in later]  # type: ignore[union-attr]
        self.reported += 1


def fidelity_errors_m(track: list[Record], reported: list[Record]) -> list[float]:
    """For every fix of ``track``, metres between it and the position interpolated linearly in time
    between the reported fixes around it (issue 7's fidelity measure). Fixes outside the reported
    span are measured against the nearest reported fix."""
    errors = []
    j = 0
    times = [r.utc for r in reported]
    for record in track:
        fix: Fix = record.data  # type: ignore[assignment]
        while j + 1 < len(times) and times[j + 1] <= record.utc:
            j += 1
        a = reported[j]
        b = reported[j + 1] if j + 1 < len(reported) and a.utc <= record.utc else a
        if b is a or b.utc == a.utc:
            p = a.data
            errors.append(haversine_m(fix.lat, fix.lon, p.lat, p.lon))  # type: ignore[union-attr]
            continue
        f = (record.utc - a.utc) / (b.utc - a.utc)
        frame = LocalFrame(a.data.lat, a.data.lon)  # type: ignore[union-attr]
        bx, by = frame.to_xy(b.data.lat, b.data.lon)  # type: ignore[union-attr]
        x, y = frame.to_xy(fix.lat, fix.lon)
        errors.append(math.hypot(x - f * bx, y - f * by))
    return errors
