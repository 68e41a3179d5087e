"""``telematics-sim generate``: a synthetic delivery drive with its ground truth.

From a route (waypoints or a GeoJSON LineString) and a plan (customer stops, a traffic light, a
hard braking, a speed zone, GPS dropouts) it writes four files next to each other:

- ``NAME.nmea``: 1 Hz RMC, VTG, GGA and GSA as a u-blox receiver sends them, with a few metres of
  correlated position noise, Doppler speed noise, realistic HDOP and satellite counts;
- ``NAME.candump.log``: ``candump -L`` J1939 frames: EEC1 engine speed and CCVS1 wheel-based
  speed at 10 Hz, LFE1 fuel rate at 1 Hz (SAE J1939-71 layouts), from an engine and gearbox model;
- ``NAME.geojson``: the fence set (depot, customer stops, the speed zone) in the agent's format;
- ``NAME.truth.json``: the events a correct agent must report, each with a time window, and the
  edge-logic settings the truth assumes.

The same seed and plan give the same files, byte for byte. Without a route, the bundled delivery
drive in Delft (the Netherlands) is generated; ``sim/drives/delivery_route.*`` is that output.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import shapely
from shapely.geometry import LineString, Point, mapping

from agent.cli_base import CommandError
from agent.decode.j1939 import make_id
from agent.record import iso_utc
from sim import nmea_writer
from sim.drive_model import M_PER_DEG, TICK_S, Profile, Route, Stop, Truth, simulate

# The bundled route: Delft, the Netherlands, west to north-east across the south of the old town.
DELFT_ROUTE = [
    (52.00600, 4.34750),
    (52.00600, 4.35300),
    (52.00820, 4.35330),
    (52.00830, 4.36000),
    (52.01050, 4.36030),
    (52.01060, 4.36700),
]
DEFAULT_START = "2026-03-02T08:30:00Z"
KMH = 1 / 3.6

# The edge-logic settings (agent config keys under ``edge``) the ground truth assumes. Every planned
# episode is at least 20 s (or 1.5 m/s^2) away from these thresholds, so noise cannot flip it.
EDGE_SETTINGS = {
    "stops": {"radius_m": 30.0, "min_duration_s": 60.0},
    "idling": {"min_duration_s": 120.0, "still_speed_mps": 1.0},
    "trips": {"moving_speed_mps": 2.0},
    "geofences": {"hysteresis_m": 10.0, "hysteresis_s": 3.0, "dwell_s": 600.0, "approach_m": 300.0},
    "driving": {"vehicle": "van", "harsh_brake_mps2": 3.5, "harsh_accel_mps2": 3.0, "harsh_corner_mps2": 3.0,
                "min_speed_kmh": 15.0, "overspeed_min_s": 10.0, "overspeed_end_s": 5.0},
}
CUSTOMER_RADIUS_M = 40.0
APPROACH_FROM_REST_S = 20.0  # window for an approach that begins by pulling away inside its radius
YARD_DEPTH_M = 120.0  # the yard reaches this far ahead of its gate along the route
YARD_HALF_WIDTH_M = 30.0
CUSTOMER_DWELL_S = 120.0  # per-fence geofence_dwell threshold of the customer stops


@dataclass
class Plan:
    """What happens on the drive. Positions are fractions (0-1) of the route's length."""

    stops: list[tuple[float, float, str | None]]  # (at, dwell_s, customer name or None for a traffic light)
    harsh_brake_at: float | str | None = None  # or AUTO
    speed_zone: tuple[float, float, float] | str | None = None  # (from, to, limit_kmh) or AUTO; driven 12 km/h over
    dropouts: list[tuple[float, float]] = field(default_factory=list)  # (at, seconds without a fix)
    # (at, dwell_s): the van waits with its GPS antenna on the back edge of a yard fence, then drives in.
    gate: tuple[float, float] | None = None
    cruise_kmh: tuple[float, float] = (38.0, 48.0)  # each route segment's cruise speed is drawn from this
    pre_idle_s: float = 20.0
    post_park_s: float = 10.0


def bundled_plan() -> Plan:
    """The delivery drive shipped in sim/drives: about 7.5 minutes, two customers, a traffic light."""
    return Plan(
        stops=[(0.2, 12.0, None), (0.3, 80.0, "Customer A"), (0.685, 140.0, "Customer B")],
        harsh_brake_at=0.43,
        speed_zone=(0.78, 0.95, 30.0),
        pre_idle_s=15.0,
    )


