"""Geofence sets (GeoJSON validation), metre distances at any latitude, hysteresis under GPS noise,
atomic replacement and the restart state file."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import GeofencesConfig
from agent.geo import haversine_m, offset
from agent.processors.edge import EdgeChain
from agent.config import EdgeConfig
from agent.processors.geofence import GeofenceError, GeofenceProcessor, GeofenceSet
from edge_drive import Drive, circle, collection, events, run, square

HOME = (48.1374, 11.5755)


@pytest.mark.parametrize("doc, message", [
    (b"{not json", "not valid JSON"),
    (b'{"type": "Polygon"}', "FeatureCollection"),
    (collection({"type": "Feature", "properties": {"type": "depot"}, "geometry": None}), "needs an id"),
    (collection(circle("a", "warehouse", *HOME, 50)), "properties.type must be one of"),
    (collection({**circle("a", "depot", *HOME, 50), "properties": {"type": "depot"}}), "needs properties.radius_m"),
    (collection(circle("a", "depot", *HOME, -5)), "radius_m must be > 0"),
    (collection(circle("a", "depot", *HOME, 50, speed_limit_kmh="fast")), "speed_limit_kmh must be a number"),
    (collection(circle("a", "depot", 95.0, 11.0, 50)), "out of range"),
    (collection(circle("a", "depot", *HOME, 50), circle("a", "depot", *HOME, 80)), "appears more than once"),
    (collection({"type": "Feature", "id": "bow", "properties": {"type": "no_go"}, "geometry": {
        "type": "Polygon", "coordinates": [[[0, 0], [1, 1], [1, 0], [0, 1], [0, 0]]]}}), "invalid Polygon: Self-intersection"),
    (collection({"type": "Feature", "id": "l", "properties": {"type": "no_go"}, "geometry": {
        "type": "LineString", "coordinates": [[0, 0], [1, 1]]}}), "got 'LineString'"),
])
def test_invalid_sets_are_refused_with_the_reason(doc, message):
    with pytest.raises(GeofenceError, match=message):
        GeofenceSet.from_geojson(doc)


def test_load_names_the_file(tmp_path):
    path = tmp_path / "fences.geojson"
    path.write_text('{"type": "FeatureCollection", "features": [1]}')
    with pytest.raises(GeofenceError, match=rf"{path}: feature 0: not a GeoJSON Feature"):
        GeofenceSet.load(path)


def test_properties_and_multipolygons_are_read():
    a = square("x", "speed_zone", *HOME, 100)["geometry"]["coordinates"]
    b = square("x", "speed_zone", *offset(*HOME, 1000, 0), 100)["geometry"]["coordinates"]
    doc = collection({"type": "Feature", "properties": {"id": 7, "type": "speed_zone", "name": "Two schools",
                                                        "speed_limit_kmh": 30, "hysteresis_m": 5, "dwell_s": 60},
                      "geometry": {"type": "MultiPolygon", "coordinates": [a, b]}})
    fence = GeofenceSet.from_geojson(doc).by_id["7"]
    assert (fence.name, fence.type, fence.speed_limit_kmh, fence.hysteresis_m, fence.dwell_s) == \
        ("Two schools", "speed_zone", 30.0, 5.0, 60.0)
    assert fence.contains(*offset(*HOME, 1000, 0)) and not fence.contains(*offset(*HOME, 500, 0))


def measure(doc: bytes, lat: float, lon: float) -> tuple[bool, float]:
    """(inside, signed metres) of the one fence in ``doc``, as the processor measures it."""
    import numpy as np
    import shapely

    from agent.processors.geofence import _Index

    index = _Index(GeofenceSet.from_geojson(doc), GeofencesConfig(hysteresis_m=1000))  # reach: 1 km
    inside, d = index.measure(np.array([0]), lat, lon, shapely.Point(lon, lat))
    return bool(inside[0]), float(d[0])


@pytest.mark.parametrize("lat", [0.0, 45.0, 70.0, 78.2, -54.8])
@pytest.mark.parametrize("bearing", ["east", "north"])
@pytest.mark.parametrize("half_m", [200, 15_000])  # a depot, and a zone measured around the fix
def test_boundary_distance_is_in_metres_at_any_latitude(lat, bearing, half_m):
    doc = collection(square("s", "depot", lat, 20.0, half_m))
    north, east = (0, half_m + 37) if bearing == "east" else (half_m + 37, 0)
    assert measure(doc, *offset(lat, 20.0, north, east)) == (False, pytest.approx(-37.0, abs=0.5))
    north, east = (0, half_m - 10) if bearing == "east" else (half_m - 10, 0)
    assert measure(doc, *offset(lat, 20.0, north, east)) == (True, pytest.approx(10.0, abs=0.5))


def test_circle_distance_is_the_haversine_distance():
    p = offset(69.65, 18.96, 30, 90)
    inside, d = measure(collection(circle("c", "customer_stop", 69.65, 18.96, 80)), *p)
    assert not inside and d == pytest.approx(80 - haversine_m(69.65, 18.96, *p), abs=0.01)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), noise=st.floats(0.0, 8.0), minutes=st.integers(5, 40),
       where=st.sampled_from(["edge", "corner", "circle", "outside", "approach"]))
def test_gps_noise_around_a_parked_truck_never_produces_an_event(seed, noise, minutes, where):
    fences = collection(square("depot", "depot", *HOME, 100),
                        circle("cust", "customer_stop", *offset(*HOME, 0, 600), 50, approach_m=400))
    spot = {"edge": offset(*HOME, 20, 100), "corner": offset(*HOME, 100, 100),
            "circle": offset(*HOME, 0, 550), "outside": offset(*HOME, -400, -400),
            "approach": offset(*HOME, 0, 300)}[where]
    d = Drive(*spot)
    d.stay(minutes * 60, noise_m=noise, rng=random.Random(seed))
    out = run(EdgeChain(EdgeConfig(), None, GeofenceSet.from_geojson(fences)).processors, d.records)
    assert events(out) == []


def test_replace_keeps_state_of_fences_that_stay_and_drops_the_rest(data_dir):
    depot = square("depot", "depot", *HOME, 100)
    processor = GeofenceProcessor(GeofencesConfig(), data_dir, GeofenceSet.from_geojson(collection(depot)))
    d = Drive(*HOME)
    d.stay(10)
    assert [t for t, _ in events(run([processor], d.records))] == ["geofence_enter"]
    # The same depot in a new version, plus a zone around the truck: no second enter for the depot.
    processor.replace(GeofenceSet.from_geojson(collection(depot, circle("z", "no_go", *HOME, 300))), "v2")
    d.records.clear()
    d.stay(10)
    assert [(t, a["geofence_id"]) for t, a in events(run([processor], d.records))] == [("geofence_enter", "z")]
    processor.replace(GeofenceSet.from_geojson(collection(circle("z", "no_go", *HOME, 300))), "v3")
    assert processor.inside_ids() == ["z"] and processor.version == "v3"
    saved = json.loads((data_dir / "edge-geofence.json").read_text())
    assert saved["version"] == "v3" and list(saved["fences"]) == ["z"]


def test_state_file_survives_a_restart_and_is_written_only_on_change(data_dir):
    fences = GeofenceSet.from_geojson(collection(square("depot", "depot", *HOME, 100)))
    d = Drive(*HOME)
    d.stay(30)
    first = GeofenceProcessor(GeofencesConfig(dwell_s=50), data_dir, fences)
    run([first], d.records)
    path = data_dir / "edge-geofence.json"
    mtime = path.stat().st_mtime_ns
    d.records.clear()
    d.stay(10)
    run([first], d.records)
    assert path.stat().st_mtime_ns == mtime  # nothing changed, nothing written
    assert not list(data_dir.glob("*.tmp"))
    again = GeofenceProcessor(GeofencesConfig(dwell_s=50), data_dir, fences)
    d.records.clear()
    d.stay(20)
    got = events(run([again], d.records))
    # No second enter; the dwell counts from the first enter, before the restart.
    assert [(t, a["dwell_s"]) for t, a in got] == [("geofence_dwell", 50.0)]


def test_a_jump_far_away_exits_fences_that_are_no_longer_candidates():
    fences = GeofenceSet.from_geojson(collection(circle("c", "depot", *HOME, 100)))
    d = Drive(*HOME)
    d.stay(10)
    d.lat, d.lon = offset(*HOME, 50_000, 0)
    d.stay(10)
    got = [t for t, _ in events(run([GeofenceProcessor(GeofencesConfig(), None, fences)], d.records))]
    assert got == ["geofence_enter", "geofence_exit"]


def test_replace_from_another_thread_while_fixes_are_processed():
    import threading

    depot = square("depot", "depot", *HOME, 100)
    sets = [GeofenceSet.from_geojson(collection(depot, circle(f"c{k}", "no_go", *HOME, 50 + k))) for k in range(20)]
    processor = GeofenceProcessor(GeofencesConfig(), None, sets[0], "v0")
    d = Drive(*HOME)
    d.stay(3000)
    errors = []

    def swap():
        try:
            for k, fence_set in enumerate(sets):
                processor.replace(fence_set, f"v{k}")
        except Exception as exc:  # surfaced by the assertion below
            errors.append(exc)

    thread = threading.Thread(target=swap)
    thread.start()
    out = run([processor], d.records)
    thread.join()
    assert errors == []
    assert processor.version == "v19"
    # The depot is in every version: entered once, never left.
    assert [a["geofence_id"] for t, a in events(out) if t == "geofence_enter"].count("depot") == 1
    assert not [a for t, a in events(out) if t == "geofence_exit" and a["geofence_id"] == "depot"]


def test_an_unreadable_state_file_is_ignored_with_a_warning(data_dir, caplog):
    (data_dir / "edge-geofence.json").write_text('{"fences": ')  # cut short by a power failure of an older version
    fences = GeofenceSet.from_geojson(collection(square("depot", "depot", *HOME, 100)))
    processor = GeofenceProcessor(GeofencesConfig(), data_dir, fences)
    assert "ignoring unreadable state file" in caplog.text
    d = Drive(*HOME)
    d.stay(5)
    assert [t for t, _ in events(run([processor], d.records))] == ["geofence_enter"]
    assert json.loads((data_dir / "edge-geofence.json").read_text())["fences"]["depot"]["inside"] is True


@settings(max_examples=150, deadline=None)
@given(lat=st.floats(-70, 70), radius=st.floats(80, 800), offset_share=st.floats(-0.7, 0.7),
       bearing=st.floats(0, 360), speed=st.floats(6, 35), noise=st.floats(0, 4), seed=st.integers(0, 2**16),
       as_polygon=st.booleans())
def test_driving_through_a_fence_enters_and_exits_exactly_once(lat, radius, offset_share, bearing, speed, noise, seed,
                                                               as_polygon):
    import math

    from hypothesis import assume

    # Long enough inside: the chord deeper than the 10 m margin (through the circle, or the square's
    # inscribed circle) takes the 3 s time hysteresis plus two fix intervals.
    deep = radius - GeofencesConfig().hysteresis_m
    off = abs(offset_share) * radius
    assume(deep > off and 2 * math.sqrt(deep**2 - off**2) / speed >= GeofencesConfig().hysteresis_s + 2)
    rng = random.Random(seed)
    fence = square("f", "no_go", lat, 20.0, radius) if as_polygon else circle("f", "no_go", lat, 20.0, radius)
    processor = GeofenceProcessor(GeofencesConfig(), None, GeofenceSet.from_geojson(collection(fence)))
    # A straight pass, off-centre by up to 70 % of the radius, from well outside to well outside.
    b = math.radians(bearing)
    side = offset_share * radius
    reach = 1.5 * radius + 300  # beyond the square's corners too
    start = offset(lat, 20.0, -reach * math.cos(b) - side * math.sin(b), -reach * math.sin(b) + side * math.cos(b))
    d = Drive(*start)
    total = 2 * reach
    steps = int(total / speed)
    for k in range(1, steps + 1):
        r, a = noise * rng.random(), rng.uniform(0, 2 * math.pi)
        lat_k, lon_k = offset(*start, k * speed * math.cos(b) + r * math.cos(a), k * speed * math.sin(b) + r * math.sin(a))
        d.fix(lat_k, lon_k, speed, bearing)
    got = [t for t, _ in events(run([processor], d.records)) if t != "geofence_dwell"]
    assert got == ["geofence_enter", "geofence_exit"]
