"""Geofences: GeoJSON fence sets, a spatial index, and enter / exit / dwell / approach events.

A fence is entered when a fix is at least ``hysteresis_m`` inside its boundary and every fix for
``hysteresis_s`` seconds stays that far inside; it is left the same way outside. In the band
between, nothing changes, so a truck parked on a fence line with GPS wandering by a few metres
produces no events, and one driving through produces exactly one enter and one exit. The event
carries the time and position of the first fix beyond the margin (the fix that caused it); it is
emitted once the time hysteresis confirmed it. Which fences a truck is inside, since when, and which
approaches were announced, survive a restart (``<data_dir>/edge-geofence.json``).

Containment follows RFC 7946 section 3.1.1: polygon edges are straight lines in longitude/latitude
(fences across the antimeridian are not supported). Distances to a boundary are in metres at any
latitude: circles and polygons up to 20 km across live in a local frame around their own centre,
projected once at load; for larger ones a cheap lower bound from the distance in degrees, and where
that is not decisive, the exact distance in a local frame around the fix.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections import deque
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import shapely
from shapely.geometry import shape

from agent.config import GeofencesConfig
from agent.geo import M_PER_DEG, haversine_m
from agent.state_file import StateFile
from agent.record import Event, Fix, Record

log = logging.getLogger(__name__)

FENCE_TYPES = ("depot", "customer_stop", "no_go", "speed_zone")
# Optional per-fence properties and what they must be.
_POSITIVE_PROPS = ("radius_m", "speed_limit_kmh", "dwell_s")
_NON_NEGATIVE_PROPS = ("approach_m", "hysteresis_m")
# A vehicle slower than this is not approaching anything (no meaningful ETA).
_MIN_APPROACH_SPEED_MPS = 1.0
# Boundaries with more vertices are clipped to the neighbourhood of the fix before projecting
# (measured: projecting 2,000 vertices costs more than clipping them).
_CLIP_VERTICES = 64
_ORIGIN = shapely.Point(0.0, 0.0)
# Polygons up to this extent are projected once at load and kept only so (see Fence.local).
_LOCAL_FRAME_MAX_M = 20_000.0
_CIRCLE, _SMALL, _LARGE = 0, 1, 2  # how _Index measures a fence


class GeofenceError(ValueError):
    """A fence set cannot be used; the message says which feature and why."""


class Fence:
    """One fence: a circle (centre and radius in metres), a small polygon kept only in metres around
    its own centre (``local``, ``frame``), or a large polygon in lon/lat (``geom``, prepared)."""

    __slots__ = (
        "id", "name", "type", "speed_limit_kmh", "approach_m", "dwell_s", "hysteresis_m",
        "geom", "boundary", "vertices", "circle", "local", "frame", "_bounds",
    )

    def __init__(self, fid: str, name: str, ftype: str, props: dict[str, Any], geom=None, circle=None) -> None:
        self.id = fid
        self.name = name
        self.type = ftype
        self.speed_limit_kmh: float | None = props.get("speed_limit_kmh")
        self.approach_m: float | None = props.get("approach_m")
        self.dwell_s: float | None = props.get("dwell_s")
        self.hysteresis_m: float | None = props.get("hysteresis_m")
        self.circle: tuple[float, float, float] | None = circle  # (lat, lon, radius_m)
        self.geom = self.boundary = self.local = self.frame = None
        self.vertices = 0
        if circle is not None:
            clat, clon, radius = circle
            dlat = radius / M_PER_DEG
            dlon = radius / (M_PER_DEG * max(0.01, math.cos(math.radians(min(89.0, abs(clat) + dlat)))))
            self._bounds = (clon - dlon, clat - dlat, clon + dlon, clat + dlat)
            return
        self._bounds = minx, miny, maxx, maxy = geom.bounds
        lat_c, lon_c = (miny + maxy) / 2, (minx + maxx) / 2
        kx = M_PER_DEG * math.cos(math.radians(lat_c))
        if max((maxx - minx) * kx, (maxy - miny) * M_PER_DEG) <= _LOCAL_FRAME_MAX_M:
            # Projected once, exact to a few tenths of a per cent within kilometres of the fence, and
            # the projection is affine, so containment is the same as in lon/lat (RFC 7946).
            self.frame = (lat_c, lon_c, kx)
            self.local = shapely.transform(geom, lambda xy: (xy - (lon_c, lat_c)) * (kx, M_PER_DEG))
        else:
            shapely.prepare(geom)
            self.geom, self.boundary = geom, geom.boundary
            self.vertices = shapely.get_num_coordinates(geom)

    def contains(self, lat: float, lon: float) -> bool:
        """Whether the point (degrees) is inside the fence."""
        if self.circle is not None:
            clat, clon, radius = self.circle
            return haversine_m(lat, lon, clat, clon) <= radius
        if self.frame is not None:
            lat_c, lon_c, kx = self.frame
            return bool(shapely.contains_xy(self.local, (lon - lon_c) * kx, (lat - lat_c) * M_PER_DEG))
        return bool(shapely.contains_xy(self.geom, lon, lat))

    def signed_distance_m(self, lat: float, lon: float, point: shapely.Point, inside: bool, cap: float) -> tuple[float, float]:
        """Metres to the boundary of a large polygon (no local frame), positive inside, negative
        outside, clamped to +-``cap``; and a lower bound of the unclamped distance, in metres.
        ``point`` is (lon, lat) as a shapely Point.
        """
        sign = 1.0 if inside else -1.0
        d_deg = self.boundary.distance(point)
        # One degree is at least M_PER_DEG * cos(latitude) metres in any direction, and the nearest
        # boundary point is at most d_deg degrees further from the equator.
        far_cos = math.cos(math.radians(min(89.999, abs(lat) + d_deg)))
        lower = d_deg * M_PER_DEG * far_cos
        if lower >= cap:
            return sign * cap, lower
        near = self.boundary
        if self.vertices > _CLIP_VERTICES:
            # Only the boundary within ``cap`` metres can be nearest: project that piece, not all of it.
            dlat, dlon = cap / M_PER_DEG, cap / (M_PER_DEG * far_cos)
            near = shapely.clip_by_rect(near, lon - dlon, lat - dlat, lon + dlon, lat + dlat)
            if near.is_empty:
                return sign * cap, cap
        kx = M_PER_DEG * math.cos(math.radians(lat))
        exact = shapely.transform(near, lambda xy: (xy - (lon, lat)) * (kx, M_PER_DEG)).distance(_ORIGIN)
        return sign * min(cap, exact), exact

    def bounds(self) -> tuple[float, float, float, float]:
        """(min lon, min lat, max lon, max lat) in degrees."""
        return self._bounds


class GeofenceSet:
    """An immutable, validated set of fences, from a GeoJSON FeatureCollection."""

    def __init__(self, fences: list[Fence]) -> None:
        self.fences = fences
        self.by_id = {f.id: f for f in fences}

    def __len__(self) -> int:
        return len(self.fences)

    @classmethod
    def load(cls, path: str | Path) -> "GeofenceSet":
        """Read a GeoJSON file; raises GeofenceError naming the file and the problem."""
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise GeofenceError(f"{path}: cannot read: {exc.strerror or exc}") from exc
        try:
            return cls.from_geojson(data)
        except GeofenceError as exc:
            raise GeofenceError(f"{path}: {exc}") from exc

    @classmethod
    def from_geojson(cls, data: bytes | str) -> "GeofenceSet":
        """Parse and validate a FeatureCollection (or one Feature); raises GeofenceError."""
        try:
            doc = json.loads(data)
        except ValueError as exc:
            raise GeofenceError(f"not valid JSON: {exc}") from exc
        if isinstance(doc, dict) and doc.get("type") == "Feature":
            features = [doc]
        elif isinstance(doc, dict) and doc.get("type") == "FeatureCollection" and isinstance(doc.get("features"), list):
            features = doc["features"]
        else:
            raise GeofenceError("expected a GeoJSON FeatureCollection with a list of features")
        fences = [_parse_feature(i, feature) for i, feature in enumerate(features)]
        seen: set[str] = set()
        for fence in fences:
            if fence.id in seen:
                raise GeofenceError(f"fence id {fence.id!r} appears more than once")
            seen.add(fence.id)
        return cls(fences)


def _parse_feature(index: int, feature: Any) -> Fence:
    where = f"feature {index}"
    if not isinstance(feature, dict) or feature.get("type") != "Feature":
        raise GeofenceError(f"{where}: not a GeoJSON Feature")
    props = feature.get("properties") or {}
    if not isinstance(props, dict):
        raise GeofenceError(f"{where}: properties must be an object")
    fid = feature.get("id", props.get("id"))
    if isinstance(fid, bool) or not isinstance(fid, (str, int)) or fid == "":
        raise GeofenceError(f"{where}: needs an id (the feature's id or properties.id, a string or integer)")
    fid = str(fid)
    where = f"feature {index} (id {fid!r})"
    ftype = props.get("type")
    if ftype not in FENCE_TYPES:
        raise GeofenceError(f"{where}: properties.type must be one of {', '.join(FENCE_TYPES)}, got {ftype!r}")
    name = props.get("name", fid)
    if not isinstance(name, str):
        raise GeofenceError(f"{where}: properties.name must be a string")
    clean: dict[str, float] = {}
    for key in _POSITIVE_PROPS + _NON_NEGATIVE_PROPS:
        value = props.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise GeofenceError(f"{where}: properties.{key} must be a number, got {value!r}")
        if value < 0 or (value == 0 and key in _POSITIVE_PROPS):
            raise GeofenceError(f"{where}: properties.{key} must be {'> 0' if key in _POSITIVE_PROPS else '>= 0'}")
        clean[key] = float(value)
    geometry = feature.get("geometry")
    gtype = geometry.get("type") if isinstance(geometry, dict) else None
    if gtype == "Point":
        coords = geometry.get("coordinates")
        if not (isinstance(coords, list) and len(coords) >= 2 and all(isinstance(c, (int, float)) for c in coords[:2])):
            raise GeofenceError(f"{where}: a Point needs [longitude, latitude]")
        lon, lat = float(coords[0]), float(coords[1])
        _check_range(where, lon, lat)
        if "radius_m" not in clean:
            raise GeofenceError(f"{where}: a Point fence is a circle and needs properties.radius_m")
        return Fence(fid, name, ftype, clean, circle=(lat, lon, clean["radius_m"]))
    if gtype not in ("Polygon", "MultiPolygon"):
        raise GeofenceError(f"{where}: geometry must be Polygon, MultiPolygon or Point (circle), got {gtype!r}")
    try:
        geom = shape(geometry)
    except (ValueError, TypeError, AttributeError, IndexError, shapely.errors.ShapelyError) as exc:
        raise GeofenceError(f"{where}: bad {gtype} coordinates: {exc}") from exc
    if geom.is_empty:
        raise GeofenceError(f"{where}: empty {gtype}")
    minx, miny, maxx, maxy = geom.bounds
    _check_range(where, minx, miny)
    _check_range(where, maxx, maxy)
    if not geom.is_valid:
        raise GeofenceError(f"{where}: invalid {gtype}: {shapely.is_valid_reason(geom)}")
    return Fence(fid, name, ftype, clean, geom=geom)


def _check_range(where: str, lon: float, lat: float) -> None:
    if not (-180.0 <= lon <= 180.0 and -90.0 <= lat <= 90.0):
        raise GeofenceError(f"{where}: coordinates out of range (lon {lon}, lat {lat}); GeoJSON is [longitude, latitude]")


class _Index:
    """The fences as arrays, and an STRtree over each one's bounding box grown by how far away it
    still matters (hysteresis, approach), so one query and a few vectorised shapely / numpy calls
    measure every candidate of a fix."""

    def __init__(self, fence_set: GeofenceSet, config: GeofencesConfig) -> None:
        fences = self.fences = fence_set.fences
        self.config = config
        n = len(fences)
        self.ids = [f.id for f in fences]
        self.h = np.array([config.hysteresis_m if f.hysteresis_m is None else f.hysteresis_m for f in fences])
        self.approach = np.array([0.0 if f.type != "customer_stop" else
                                  config.approach_m if f.approach_m is None else f.approach_m for f in fences])
        # How each fence is measured: circles and small polygons in their own local frame, in bulk;
        # large polygons one by one, projected around the fix (Fence.signed_distance_m).
        self.kind = np.array([_CIRCLE if f.circle else _SMALL if f.frame else _LARGE for f in fences], dtype=np.int8)
        centre = [f.circle[:2] if f.circle else f.frame[:2] if f.frame else (0.0, 0.0) for f in fences]
        self.lat_c = np.array([c[0] for c in centre])
        self.lon_c = np.array([c[1] for c in centre])
        self.kx = M_PER_DEG * np.cos(np.radians(self.lat_c))
        self.radius = np.array([f.circle[2] if f.circle else 0.0 for f in fences])
        self.local = np.array([f.local for f in fences], dtype=object)
        boxes = np.empty((n, 4))
        for i, fence in enumerate(fences):
            minx, miny, maxx, maxy = fence.bounds()
            reach = self.h[i] + self.approach[i] + 1.0
            dlat = reach / M_PER_DEG
            dlon = reach / (M_PER_DEG * max(0.01, math.cos(math.radians(min(89.0, max(abs(miny), abs(maxy)) + dlat)))))
            boxes[i] = (minx - dlon, miny - dlat, maxx + dlon, maxy + dlat)
        self.tree = shapely.STRtree(shapely.box(boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3])) if n else None
        self._far: dict[int, tuple[float, float, bool, float]] = {}  # large fence -> where last measured, inside, metres

    def candidates(self, point: shapely.Point) -> np.ndarray:
        """Indices of the fences whose grown box holds ``point`` (lon, lat), ascending."""
        if self.tree is None:
            return np.empty(0, dtype=np.intp)
        return np.sort(self.tree.query(point))

    def measure(self, idx: np.ndarray, lat: float, lon: float, point: shapely.Point) -> tuple[np.ndarray, np.ndarray]:
        """(inside, signed metres to the boundary, clamped to each fence's reach) of fences ``idx``."""
        kind = self.kind[idx]
        inside = np.zeros(len(idx), dtype=bool)
        d = np.zeros(len(idx))
        x = (lon - self.lon_c[idx]) * self.kx[idx]
        y = (lat - self.lat_c[idx]) * M_PER_DEG
        circles = kind == _CIRCLE
        if circles.any():
            d[circles] = self.radius[idx[circles]] - np.hypot(x[circles], y[circles])
            inside[circles] = d[circles] >= 0
        small = kind == _SMALL
        if small.any():
            local = self.local[idx[small]]
            xs, ys = x[small], y[small]
            within = shapely.contains_xy(local, xs, ys)
            points = shapely.points(xs, ys)
            dist = -shapely.distance(local, points)  # 0 inside: there, the distance to the boundary
            if within.any():
                dist[within] = shapely.distance(shapely.boundary(local[within]), points[within])
            inside[small], d[small] = within, dist
        cap = self.h[idx] + self.approach[idx] + 1.0
        for j in np.flatnonzero(kind == _LARGE):
            i = int(idx[j])
            far = self._far.get(i)
            # The distance to a boundary changes by at most the distance moved: far from the
            # boundary of a large fence, nothing needs measuring until the truck has covered that.
            if far is not None and far[3] - haversine_m(lat, lon, far[0], far[1]) >= cap[j]:
                inside[j] = far[2]
                d[j] = cap[j] if far[2] else -cap[j]
                continue
            fence = self.fences[i]
            inside[j] = fence.contains(lat, lon)
            d[j], lower = fence.signed_distance_m(lat, lon, point, bool(inside[j]), cap[j])
            self._far[i] = (lat, lon, bool(inside[j]), lower)
        return inside, np.clip(d, -cap, cap)


class _FenceState:
    """Bookkeeping for one fence the truck is in, near, or was announced at."""

    __slots__ = ("inside", "since", "dwell_done", "pending", "armed", "closing")

    def __init__(self, inside: bool = False, since: float | None = None, dwell_done: bool = False, armed: bool = True) -> None:
        self.inside = inside
        self.since = since  # utc of the first fix that was decisively inside
        self.dwell_done = dwell_done
        self.pending: tuple[float, float, float] | None = None  # (utc, lat, lon) of a side change
        self.armed = armed  # an approach may still be announced
        self.closing: float | None = None  # metres away at the last fix, while within the approach radius

    def idle(self) -> bool:
        return not self.inside and self.pending is None and self.armed and self.closing is None


class GeofenceProcessor:
    """Turns fixes into geofence_enter / geofence_exit / geofence_dwell / stop_approach events."""

    def __init__(self, config: GeofencesConfig, data_dir: str | Path | None, fence_set: GeofenceSet | None = None,
                 version: str | None = None) -> None:
        self.config = config
        self.version: str | None = None
        self._state_file = StateFile(data_dir, "edge-geofence")
        self._states: dict[str, _FenceState] = {}
        saved = self._state_file.load()
        for fid, s in saved.get("fences", {}).items():
            self._states[fid] = _FenceState(bool(s.get("inside")), s.get("since"), bool(s.get("dwell_done")), bool(s.get("armed", True)))
        self._speeds: deque[tuple[float, float]] = deque()
        self._speed_sum = 0.0
        self._lock = threading.Lock()
        self.set = GeofenceSet([])
        self._index = _Index(self.set, config)
        self.replace(fence_set or GeofenceSet([]), version)

    def replace(self, new_set: GeofenceSet, version: str | None) -> None:
        """Swap in a validated fence set at once; state of fences that are gone is dropped.

        May be called from any thread (remote management): the index is built first, in the
        caller's thread, while the old set keeps serving; the swap waits for the fix in progress.
        """
        index = _Index(new_set, self.config)
        position = {fid: i for i, fid in enumerate(index.ids)}
        with self._lock:
            self.set, self._index, self._position, self.version = new_set, index, position, version
            gone = [fid for fid in self._states if fid not in new_set.by_id]
            for fid in gone:
                del self._states[fid]
            self._save()
        log.info("geofence set version %s active: %d fences (%d dropped from state)", version, len(new_set), len(gone))

    def process(self, record: Record) -> list[Record]:
        fix = record.data
        if not isinstance(fix, Fix):
            return [record]
        with self._lock:  # uncontended except during a replace
            events = self._on_fix(record, fix)
        return [*events, record]

    def _on_fix(self, record: Record, fix: Fix) -> list[Record]:
        utc, lat, lon = record.utc, fix.lat, fix.lon
        point = shapely.Point(lon, lat)
        speed = self._recent_speed(utc, fix.speed_mps)
        index = self._index
        events: list[Record] = []
        changed = False
        idx = index.candidates(point)
        seen: set[str] = set()
        if len(idx):
            inside, d = index.measure(idx, lat, lon, point)
            h, approach = index.h[idx], index.approach[idx]
            side = np.where(h > 0, np.where(d >= h, 1, np.where(d <= -h, -1, 0)), np.where(inside, 1, -1))
            # Outside, nothing pending, nothing to announce: the common case, skipped in bulk.
            approaching = (approach > 0) & (-d <= approach) & (speed is not None and speed >= _MIN_APPROACH_SPEED_MPS)
            busy = (side >= 0) | approaching
            for j in range(len(idx)):
                fid = index.ids[idx[j]]
                seen.add(fid)
                if busy[j] or fid in self._states:
                    changed |= self._step(index.fences[idx[j]], int(side[j]), float(d[j]), float(approach[j]), float(h[j]),
                                          record, lat, lon, speed, events)
        for fid in [fid for fid in self._states if fid not in seen]:
            # Beyond every margin of this fence (a jump, or a new set): decisively outside.
            i = self._position[fid]
            changed |= self._step(index.fences[i], -1, -math.inf, float(index.approach[i]), float(index.h[i]),
                                  record, lat, lon, speed, events)
        if changed:
            self._save()
        return events

    def _step(self, fence: Fence, side: int, d: float, approach: float, h: float, record: Record, lat: float,
              lon: float, speed: float | None, events: list[Record]) -> bool:
        """Advance one fence's state machine; returns whether persistent state changed."""
        utc, mono = record.utc, record.mono
        st = self._states.get(fence.id)
        if st is None:
            st = self._states[fence.id] = _FenceState()
        changed = False
        if side != 0 and (side > 0) != st.inside:
            if st.pending is None:
                st.pending = (utc, lat, lon)
            if utc - st.pending[0] >= self.config.hysteresis_s:
                t0, lat0, lon0 = st.pending
                st.pending = None
                changed = True
                if side > 0:
                    # Arrived: no approach to announce until the truck has gone beyond the radius.
                    st.inside, st.since, st.dwell_done, st.armed = True, t0, False, False
                    events.append(_event(t0, mono, "geofence_enter", lat0, lon0, fence))
                else:
                    dwell = t0 - st.since if st.since is not None else None
                    st.inside, st.since = False, None
                    events.append(_event(t0, mono, "geofence_exit", lat0, lon0, fence, dwell_s=_round(dwell)))
        else:
            st.pending = None
        if st.inside and not st.dwell_done and st.since is not None:
            threshold = self.config.dwell_s if fence.dwell_s is None else fence.dwell_s
            if utc - st.since >= threshold:
                st.dwell_done = changed = True
                events.append(_event(utc, mono, "geofence_dwell", lat, lon, fence, dwell_s=_round(utc - st.since)))
        if approach <= 0:
            st.armed = True  # nothing to announce for this fence
        elif not st.inside:
            distance = -d
            if st.armed and 0 < distance <= approach and speed is not None and speed >= _MIN_APPROACH_SPEED_MPS:
                # Only coming closer is an approach: not driving away from a customer nearby.
                if st.closing is not None and distance < st.closing:
                    st.armed, st.closing, changed = False, None, True
                    events.append(_event(utc, mono, "stop_approach", lat, lon, fence, distance_m=round(distance),
                                         eta_s=round(distance / speed)))
                else:
                    st.closing = distance
            else:
                st.closing = None
                if not st.armed and distance > approach + h:
                    st.armed, changed = True, True
        if st.idle():
            del self._states[fence.id]
        return changed

    def _recent_speed(self, utc: float, speed: float | None) -> float | None:
        """Mean GPS speed over the ETA window, m/s; None without speeds."""
        if speed is not None:
            self._speeds.append((utc, speed))
            self._speed_sum += speed
        while self._speeds and utc - self._speeds[0][0] > self.config.eta_window_s:
            self._speed_sum -= self._speeds.popleft()[1]
        if not self._speeds:
            self._speed_sum = 0.0  # no drift from float rounding across windows
            return None
        return max(0.0, self._speed_sum / len(self._speeds))

    def inside_ids(self) -> list[str]:
        """Fences the truck is in (after hysteresis), in the order it entered them."""
        return [fid for fid, s in self._states.items() if s.inside]

    def speed_limit_at(self, lat: float, lon: float) -> tuple[float, str] | None:
        """The lowest (limit km/h, fence id) of the speed-limited fences containing the point, or None.

        Plain containment, no hysteresis: it depends on the position only, so the driving monitor
        gets the same answer however records are batched, and the limit holds from the boundary.
        """
        limits = [(f.speed_limit_kmh, f.id) for f in self._containing(lat, lon) if f.speed_limit_kmh]
        return min(limits) if limits else None

    def customer_stop_at(self, lat: float, lon: float) -> str | None:
        """The id of a customer-stop fence containing the point (no hysteresis), or None."""
        return next((f.id for f in self._containing(lat, lon) if f.type == "customer_stop"), None)

    def _containing(self, lat: float, lon: float) -> Iterator[Fence]:
        """The fences containing the point, in set order."""
        index = self._index  # one set throughout, even if another thread replaces it meanwhile
        for i in index.candidates(shapely.Point(lon, lat)).tolist():
            fence = index.fences[i]
            if fence.contains(lat, lon):
                yield fence

    def _save(self) -> None:
        self._state_file.save({
            "version": self.version,
            "fences": {
                fid: {"inside": s.inside, "since": s.since, "dwell_done": s.dwell_done, "armed": s.armed}
                for fid, s in self._states.items() if s.inside or not s.armed
            },
        })


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _event(utc: float, mono: float, etype: str, lat: float, lon: float, fence: Fence, **attrs: Any) -> Record:
    return Record(
        utc=utc, mono=mono,
        data=Event(type=etype, lat=lat, lon=lon, attrs={"geofence_id": fence.id, "geofence_type": fence.type, **attrs}),
    )