def default_plan() -> Plan:
    """For a route of the user's: a traffic light, two customers, and (placed on the route's
    straightest stretches by :func:`build`) a hard braking and a 30 km/h zone."""
    return Plan(stops=[(0.12, 15.0, None), (0.25, 90.0, "Customer A"), (0.5, 150.0, "Customer B")],
                harsh_brake_at=AUTO, speed_zone=AUTO)


AUTO = "auto"  # Plan.harsh_brake_at / Plan.speed_zone: choose a straight stretch of the route
_ZONE_LIMIT_KMH = 30.0
_ZONE_MIN_RUN_M = 320.0  # a zone of 260 m or more: over 20 s at 42 km/h, well past overspeed_min_s
_HARSH_MIN_RUN_M = 150.0


def _place_auto(plan: Plan, route: Route) -> Plan:
    """Resolve AUTO positions: the zone on the longest straight stretch away from stops and the route's
    ends, the hard braking 120 m into the longest other one; left out where the route has none."""
    straight = np.sqrt(1.5 / np.maximum(route.curvature, 1e-9)) >= (_ZONE_LIMIT_KMH + 12) / 3.6
    keep_clear = (route.s < 150) | (route.s > route.length_m - 150)
    for at, _, _ in plan.stops:
        keep_clear |= np.abs(route.s - at * route.length_m) < 150
    from_runs = sorted(_runs(straight & ~keep_clear), key=lambda r: r[0] - r[1])
    runs = [(route.s[a], route.s[b - 1]) for a, b in from_runs]
    if plan.speed_zone == AUTO:
        plan.speed_zone = None
        if runs and runs[0][1] - runs[0][0] >= _ZONE_MIN_RUN_M:
            a, b = runs.pop(0)
            plan.speed_zone = ((a + 30) / route.length_m, (b - 30) / route.length_m, _ZONE_LIMIT_KMH)
    if plan.harsh_brake_at == AUTO:
        plan.harsh_brake_at = None
        if runs and runs[0][1] - runs[0][0] >= _HARSH_MIN_RUN_M:
            plan.harsh_brake_at = (runs[0][0] + 120) / route.length_m
    return plan


@dataclass
class Drive:
    """A generated drive: the truth, the fixes as reported, and the plan's resolved places."""

    route: Route
    plan: Plan
    truth: Truth
    start_utc: float
    fences: list[dict]
    zone_m: tuple[float, float, float] | None
    dropouts_s: list[tuple[float, float]]
    fixes: list[dict]
    name: str = "drive"


def build(waypoints: list[tuple[float, float]], plan: Plan, seed: int = 1, start: str = DEFAULT_START) -> Drive:
    """Simulate the drive and its GPS fixes. Raises ValueError for an impossible plan."""
    rng = np.random.default_rng(seed)
    route = Route(waypoints)
    plan = _place_auto(plan, route)
    length = route.length_m
    places = sorted(plan.stops + ([(plan.gate[0], plan.gate[1], None)] if plan.gate else []))
    stops = [Stop(at * length, dwell, name) for at, dwell, name in places]
    if any(not 0.02 < at < 0.98 for at, _, _ in places):
        raise ValueError("stops must lie between 2% and 98% of the route")
    cruise = list(rng.uniform(plan.cruise_kmh[0], plan.cruise_kmh[1], len(route.waypoint_s) - 1) * KMH)
    zone_m = None
    zones = []
    if plan.speed_zone is not None:
        a, b, limit = plan.speed_zone
        zone_m = (a * length, b * length, limit)
        zones.append((a * length, b * length, (limit + 12.0) * KMH))
    profile = Profile(cruise_mps=cruise, zones=zones,
                      harsh_brake_at_m=None if plan.harsh_brake_at is None else plan.harsh_brake_at * length)
    truth = simulate(route, profile, stops, plan.pre_idle_s, plan.post_park_s)
    start_utc = _dt.datetime.fromisoformat(start.replace("Z", "+00:00")).timestamp()
    dropouts = [(float(np.interp(at * length, truth.s, truth.t)), seconds) for at, seconds in plan.dropouts]
    fences = _fences(route, truth, zone_m, None if plan.gate is None else plan.gate[0] * length)
    fixes = _gps(truth, rng, dropouts)
    return Drive(route, plan, truth, start_utc, fences, zone_m, dropouts, fixes)


# ---------------------------------------------------------------------------------------------- GPS


