"""Synthetic drives with known ground truth for the edge-logic tests: fixes at 1 Hz along
straight legs at set speeds, stays with optional GPS noise, CAN signals and ignition changes."""

from __future__ import annotations

import json
import math
import random

from agent.pipeline import Pipeline
from agent.geo import bearing_deg, haversine_m, offset
from agent.record import Fix, Record, Signal, Status

T0 = 1_750_000_000.0  # 2025-06-15T15:06:40Z


class Drive:
    """Builds a list of records; ``t`` is the time of the last record, ``lat``/``lon`` where the truck is."""

    def __init__(self, lat: float, lon: float, t0: float = T0) -> None:
        self.lat, self.lon, self.t = lat, lon, t0
        self.course = 0.0
        self.records: list[Record] = []

    def fix(self, lat: float, lon: float, speed: float, course: float | None = None) -> None:
        self.t += 1.0
        self.records.append(Record(utc=self.t, mono=self.t, data=Fix(
            lat=lat, lon=lon, speed_mps=speed, course_deg=self.course if course is None else course,
            quality=1, hdop=0.9, sats_used=9, mode=3)))

    def to(self, lat: float, lon: float, speed: float) -> "Drive":
        """Straight to (lat, lon) at ``speed`` m/s, one fix a second; the last fix is at the target."""
        distance = haversine_m(self.lat, self.lon, lat, lon)
        self.course = bearing_deg(self.lat, self.lon, lat, lon)
        steps = max(1, round(distance / speed))
        lat0, lon0 = self.lat, self.lon
        for k in range(1, steps + 1):
            f = k / steps
            self.fix(lat0 + f * (lat - lat0), lon0 + f * (lon - lon0), speed)
        self.lat, self.lon = lat, lon
        return self

    def leg(self, lat: float, lon: float, speed: float, accel: float = 1.2) -> "Drive":
        """From standstill to standstill at (lat, lon): speeding up and braking at ``accel`` m/s^2."""
        distance = haversine_m(self.lat, self.lon, lat, lon)
        self.course = bearing_deg(self.lat, self.lon, lat, lon)
        lat0, lon0 = self.lat, self.lon
        s = v = 0.0
        while distance - s > 0.5:
            v = min(speed, v + accel, math.sqrt(2 * accel * (distance - s)))
            s = min(distance, s + v)
            f = s / distance
            self.fix(lat0 + f * (lat - lat0), lon0 + f * (lon - lon0), v)
        self.lat, self.lon = lat, lon
        return self

    def go(self, north_m: float, east_m: float, speed: float) -> "Drive":
        """Relative leg: ``north_m`` north and ``east_m`` east."""
        return self.to(*offset(self.lat, self.lon, north_m, east_m), speed)

    def speed_profile(self, speeds: list[float]) -> "Drive":
        """One fix a second along the current course at each of ``speeds`` (accelerating, braking)."""
        for v in speeds:
            step = v  # metres in this second
            rad = math.radians(self.course)
            self.lat, self.lon = offset(self.lat, self.lon, step * math.cos(rad), step * math.sin(rad))
            self.fix(self.lat, self.lon, v)
        return self

    def turn(self, course: float, speed: float) -> "Drive":
        """One second turning to ``course`` at ``speed``: the truck moves along the mean heading."""
        mean = self.course + ((course - self.course + 180) % 360 - 180) / 2
        rad = math.radians(mean)
        self.lat, self.lon = offset(self.lat, self.lon, speed * math.cos(rad), speed * math.sin(rad))
        self.course = course % 360
        self.fix(self.lat, self.lon, speed)
        return self

    def stay(self, seconds: int, noise_m: float = 0.0, rng: random.Random | None = None,
             signals: dict[str, float] | None = None) -> "Drive":
        """Stand still for ``seconds`` (a fix a second, scattered by up to ``noise_m``), with CAN signals."""
        rng = rng or random.Random(0)
        for _ in range(seconds):
            for name, value in (signals or {}).items():
                self.signal(name, value, at=self.t + 0.5)
            r, a = noise_m * math.sqrt(rng.random()), rng.uniform(0, 2 * math.pi)
            lat, lon = offset(self.lat, self.lon, r * math.cos(a), r * math.sin(a))
            self.fix(lat, lon, rng.uniform(0.0, 0.3) if noise_m else 0.0, rng.uniform(0, 360) if noise_m else None)
        return self

    def signal(self, name: str, value: float, at: float | None = None) -> "Drive":
        self.records.append(Record(utc=self.t if at is None else at, mono=0.0, data=Signal(name=name, value=value)))
        return self

    def ignition(self, on: bool) -> "Drive":
        self.records.append(Record(utc=self.t, mono=self.t, data=Status(type="ignition", attrs={"on": on})))
        return self


def circle(fid: str, ftype: str, lat: float, lon: float, radius_m: float, **props) -> dict:
    return {"type": "Feature", "id": fid, "properties": {"type": ftype, "radius_m": radius_m, **props},
            "geometry": {"type": "Point", "coordinates": [lon, lat]}}


def square(fid: str, ftype: str, lat: float, lon: float, half_m: float, **props) -> dict:
    """An axis-aligned square of side 2 * half_m centred on (lat, lon)."""
    corners = [offset(lat, lon, n * half_m, e * half_m) for n, e in ((-1, -1), (-1, 1), (1, 1), (1, -1), (-1, -1))]
    return {"type": "Feature", "id": fid, "properties": {"type": ftype, **props},
            "geometry": {"type": "Polygon", "coordinates": [[[lo, la] for la, lo in corners]]}}


def collection(*features: dict) -> bytes:
    return json.dumps({"type": "FeatureCollection", "features": list(features)}).encode()


def run(processors, records: list[Record]) -> list[Record]:
    """Every record through ``processors`` in order, one at a time as live; what would be buffered."""
    pipeline = Pipeline(processors, sink=None)
    return [out for record in records for out in pipeline.process_all([record])]


def events(records: list[Record]) -> list[tuple[str, dict]]:
    """(type, attrs + time) of the event records."""
    return [(r.data.type, {**r.data.attrs, "utc": r.utc}) for r in records if r.kind == "event"]
