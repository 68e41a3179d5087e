"""The physics of a synthetic delivery drive: a route, a speed profile with stops, and the engine.

Everything here is the *truth*: where the vehicle really is, how fast it really goes, what the
engine really does, sampled every 0.1 s. :mod:`sim.generate` turns it into what sensors report
(GPS with noise and dropouts, J1939 frames) and into the events a correct agent must find.

The route is a polyline in a local metric frame; its corners are rounded (so the heading turns
smoothly, as a vehicle's does) and the speed is capped by a lateral acceleration limit in curves.
The speed along the route comes from a forward pass (acceleration limit) and a backward pass
(deceleration limit) over a 1 m grid, the standard way to build a time-optimal profile under
acceleration bounds; stops are points where the speed must be zero, held for their dwell time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

# IUGG mean Earth radius R1 for WGS 84, metres (the same sphere as agent.geo).
EARTH_RADIUS_M = 6_371_008.8
M_PER_DEG = math.pi * EARTH_RADIUS_M / 180.0
GRID_M = 1.0  # resolution of the speed profile along the route
TICK_S = 0.1  # resolution of the truth in time (the CAN frame period)
CORNER_CUT_M = 12.0  # how far before and after a waypoint the corner is rounded
LATERAL_MPS2 = 1.5  # comfortable cornering for a loaded van (well below harsh-cornering thresholds)


@dataclass(frozen=True)
class Stop:
    """The vehicle stands still at ``at_m`` along the route for ``dwell_s`` seconds."""

    at_m: float
    dwell_s: float
    name: str | None = None  # a customer (None: a traffic light or junction)
    engine_on: bool = True


@dataclass(frozen=True)
class Profile:
    """Driving limits along the route. ``zones`` are (from_m, to_m, speed_mps) caps or targets."""

    cruise_mps: list[float]  # per route segment between waypoints
    accel_mps2: float = 1.2  # a loaded delivery van pulling away
    decel_mps2: float = 1.6  # planned braking
    harsh_brake_at_m: float | None = None
    harsh_decel_mps2: float = 5.5
    harsh_to_mps: float = 2.5  # speed the harsh braking ends at
    zones: list[tuple[float, float, float]] = field(default_factory=list)


class Route:
    """A polyline of (lat, lon) waypoints, rounded at its corners, in a local east/north frame (metres)."""

    def __init__(self, waypoints: list[tuple[float, float]]) -> None:
        if len(waypoints) < 2:
            raise ValueError("a route needs at least two waypoints")
        self.lat0, self.lon0 = waypoints[0]
        self._cos = math.cos(math.radians(self.lat0))
        raw = np.array([self.to_xy(lat, lon) for lat, lon in waypoints])
        keep = np.concatenate(([True], np.hypot(*np.diff(raw, axis=0).T) > 0.5))
        raw = raw[keep]
        if len(raw) < 2:
            raise ValueError("a route needs two waypoints at least a metre apart")
        self.waypoint_m = np.concatenate(([0.0], np.cumsum(np.hypot(*np.diff(raw, axis=0).T))))
        smooth = _round_corners(raw)
        seg = np.hypot(*np.diff(smooth, axis=0).T)
        cum = np.concatenate(([0.0], np.cumsum(seg)))
        self.length_m = float(cum[-1])
        self.s = np.arange(0.0, self.length_m + GRID_M / 2, GRID_M)
        self.s[-1] = min(self.s[-1], self.length_m)
        self.x = np.interp(self.s, cum, smooth[:, 0])
        self.y = np.interp(self.s, cum, smooth[:, 1])
        heading = np.unwrap(np.arctan2(np.gradient(self.x), np.gradient(self.y)))  # clockwise from north
        self.heading = heading
        curvature = np.abs(np.gradient(heading, self.s))
        self.curvature = np.convolve(curvature, np.ones(7) / 7, mode="same")
        # Distances along the rounded route where each original waypoint lies (for per-segment speeds).
        self.waypoint_s = self.waypoint_m * self.length_m / self.waypoint_m[-1]

    def to_xy(self, lat: float, lon: float) -> tuple[float, float]:
        return (lon - self.lon0) * M_PER_DEG * self._cos, (lat - self.lat0) * M_PER_DEG

    def to_latlon(self, x, y):
        """Local metres -> (lat, lon) degrees; works on arrays."""
        return self.lat0 + np.asarray(y) / M_PER_DEG, self.lon0 + np.asarray(x) / (M_PER_DEG * self._cos)

    def segment_of(self, s_m: np.ndarray) -> np.ndarray:
        """Index of the original waypoint segment that each distance lies on."""
        return np.clip(np.searchsorted(self.waypoint_s, s_m, side="right") - 1, 0, len(self.waypoint_s) - 2)


def _round_corners(points: np.ndarray) -> np.ndarray:
    """Round every corner within CORNER_CUT_M of it (Chaikin corner cutting, 5 rounds)."""
    dense = [points[0]]
    for i in range(1, len(points) - 1):
        before, corner, after = points[i - 1], points[i], points[i + 1]
        cut_in = min(CORNER_CUT_M, np.hypot(*(corner - before)) / 2.5)
        cut_out = min(CORNER_CUT_M, np.hypot(*(after - corner)) / 2.5)
        dense.append(corner + (before - corner) / np.hypot(*(before - corner)) * cut_in)
        dense.append(corner)
        dense.append(corner + (after - corner) / np.hypot(*(after - corner)) * cut_out)
    dense.append(points[-1])
    pts = np.array(dense)
    for _ in range(5):
        q = 0.75 * pts[:-1] + 0.25 * pts[1:]
        r = 0.25 * pts[:-1] + 0.75 * pts[1:]
        pts = np.vstack([pts[:1], np.column_stack([q, r]).reshape(-1, 2), pts[-1:]])
    return pts


@dataclass
class Truth:
    """The true state every TICK_S seconds from ignition on."""

    t: np.ndarray  # seconds from the start
    s: np.ndarray  # metres along the route
    speed: np.ndarray  # m/s
    accel: np.ndarray  # m/s^2 along the track
    heading: np.ndarray  # degrees clockwise from north, [0, 360)
    lat: np.ndarray
    lon: np.ndarray
    engine_on: np.ndarray  # bool
    rpm: np.ndarray
    fuel_lph: np.ndarray
    stops: list[tuple[Stop, float, float]]  # (stop, arrive_t, depart_t)
    engine_start_t: float
    engine_off_t: float


def speed_limits(route: Route, profile: Profile) -> tuple[np.ndarray, np.ndarray]:
    """Per grid point: the speed cap (cruise, zones, curves, harsh stop) and the allowed deceleration."""
    cruise = np.asarray(profile.cruise_mps)[route.segment_of(route.s)]
    vmax = cruise.copy()
    for start, end, speed in profile.zones:
        inside = (route.s >= start) & (route.s <= end)
        vmax[inside] = speed
    with np.errstate(divide="ignore"):
        curve = np.sqrt(LATERAL_MPS2 / np.maximum(route.curvature, 1e-9))
    vmax = np.minimum(vmax, curve)
    decel = np.full_like(route.s, profile.decel_mps2)
    if profile.harsh_brake_at_m is not None:
        i = int(round(profile.harsh_brake_at_m / GRID_M))
        vmax[i] = min(vmax[i], profile.harsh_to_mps)
        decel[max(0, i - 40) : i + 1] = profile.harsh_decel_mps2
    return vmax, decel


def speed_profile(route: Route, profile: Profile, stop_at: list[int]) -> np.ndarray:
    """Speed at each grid point: as fast as the caps allow, accelerating and braking within limits,
    zero at both ends and at every index in ``stop_at``."""
    vmax, decel = speed_limits(route, profile)
    zero = np.zeros(len(route.s), dtype=bool)
    zero[[0, len(route.s) - 1, *stop_at]] = True
    v = np.minimum(vmax, np.where(zero, 0.0, np.inf))
    ds = np.diff(route.s)  # GRID_M, but the last cell is shorter
    for i in range(1, len(v)):
        v[i] = min(v[i], math.sqrt(v[i - 1] ** 2 + 2 * profile.accel_mps2 * ds[i - 1]))
    for i in range(len(v) - 2, -1, -1):
        v[i] = min(v[i], math.sqrt(v[i + 1] ** 2 + 2 * decel[i] * ds[i]))
    return v


def simulate(route: Route, profile: Profile, stops: list[Stop], pre_idle_s: float, post_park_s: float,
             engine_start_s: float = 3.0) -> Truth:
    """The drive: ignition on at 0, engine start at ``engine_start_s``, stand ``pre_idle_s`` more,
    drive the route with its stops, stand ``post_park_s`` at the end, engine off."""
    stop_index = [int(round(stop.at_m / GRID_M)) for stop in stops]
    v = speed_profile(route, profile, stop_index)
    # Knots (time, distance, speed) with constant acceleration up to the next knot: each 1 m cell
    # is driven at the acceleration that takes v[i-1] to v[i]; a stop is a plateau of its dwell.
    knots: list[tuple[float, float, float, float]] = [(0.0, 0.0, 0.0, 0.0)]  # (t, s, v, accel)
    t = engine_start_s + pre_idle_s
    dwell_at = dict(zip(stop_index, stops))
    visits: list[tuple[Stop, float, float]] = []
    for i in range(1, len(route.s)):
        ds = route.s[i] - route.s[i - 1]
        knots.append((t, route.s[i - 1], v[i - 1], (v[i] ** 2 - v[i - 1] ** 2) / (2 * ds)))
        t += 2 * ds / (v[i] + v[i - 1])
        if i in dwell_at:
            knots.append((t, route.s[i], 0.0, 0.0))
            visits.append((dwell_at[i], t, t + dwell_at[i].dwell_s))
            t += dwell_at[i].dwell_s
    knots.append((t, route.s[-1], 0.0, 0.0))
    arrive_end = t
    engine_off = arrive_end + post_park_s
    end = engine_off + 2.0  # the ECU keeps sending for a moment after the engine stops
    ticks = np.arange(0.0, end + TICK_S / 2, TICK_S)
    kt, ks, kv, ka = (np.array(column) for column in zip(*knots))
    j = np.searchsorted(kt, ticks, side="right") - 1
    tau = ticks - kt[j]
    speed = np.maximum(0.0, kv[j] + ka[j] * tau)
    s = np.minimum(ks[j] + kv[j] * tau + 0.5 * ka[j] * tau**2, route.s[-1])
    accel = np.where(speed > 0, ka[j], 0.0)
    heading = np.degrees(np.interp(s, route.s, route.heading)) % 360.0
    lat, lon = route.to_latlon(np.interp(s, route.s, route.x), np.interp(s, route.s, route.y))
    engine_on = (ticks >= engine_start_s) & (ticks < engine_off)
    for stop, arrive, depart in visits:
        if not stop.engine_on:
            engine_on &= ~((ticks > arrive + 5) & (ticks < depart - 5))
    rpm, fuel = engine(speed, accel, engine_on)
    return Truth(ticks, s, speed, accel, heading, lat, lon, engine_on, rpm, fuel, visits, engine_start_s, engine_off)


# A 3.5 t delivery van: wheel radius 0.35 m, final drive 4.1, six gears (typical light-commercial values).
_WHEEL_RADIUS_M = 0.35
_FINAL_DRIVE = 4.1
_GEARS = (5.0, 2.8, 1.8, 1.3, 1.0, 0.8)
_IDLE_RPM = 680.0
_MASS_KG = 3500.0
_CDA_M2 = 2.8  # drag area of a high-roof van
_CRR = 0.01  # rolling resistance of truck tyres on asphalt
_L_PER_KWH = 0.26  # diesel: about 220 g/kWh at 835 g/L
_IDLE_LPH = 1.1


def engine(speed: np.ndarray, accel: np.ndarray, engine_on: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Engine speed (rpm) and fuel rate (L/h) for a speed trace: up-shift above 2,000 rpm, down below 1,100."""
    rpm = np.zeros_like(speed)
    fuel = np.zeros_like(speed)
    gear = 0
    per_mps = 60.0 / (2 * math.pi * _WHEEL_RADIUS_M) * _FINAL_DRIVE
    for i, (v, a, on) in enumerate(zip(speed, accel, engine_on)):
        if not on:
            gear = 0
            continue
        if v < 1.0:
            gear = 0
        while gear < len(_GEARS) - 1 and v * per_mps * _GEARS[gear] > 2000:
            gear += 1
        while gear > 0 and v * per_mps * _GEARS[gear] < 1100:
            gear -= 1
        rpm[i] = max(_IDLE_RPM, v * per_mps * _GEARS[gear])
        power_kw = (_MASS_KG * (a + 9.81 * _CRR) * v + 0.5 * 1.2 * _CDA_M2 * v**3) / 1000.0
        # Engine braking cuts fuel; otherwise idle consumption plus the power delivered.
        fuel[i] = 0.0 if (power_kw < 0 and v > 3) else _IDLE_LPH + max(0.0, power_kw) * _L_PER_KWH
    return rpm, fuel