def _gps(truth: Truth, rng: np.random.Generator, dropouts: list[tuple[float, float]]) -> list[dict]:
    """One fix per second as a receiver reports it (None where it has no fix)."""
    step = round(1 / TICK_S)
    idx = np.arange(0, len(truth.t), step)
    n = len(idx)
    # Position error: first-order Gauss-Markov per axis, sigma 1.5 m, 30 s correlation time
    # (typical of a consumer L1 receiver with open sky).
    phi = math.exp(-1 / 30)
    noise = np.zeros((n, 3))
    noise[0] = rng.normal(0, [1.5, 1.5, 3.0])
    for k in range(1, n):
        noise[k] = phi * noise[k - 1] + math.sqrt(1 - phi**2) * rng.normal(0, [1.5, 1.5, 3.0])
    hdop = np.clip(0.9 + 0.25 * np.sin(np.arange(n) / 47.0) + rng.normal(0, 0.03, n), 0.6, 2.5)
    sats = np.clip(np.round(12.5 - 3 * hdop + rng.normal(0, 0.4, n)), 5, 12).astype(int)
    sky = [2, 5, 6, 12, 13, 15, 18, 20, 24, 25, 29, 31]
    fixes = []
    course = float(truth.heading[0])
    for k, i in enumerate(idx):
        t = float(truth.t[i])
        if any(t0 <= t < t0 + seconds for t0, seconds in dropouts):
            fixes.append({"t": t, "valid": False})
            continue
        cos_lat = math.cos(math.radians(truth.lat[i]))
        lat = truth.lat[i] + noise[k, 1] / M_PER_DEG
        lon = truth.lon[i] + noise[k, 0] / (M_PER_DEG * cos_lat)
        v = float(truth.speed[i])
        # Doppler speed: about 0.05 m/s noise when moving; receivers hold 0 when static, give or take.
        speed = max(0.0, v + rng.normal(0, 0.05)) if v > 0.3 else abs(rng.normal(0, 0.03))
        if v > 1.0:
            course = (float(truth.heading[i]) + rng.normal(0, 0.5)) % 360.0
        fixes.append({
            "t": t, "valid": True, "lat": float(lat), "lon": float(lon), "alt": 1.5 + noise[k, 2],
            "speed": speed, "course": course, "hdop": round(float(hdop[k]), 2), "sats": int(sats[k]),
            "prns": sky[: int(sats[k])],
        })
    return fixes


def nmea_lines(drive: Drive) -> list[str]:
    """The NMEA capture: RMC, VTG, GGA, GSA per epoch (u-blox order and number formats)."""
    out = [
        f"# Name: {drive.name}\n",
        "# Generated by telematics-sim generate: a synthetic delivery drive, 1 Hz, RMC VTG GGA GSA\n",
    ]
    for fix in drive.fixes:
        utc = drive.start_utc + fix["t"]
        hms, date = nmea_writer.hhmmss(utc), nmea_writer.ddmmyy(utc)
        if not fix["valid"]:
            out += [
                nmea_writer.sentence("GPRMC", hms, "V", "", "", "", "", "", "", date, "", "", "N"),
                nmea_writer.sentence("GPVTG", "", "T", "", "M", "", "N", "", "K", "N"),
                nmea_writer.sentence("GPGGA", hms, "", "", "", "", 0, "00", "99.99", "", "", "", "", "", ""),
                nmea_writer.sentence("GPGSA", "A", 1, *[""] * 12, "99.99", "99.99", "99.99"),
            ]
            continue
        lat, ns = nmea_writer.lat_field(fix["lat"])
        lon, ew = nmea_writer.lon_field(fix["lon"])
        knots = fix["speed"] * nmea_writer.KNOTS_PER_MPS
        course = f"{fix['course']:.2f}"
        hdop = fix["hdop"]
        prns = [f"{p:02d}" for p in fix["prns"]] + [""] * (12 - len(fix["prns"]))
        out += [
            nmea_writer.sentence("GPRMC", hms, "A", lat, ns, lon, ew, f"{knots:.3f}", course, date, "", "", "A"),
            nmea_writer.sentence("GPVTG", course, "T", "", "M", f"{knots:.3f}", "N", f"{fix['speed'] * 3.6:.3f}", "K", "A"),
            nmea_writer.sentence("GPGGA", hms, lat, ns, lon, ew, 1, f"{fix['sats']:02d}", f"{hdop:.2f}",
                                 f"{fix['alt']:.1f}", "M", "46.9", "M", "", ""),
            nmea_writer.sentence("GPGSA", "A", 3, *prns, f"{hdop * 1.7:.2f}", f"{hdop:.2f}", f"{hdop * 1.4:.2f}"),
        ]
    return out


