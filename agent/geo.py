"""Distances and bearings on the WGS 84 ellipsoid's mean sphere, in metres and degrees.

Haversine for distances between two fixes (correct at any latitude and any range that matters on a
truck), and a local equirectangular frame for short-range planar work (a fence boundary within a
few kilometres, interpolation between reported fixes): x east and y north in metres around a
reference point, accurate to about 0.1 % within 10 km of it.
"""

from __future__ import annotations

import math

# IUGG mean Earth radius R1 = (2a + b) / 3 for WGS 84, metres.
EARTH_RADIUS_M = 6_371_008.8
# Metres per degree of latitude (and of longitude at the equator) on that sphere.
M_PER_DEG = math.pi * EARTH_RADIUS_M / 180.0


def haversine_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in metres between two points given in degrees."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp = p2 - p1
    dl = math.radians(lon2 - lon1)
    h = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(h)))


def bearing_deg(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Initial great-circle bearing from point 1 to point 2, degrees clockwise from north, [0, 360)."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dl = math.radians(lon2 - lon1)
    y = math.sin(dl) * math.cos(p2)
    x = math.cos(p1) * math.sin(p2) - math.sin(p1) * math.cos(p2) * math.cos(dl)
    return math.degrees(math.atan2(y, x)) % 360.0


def heading_change_deg(a: float, b: float) -> float:
    """Signed smallest turn from heading ``a`` to heading ``b`` in degrees, in (-180, 180]."""
    d = (b - a) % 360.0
    return d - 360.0 if d > 180.0 else d


def offset(lat: float, lon: float, north_m: float, east_m: float) -> tuple[float, float]:
    """The point ``north_m`` north and ``east_m`` east of (lat, lon), for short offsets (local frame)."""
    return lat + north_m / M_PER_DEG, lon + east_m / (M_PER_DEG * math.cos(math.radians(lat)))


class LocalFrame:
    """Planar metres (x east, y north) around a reference point: cheap, and exact enough nearby."""

    __slots__ = ("lat0", "lon0", "kx")

    def __init__(self, lat0: float, lon0: float) -> None:
        self.lat0 = lat0
        self.lon0 = lon0
        self.kx = M_PER_DEG * math.cos(math.radians(lat0))

    def to_xy(self, lat: float, lon: float) -> tuple[float, float]:
        """(x, y) in metres of a point given in degrees."""
        dlon = (lon - self.lon0 + 180.0) % 360.0 - 180.0  # across the antimeridian too
        return dlon * self.kx, (lat - self.lat0) * M_PER_DEG