# ---------------------------------------------------------------------------------------------- CAN

# SAE J1939-71 parameter groups (PGN, priority) and the engine controller's source address.
EEC1 = (61444, 3)  # Electronic Engine Controller 1: SPN 190 engine speed, 0.125 rpm/bit, bytes 4-5
CCVS1 = (65265, 6)  # Cruise Control/Vehicle Speed 1: SPN 84 wheel-based speed, 1/256 km/h per bit, bytes 2-3
LFE1 = (65266, 6)  # Fuel Economy (Liquid): SPN 183 fuel rate, 0.05 L/h per bit, bytes 1-2
ENGINE_SA = 0x00


def can_lines(drive: Drive, channel: str = "can0") -> list[str]:
    """``candump -L`` lines: EEC1 and CCVS1 every 100 ms, LFE1 every second, while the ignition is on."""
    truth = drive.truth
    out = []
    eec1, ccvs1, lfe1 = (make_id(pgn, ENGINE_SA, prio) for pgn, prio in (EEC1, CCVS1, LFE1))
    for i, t in enumerate(truth.t):
        stamp = drive.start_utc + float(t)
        rpm = int(round(truth.rpm[i] / 0.125))
        torque = 125 + (int(min(100, max(0, truth.fuel_lph[i] * 4))) if truth.engine_on[i] else 0)
        # EEC1 byte 1: torque mode 0 (low idle governor) with the reserved bits set, as ECUs send it.
        frames = [(eec1, bytes([0xF0, torque, torque, rpm & 0xFF, rpm >> 8, ENGINE_SA, 0xFF, 0xFF]))]
        wheel = int(round(truth.speed[i] * 3.6 * 256))
        frames.append((ccvs1, bytes([0xFF, wheel & 0xFF, wheel >> 8, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF])))
        if i % round(1 / TICK_S) == 0:
            fuel = int(round(truth.fuel_lph[i] / 0.05))
            frames.append((lfe1, bytes([fuel & 0xFF, fuel >> 8, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF])))
        for k, (can_id, data) in enumerate(frames):
            # Frames of one tick leave a few hundred microseconds apart, as on a real bus.
            out.append(f"({stamp + k * 0.0004:.6f}) {channel} {can_id:08X}#{data.hex().upper()}\n")
    return out


# ------------------------------------------------------------------------------------------- fences


def _fences(route: Route, truth: Truth, zone_m: tuple[float, float, float] | None, gate_m: float | None) -> list[dict]:
    """GeoJSON features: a depot square at the route's end, a circle per customer, the speed zone,
    and the yard whose back edge runs through where the van waits at its gate."""
    features = []
    end_x, end_y = float(route.x[-1]), float(route.y[-1])
    depot = Point(end_x, end_y).buffer(40.0, cap_style="square")
    features.append(_feature("depot", "Depot", "depot", _to_lonlat(route, depot)))
    for n, (stop, _, _) in enumerate(s for s in truth.stops if s[0].name):
        i = int(round(stop.at_m))
        # The customer's door is 8 m to the right of where the van parks.
        h = route.heading[min(i, len(route.heading) - 1)]
        cx = route.x[i] + 8.0 * math.cos(h)
        cy = route.y[i] - 8.0 * math.sin(h)
        lat, lon = route.to_latlon(cx, cy)
        features.append({
            "type": "Feature",
            "id": f"customer-{chr(ord('a') + n)}",
            "geometry": {"type": "Point", "coordinates": [round(float(lon), 7), round(float(lat), 7)]},
            "properties": {"name": stop.name, "type": "customer_stop", "radius_m": CUSTOMER_RADIUS_M,
                           "approach_m": EDGE_SETTINGS["geofences"]["approach_m"], "dwell_s": CUSTOMER_DWELL_S},
        })
    if zone_m is not None:
        a, b, limit = zone_m
        keep = (route.s >= a) & (route.s <= b)
        line = LineString(np.column_stack([route.x[keep], route.y[keep]]))
        zone = line.buffer(25.0, cap_style="flat").simplify(0.5)
        features.append(_feature(f"zone-{limit:g}", f"{limit:g} km/h zone", "speed_zone", _to_lonlat(route, zone),
                                 speed_limit_kmh=limit))
    if gate_m is not None:
        i = int(round(gate_m))
        h = route.heading[i]
        ahead, left = np.array([math.sin(h), math.cos(h)]), np.array([-math.cos(h), math.sin(h)])
        spot = np.array([route.x[i], route.y[i]])
        corners = [spot + YARD_HALF_WIDTH_M * left, spot - YARD_HALF_WIDTH_M * left,
                   spot - YARD_HALF_WIDTH_M * left + YARD_DEPTH_M * ahead, spot + YARD_HALF_WIDTH_M * left + YARD_DEPTH_M * ahead]
        yard = shapely.Polygon(corners)
        features.append(_feature("yard", "Yard", "depot", _to_lonlat(route, yard)))
    return features


def _to_lonlat(route: Route, geom):
    return shapely.transform(geom, lambda xy: np.column_stack(route.to_latlon(xy[:, 0], xy[:, 1])[::-1]))


def _feature(fid: str, name: str, ftype: str, geom, **props) -> dict:
    geometry = json.loads(json.dumps(mapping(shapely.set_precision(geom, 1e-7))))
    return {"type": "Feature", "id": fid, "geometry": geometry, "properties": {"name": name, "type": ftype, **props}}


def fence_collection(drive: Drive) -> dict:
    return {"type": "FeatureCollection", "features": drive.fences}


# ------------------------------------------------------------------------------------- ground truth


class AmbiguousPlan(ValueError):
    """An episode of the plan lies so close to a threshold that GPS noise could decide it."""


def _local_fences(drive: Drive) -> list[tuple[dict, object]]:
    """Each fence with its geometry in the route's local metres (circles as 256-gons: < 1 mm off)."""
    out = []
    for feature in drive.fences:
        geom = feature["geometry"]
        if geom["type"] == "Point":
            x, y = drive.route.to_xy(geom["coordinates"][1], geom["coordinates"][0])
            local = Point(x, y).buffer(feature["properties"]["radius_m"], quad_segs=64)
        else:
            lonlat = shapely.geometry.shape(geom)
            local = shapely.transform(lonlat, lambda xy: np.column_stack(drive.route.to_xy(xy[:, 1], xy[:, 0])))
        out.append((feature, local))
    return out


def ground_truth(drive: Drive) -> dict:
    """The events a correct agent with :data:`EDGE_SETTINGS` reports for this drive, with time windows.

    Raises :class:`AmbiguousPlan` when an episode is too close to a threshold to be certain.
    """
    tr, route = drive.truth, drive.route
    step = round(1 / TICK_S)
    idx = np.arange(0, len(tr.t), step)
    t, v = tr.t[idx], tr.speed[idx]
    x = np.interp(tr.s[idx], route.s, route.x)
    y = np.interp(tr.s[idx], route.s, route.y)
    lat, lon = tr.lat[idx], tr.lon[idx]
    events: list[dict] = []
    settings = EDGE_SETTINGS

    def at(k: int) -> tuple[float, float]:
        return round(float(lat[k]), 6), round(float(lon[k]), 6)

    def event(kind: str, time: float, earliest: float, latest: float, k: int, needs=(), tolerance=None, **attrs):
        la, lo = at(k)
        item = {"type": kind, "time": time, "window": [earliest, latest], "lat": la, "lon": lo, **attrs}
        if tolerance:
            item["tolerance"] = tolerance
        item["needs"] = list(needs)
        events.append(item)

    def k_of(time: float) -> int:
        return int(np.clip(np.searchsorted(t, time - 1e-6), 0, len(t) - 1))

    moving = np.nonzero(v > settings["trips"]["moving_speed_mps"])[0]
    event("trip_start", tr.engine_start_t, tr.engine_start_t, float(t[moving[0]]) + 2, 0)
    event("trip_end", tr.engine_off_t, tr.engine_off_t - 1, tr.engine_off_t + 3, len(t) - 1, needs=["can"])

    local = _local_fences(drive)
    customer_of = {}
    for stop, arrive, depart in tr.stops:
        dwell = depart - arrive
        k = k_of(arrive)
        inside = [f["id"] for f, g in local if f["properties"]["type"] == "customer_stop" and g.contains(Point(x[k], y[k]))]
        customer_of[stop] = inside[0] if inside else None
        _clear(f"the stop at {stop.at_m:.0f} m", dwell, settings["stops"]["min_duration_s"], 20)
        if dwell >= settings["stops"]["min_duration_s"]:
            ids = {"geofence_id": customer_of[stop]} if customer_of[stop] else {}
            event("stop_arrive", arrive, arrive - 3, arrive + 2, k, **ids)
            event("stop_depart", depart, depart - 1, depart + 5, k_of(depart), tolerance={"dwell_s": 5.0},
                  dwell_s=round(float(dwell), 1), **ids)
        if stop.engine_on:
            _clear(f"the idling at {stop.at_m:.0f} m", dwell, settings["idling"]["min_duration_s"], 20)
            if dwell >= settings["idling"]["min_duration_s"]:
                event("idle_start", arrive, arrive - 3, arrive + 2, k, needs=["can"])
                event("idle_end", depart, depart - 1, depart + 5, k_of(depart), needs=["can"])

    # Harsh driving, from the speed and heading change over each second (what a 1 Hz agent sees).
    dv = np.diff(v)
    drive_cfg = settings["driving"]
    fast = v[:-1] * 3.6 >= drive_cfg["min_speed_kmh"]
    brake_limit = drive_cfg["harsh_brake_mps2"]
    for start, end in _runs((-dv > brake_limit) & fast):
        peak = float(np.max(-dv[start:end]))
        _clear("a braking", peak, brake_limit, 1.5)
        k = start + int(np.argmax(-dv[start:end]))
        event("harsh_brake", float(t[k + 1]), float(t[start]) - 1, float(t[end]) + 2, k + 1,
              tolerance={"peak_mps2": 1.0}, peak_mps2=round(peak, 2))
    # Seconds that straddle the start or end of a harsh braking belong to it: judge only the others.
    harsh = np.convolve((-dv > brake_limit).astype(int), np.ones(3, dtype=int), mode="same") > 0
    _clear("the strongest ordinary braking", float(np.max(np.where(harsh, 0, -dv))), brake_limit, 1.5)
    _clear("the strongest acceleration", float(np.max(dv)), drive_cfg["harsh_accel_mps2"], 1.5)
    turn = np.radians((np.diff(tr.heading[idx]) + 180.0) % 360.0 - 180.0)
    _clear("the sharpest corner", float(np.max(np.abs(turn) * v[1:])), drive_cfg["harsh_corner_mps2"], 1.0)

    fence_hyst_m = settings["geofences"]["hysteresis_m"]
    fence_hyst_s = settings["geofences"]["hysteresis_s"]
    for feature, geom in local:
        fid, props = feature["id"], feature["properties"]
        inside = shapely.contains_xy(geom, x, y)
        depth = np.where(inside, 1, -1) * shapely.distance(geom.boundary, shapely.points(x, y))
        state = False
        entered = None
        for k in range(len(t)):
            beyond = depth[k] >= fence_hyst_m if not state else depth[k] <= -fence_hyst_m
            if not beyond:
                continue
            held = [j for j in range(k, len(t)) if t[j] <= t[k] + fence_hyst_s]
            if not all((depth[j] >= fence_hyst_m) if not state else (depth[j] <= -fence_hyst_m) for j in held):
                continue
            crossed = k
            while crossed > 0 and (depth[crossed - 1] > 0) == (not state):
                crossed -= 1
            kind = "geofence_exit" if state else "geofence_enter"
            event(kind, float(t[k]), float(t[crossed]) - 1, float(t[k]) + 2, k, geofence_id=fid)
            if not state:
                entered = float(t[k])
            else:
                _dwell(event, props, settings, entered, float(t[k]), k_of, fid)
            state = not state
        if state:
            _dwell(event, props, settings, entered, float(t[-1]), k_of, fid)
        approach = props.get("approach_m")
        if props["type"] == "customer_stop" and approach:
            within = (depth < 0) & (-depth <= approach)
            near = np.nonzero(within & (v >= 1.0))[0]
            if len(near):
                k = int(near[0])
                enter = next((e["time"] for e in events if e["type"] == "geofence_enter" and e.get("geofence_id") == fid), None)
                eta = None if enter is None else round(enter - float(t[k]), 1)
                # Already within reach before it moved (it started there): when the agent calls it
                # approaching depends on how it averages the speed for its ETA, so allow some time;
                # its ETA then rests on that average too: not judged.
                from_rest = k > 0 and bool(within[k - 1])
                latest = float(t[k]) + (APPROACH_FROM_REST_S if from_rest else 3)
                judged = eta is not None and not from_rest
                event("stop_approach", float(t[k]), float(t[k]) - 2, latest, k, geofence_id=fid,
                      tolerance={"eta_s": round(0.5 * eta, 1) if judged else None}, eta_s=eta)
        if props["type"] == "speed_zone":
            over = inside & (v * 3.6 > props["speed_limit_kmh"])
            for start, end in _runs(over):
                duration = float(t[end - 1] - t[start]) + 1.0
                _clear("the overspeed episode", duration, drive_cfg["overspeed_min_s"], 8)
                if duration >= drive_cfg["overspeed_min_s"]:
                    event("overspeed", float(t[start]), float(t[start]) - 1, float(t[start]) + fence_hyst_s + 3, start,
                          geofence_id=fid, tolerance={"peak_kmh": 2.0, "duration_s": fence_hyst_s + 4},
                          peak_kmh=round(float(np.max(v[start:end])) * 3.6, 1), duration_s=round(duration, 1))

    events.sort(key=lambda e: (e["time"], e["type"]))
    for item in events:
        item["time"] = iso_utc(drive.start_utc + item["time"])
        item["window"] = [iso_utc(drive.start_utc + w) for w in item["window"]]
    moving_fix = [f for f in drive.fixes if f["valid"]]
    distance = float(tr.s[-1])
    return {
        "drive": {
            "start": iso_utc(drive.start_utc),
            "end": iso_utc(drive.start_utc + float(tr.t[-1])),
            "duration_s": round(float(tr.t[-1]), 1),
            "distance_m": round(distance, 1),
            "fixes": len(moving_fix),
            "epochs": len(drive.fixes),
            "max_speed_kmh": round(float(np.max(tr.speed)) * 3.6, 1),
        },
        "edge_settings": settings,
        "events": events,
        "stops": [
            {"name": stop.name, "arrive": iso_utc(drive.start_utc + a), "depart": iso_utc(drive.start_utc + d),
             "dwell_s": round(float(d - a), 1), "geofence_id": customer_of.get(stop), "engine_on": stop.engine_on}
            for stop, a, d in tr.stops
        ],
        "dropouts": [{"start": iso_utc(drive.start_utc + t0), "seconds": s} for t0, s in drive.dropouts_s],
        # A correct agent may report these around dropouts; the truth does not judge them.
        "unchecked_types": ["gps_lost", "gps_regained", "gps_silent"] if drive.dropouts_s else [],
    }


def _dwell(event, props, settings, entered, left, k_of, fid) -> None:
    limit = props.get("dwell_s", settings["geofences"]["dwell_s"])
    _clear(f"the time inside {fid}", left - entered, limit, 10)
    if left - entered >= limit:
        when = entered + limit
        event("geofence_dwell", when, when - 2, when + settings["geofences"]["hysteresis_s"] + 3, k_of(when), geofence_id=fid)


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) index pairs of the runs of True in ``mask``."""
    padded = np.concatenate(([False], mask, [False])).astype(int)
    edges = np.diff(padded)
    return list(zip(np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0]))


def _clear(what: str, value: float, threshold: float, margin: float) -> None:
    if abs(value - threshold) < margin:
        raise AmbiguousPlan(f"{what} is {value:.1f}, within {margin:g} of the threshold {threshold:g}: change the plan")


# ------------------------------------------------------------------------------------ files and CLI


def write(drive: Drive, out_dir: str | Path, name: str, can_channel: str = "can0") -> dict[str, Path]:
    """Write NAME.nmea, NAME.candump.log, NAME.geojson and NAME.truth.json into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    drive.name = name
    paths = {
        "nmea": out / f"{name}.nmea",
        "can": out / f"{name}.candump.log",
        "geofences": out / f"{name}.geojson",
        "truth": out / f"{name}.truth.json",
    }
    truth = ground_truth(drive)
    truth = {"name": name, "files": {k: p.name for k, p in paths.items() if k != "truth"}, **truth}
    # newline="" keeps NMEA's CR LF as it is on every platform.
    with paths["nmea"].open("w", encoding="ascii", newline="") as f:
        f.writelines(nmea_lines(drive))
    with paths["can"].open("w", encoding="ascii", newline="") as f:
        f.writelines(can_lines(drive, can_channel))
    paths["geofences"].write_text(json.dumps(fence_collection(drive), indent=1) + "\n", encoding="utf-8")
    paths["truth"].write_text(json.dumps(truth, indent=1) + "\n", encoding="utf-8")
    return paths


def read_route(path: str | Path) -> list[tuple[float, float]]:
    """(lat, lon) waypoints of the first LineString in a GeoJSON file. Raises ValueError, OSError."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    candidates = [data]
    while candidates:
        item = candidates.pop(0)
        if not isinstance(item, dict):
            continue
        if item.get("type") == "LineString":
            return [(float(lat), float(lon)) for lon, lat, *_ in item["coordinates"]]
        if item.get("type") == "Feature":
            candidates.append(item.get("geometry"))
        if item.get("type") == "FeatureCollection":
            candidates.extend(item.get("features") or [])
    raise ValueError("no LineString in it")


def parse_waypoints(text: str) -> list[tuple[float, float]]:
    """``"52.006,4.3475 52.006,4.353 ..."`` -> [(lat, lon), ...]. Raises ValueError."""
    points = []
    for pair in text.replace(";", " ").split():
        lat, lon = (float(v) for v in pair.split(","))
        if not (-90 <= lat <= 90 and -180 <= lon <= 180):
            raise ValueError(f"{pair}: not a latitude,longitude")
        points.append((lat, lon))
    return points


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{text}: a position on the route is a fraction from 0 to 1")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--route", metavar="FILE", help="GeoJSON file with a LineString to drive along")
    where.add_argument("--waypoints", metavar="'LAT,LON LAT,LON ...'", help="waypoints to drive through, in order")
    parser.add_argument("--out", default=".", metavar="DIR", help="directory to write into (default: .)")
    parser.add_argument("--name", default="drive", help="file name stem (default: drive)")
    parser.add_argument("--seed", type=int, default=1, help="random seed: the same seed gives the same files")
    parser.add_argument("--start", default=DEFAULT_START, metavar="ISO", help=f"UTC of the first fix (default {DEFAULT_START})")
    parser.add_argument("--stop", action="append", metavar="AT:SECONDS[:NAME]",
                        help="a stop at fraction AT of the route; with NAME a customer (with a fence), without a traffic light")
    parser.add_argument("--harsh-brake", metavar="AT", help="a hard braking at fraction AT ('none' for none)")
    parser.add_argument("--speed-zone", metavar="FROM:TO:KMH", help="a speed zone the van drives 12 km/h too fast through ('none')")
    parser.add_argument("--dropout", action="append", metavar="AT:SECONDS", help="no GPS fix for SECONDS from fraction AT")
    parser.add_argument("--gate", metavar="AT:SECONDS",
                        help="the van waits SECONDS at AT right on the edge of a yard fence, then drives in")
    parser.add_argument("--can-channel", default="can0", help="interface name in the candump log (default can0)")


def _plan(args: argparse.Namespace, bundled: bool) -> Plan:
    plan = bundled_plan() if bundled else default_plan()
    if args.stop:
        plan.stops = []
        for spec in args.stop:
            at, seconds, *name = spec.split(":", 2)
            plan.stops.append((_fraction(at), float(seconds), (name[0] or None) if name else None))
    if args.harsh_brake is not None:
        plan.harsh_brake_at = None if args.harsh_brake == "none" else _fraction(args.harsh_brake)
    if args.speed_zone is not None:
        if args.speed_zone == "none":
            plan.speed_zone = None
        else:
            a, b, limit = args.speed_zone.split(":")
            plan.speed_zone = (_fraction(a), _fraction(b), float(limit))
    if args.gate:
        at, seconds = args.gate.split(":")
        plan.gate = (_fraction(at), float(seconds))
    for spec in args.dropout or []:
        at, seconds = spec.split(":")
        plan.dropouts.append((_fraction(at), float(seconds)))
    return plan


def run(args: argparse.Namespace) -> int:
    try:
        if args.route:
            waypoints = read_route(args.route)
        elif args.waypoints:
            waypoints = parse_waypoints(args.waypoints)
        else:
            waypoints = DELFT_ROUTE
        plan = _plan(args, bundled=not (args.route or args.waypoints))
        drive = build(waypoints, plan, seed=args.seed, start=args.start)
        paths = write(drive, args.out, args.name, args.can_channel)
    except OSError as exc:
        raise CommandError(f"{exc.filename or args.route}: {exc.strerror or exc}") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise CommandError(str(exc)) from exc
    for path in paths.values():
        print(path)
    return 0
