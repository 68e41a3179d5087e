"""The generator and the bundled drive: plausible physics, stops where the truth says, CAN that the
agent's own J1939 decoder reads, fences the agent's own loader accepts, byte-for-byte determinism."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pynmea2
import shapely
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.decode.can_decoder import FrameDecoder
from agent.decode.j1939 import J1939Database
from agent.processors.geofence import GeofenceSet
from agent.record import parse_iso_utc
from sim import generate, nmea_writer
from sim.drive_model import Profile, Route, Stop, simulate

REPO = Path(__file__).resolve().parent.parent
DRIVES = REPO / "sim" / "drives"
BUNDLED = DRIVES / "delivery_route"


def _haversine(lat1, lon1, lat2, lon2):
    p1, p2 = math.radians(lat1), math.radians(lat2)
    h = math.sin((p2 - p1) / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(math.radians(lon2 - lon1) / 2) ** 2
    return 2 * 6_371_008.8 * math.asin(math.sqrt(h))


def _fixes(path: Path) -> list[dict]:
    """One dict per epoch from RMC + GGA: utc, lat, lon, speed (m/s), hdop, sats."""
    fixes = []
    for line in path.read_text(encoding="ascii").splitlines():
        if line.startswith("#"):
            continue
        msg = pynmea2.parse(line, check=True)
        if msg.sentence_type == "RMC" and msg.status == "A":
            utc = msg.datetime.timestamp()
            fixes.append({"utc": utc, "lat": msg.latitude, "lon": msg.longitude, "speed": float(msg.spd_over_grnd) * 1852 / 3600})
        elif msg.sentence_type == "GGA" and msg.gps_qual:
            fixes[-1].update(hdop=float(msg.horizontal_dil), sats=int(msg.num_sats))
    return fixes


@pytest.fixture(scope="module")
def bundled():
    truth = json.loads(BUNDLED.with_suffix(".truth.json").read_text())
    return _fixes(BUNDLED.with_suffix(".nmea")), truth


def test_the_bundled_files_are_what_the_generator_makes(tmp_path):
    paths = generate.write(generate.build(generate.DELFT_ROUTE, generate.bundled_plan()), tmp_path, "delivery_route")
    for path in paths.values():
        assert path.read_bytes() == (DRIVES / path.name).read_bytes(), f"{path.name} differs: regenerate sim/drives"


def test_bundled_drive_is_a_few_minutes_at_1_hz_with_every_sentence_valid(bundled):
    fixes, truth = bundled
    lines = [l for l in BUNDLED.with_suffix(".nmea").read_text().splitlines() if not l.startswith("#")]
    assert all(nmea_writer.checksum_ok(line) for line in lines)
    kinds = {line[3:6] for line in lines}
    assert kinds == {"RMC", "VTG", "GGA", "GSA"}
    times = [f["utc"] for f in fixes]
    assert np.all(np.diff(times) == 1.0)
    assert 5 * 60 <= times[-1] - times[0] <= 8 * 60
    assert truth["drive"]["fixes"] == len(fixes)
    assert all(0.6 <= f["hdop"] <= 2.5 and 5 <= f["sats"] <= 12 for f in fixes)


def test_bundled_drive_has_plausible_speeds_accelerations_and_positions(bundled):
    fixes, truth = bundled
    speed = np.array([f["speed"] for f in fixes])
    assert 30 / 3.6 < speed.max() <= 50 / 3.6  # urban delivery speeds
    dv = np.diff(speed)
    harsh = [e for e in truth["events"] if e["type"] == "harsh_brake"]
    assert len(harsh) == 1
    braking = int(parse_iso_utc(harsh[0]["time"]) - fixes[0]["utc"])
    ordinary = np.delete(dv, range(braking - 3, braking + 2))
    assert ordinary.max() <= 1.6 and ordinary.min() >= -2.0  # a loaded van pulling away and braking normally
    assert dv[braking - 3 : braking + 2].min() < -4.0  # the hard braking
    for a, b in zip(fixes, fixes[1:]):
        step = _haversine(a["lat"], a["lon"], b["lat"], b["lon"])
        # Moved about as far as the mean Doppler speed says, give or take a metre or two of noise.
        assert abs(step - (a["speed"] + b["speed"]) / 2) < 2.5


def test_vans_stand_still_where_the_truth_puts_its_stops(bundled):
    fixes, truth = bundled
    fences = {f["id"]: f for f in json.loads(BUNDLED.with_suffix(".geojson").read_text())["features"]}
    customer_stops = [s for s in truth["stops"] if s["name"]]
    assert len(customer_stops) == 2 and all(s["dwell_s"] >= 60 for s in customer_stops)
    for stop in truth["stops"]:
        arrive, depart = parse_iso_utc(stop["arrive"]), parse_iso_utc(stop["depart"])
        still = [f for f in fixes if arrive + 1 <= f["utc"] <= depart - 1]
        assert len(still) >= stop["dwell_s"] - 3
        assert max(f["speed"] for f in still) < 0.3
        lat, lon = np.mean([f["lat"] for f in still]), np.mean([f["lon"] for f in still])
        assert max(_haversine(f["lat"], f["lon"], lat, lon) for f in still) < 10.0  # a few metres of GPS wander
        before = [f for f in fixes if arrive - 30 <= f["utc"] < arrive - 5]
        assert max(f["speed"] for f in before) > 2.0  # it drove there
        if stop["geofence_id"]:
            clon, clat = fences[stop["geofence_id"]]["geometry"]["coordinates"]
            assert _haversine(lat, lon, clat, clon) < fences[stop["geofence_id"]]["properties"]["radius_m"] - 15


def test_truth_events_are_spelled_as_the_agent_reports_them_and_ordered(bundled):
    _, truth = bundled
    types = [e["type"] for e in truth["events"]]
    assert set(types) <= {
        "geofence_enter", "geofence_exit", "geofence_dwell", "stop_approach", "stop_arrive", "stop_depart",
        "trip_start", "trip_end", "idle_start", "idle_end", "harsh_brake", "overspeed",
    }
    for expected in ("trip_start", "trip_end", "stop_arrive", "stop_depart", "idle_start", "idle_end", "harsh_brake",
                     "overspeed", "geofence_enter", "geofence_exit", "geofence_dwell", "stop_approach"):
        assert expected in types
    times = [parse_iso_utc(e["time"]) for e in truth["events"]]
    assert times == sorted(times)
    for e in truth["events"]:
        earliest, latest = (parse_iso_utc(w) for w in e["window"])
        assert earliest <= parse_iso_utc(e["time"]) <= latest
    overspeed = next(e for e in truth["events"] if e["type"] == "overspeed")
    assert overspeed["geofence_id"] == "zone-30" and overspeed["peak_kmh"] > 30 + 8 and overspeed["duration_s"] >= 20


def test_overspeed_truth_matches_the_reported_speeds_in_the_zone(bundled):
    fixes, truth = bundled
    overspeed = next(e for e in truth["events"] if e["type"] == "overspeed")
    start = parse_iso_utc(overspeed["time"])
    episode = [f["speed"] * 3.6 for f in fixes if start <= f["utc"] < start + overspeed["duration_s"]]
    assert min(episode) > 30 and abs(max(episode) - overspeed["peak_kmh"]) < 1.0


def test_fences_load_in_the_agent(bundled):
    fence_set = GeofenceSet.load(BUNDLED.with_suffix(".geojson"))
    assert len(fence_set) == 4
    assert sorted(f["properties"]["type"] for f in json.loads(BUNDLED.with_suffix(".geojson").read_text())["features"]) == [
        "customer_stop", "customer_stop", "depot", "speed_zone"]


def test_can_log_decodes_with_the_agents_j1939_definitions_and_matches_the_gps(bundled):
    fixes, _ = bundled
    decoder = FrameDecoder(J1939Database.load())
    signals: dict[str, list[tuple[float, float]]] = {}
    for line in BUNDLED.with_suffix(".candump.log").read_text().splitlines():
        stamp, _, frame = line.split()
        can_id, data = frame.split("#")
        for item in decoder.feed(float(stamp[1:-1]), "can0", int(can_id, 16), True, bytes.fromhex(data)):
            signals.setdefault(item.name, []).append((item.time, item.value))
    rpm = dict(signals["EngineSpeed"])
    wheel = {round(t, 1): v for t, v in signals["WheelBasedVehicleSpeed"]}  # 0.4 ms after its EEC1
    fuel = [v for _, v in signals["EngineFuelRate"]]
    assert abs(min(rpm) - fixes[0]["utc"]) < 0.01  # CAN and NMEA start together, in the same UTC
    idle = [v for t, v in rpm.items() if fixes[0]["utc"] + 5 < t < fixes[0]["utc"] + 15]
    assert all(600 <= v <= 750 for v in idle)
    assert max(rpm.values()) <= 2200
    assert 0.5 < np.median(fuel) < 15
    for fix in fixes[::10]:
        assert abs(wheel[round(fix["utc"], 1)] - fix["speed"] * 3.6) < 1.0  # wheel speed agrees with the GPS


def test_same_seed_same_files_other_seed_other_noise(tmp_path):
    a = generate.nmea_lines(generate.build(generate.DELFT_ROUTE, generate.bundled_plan(), seed=7))
    b = generate.nmea_lines(generate.build(generate.DELFT_ROUTE, generate.bundled_plan(), seed=7))
    c = generate.nmea_lines(generate.build(generate.DELFT_ROUTE, generate.bundled_plan(), seed=8))
    assert a == b and a != c


@st.composite
def _routes(draw):
    """3-6 waypoints, 150-700 m apart, turning by up to 120 degrees, somewhere between 60 S and 60 N."""
    lat, lon = draw(st.floats(-60, 60)), draw(st.floats(-179, 179))
    heading = draw(st.floats(0, 360))
    points = [(lat, lon)]
    for _ in range(draw(st.integers(2, 5))):
        heading += draw(st.floats(-120, 120))
        dist = draw(st.floats(150, 700))
        lat += dist * math.cos(math.radians(heading)) / 111_195.0
        lon += dist * math.sin(math.radians(heading)) / (111_195.0 * math.cos(math.radians(lat)))
        points.append((lat, lon))
    return points


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_routes(), st.floats(0.2, 0.8), st.floats(5, 200))
def test_any_route_gives_bounded_speed_acceleration_and_cornering(points, stop_at, dwell):
    route = Route(points)
    profile = Profile(cruise_mps=[13.0] * (len(points) - 1))
    truth = simulate(route, profile, [Stop(stop_at * route.length_m, dwell, "x")], pre_idle_s=5, post_park_s=5)
    assert truth.speed.max() <= 13.0 + 1e-6
    assert truth.accel.max() <= profile.accel_mps2 + 1e-6 and truth.accel.min() >= -profile.decel_mps2 - 1e-6
    # Lateral acceleration v * dpsi/dt over each second stays at a comfortable level.
    step = 10
    turn = np.radians((np.diff(truth.heading[::step]) + 180) % 360 - 180)
    assert np.max(np.abs(turn) * truth.speed[step::step]) < 2.5
    (stop, arrive, depart), = truth.stops
    still = (truth.t > arrive) & (truth.t < depart)
    assert np.all(truth.speed[still] == 0) and depart - arrive == pytest.approx(dwell)
    # The distance travelled is the route's length, and the speed integrates to it.
    assert truth.s[-1] == pytest.approx(route.length_m, abs=0.5)
    assert np.sum(truth.speed) * 0.1 == pytest.approx(route.length_m, rel=0.01)


def _cli(*args: str):
    return subprocess.run([sys.executable, "-c", "import sys; from sim.cli import main; sys.exit(main())", "generate", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=60)


def test_cli_generates_from_waypoints_with_a_customer_stop(tmp_path):
    proc = _cli("--waypoints", "48.1351,11.5820 48.1370,11.5825 48.1372,11.5900 48.1400,11.5905",
                "--stop", "0.5:90:Bakery", "--harsh-brake", "none", "--speed-zone", "none",
                "--dropout", "0.2:4", "--out", str(tmp_path), "--name", "munich", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["munich.candump.log", "munich.geojson", "munich.nmea", "munich.truth.json"]
    truth = json.loads((tmp_path / "munich.truth.json").read_text())
    assert [s["name"] for s in truth["stops"]] == ["Bakery"] and truth["stops"][0]["geofence_id"] == "customer-a"
    assert {"stop_arrive", "stop_depart"} <= {e["type"] for e in truth["events"]}
    assert "harsh_brake" not in {e["type"] for e in truth["events"]}
    invalid = [l for l in (tmp_path / "munich.nmea").read_text().splitlines() if l.startswith("$GPRMC") and ",V," in l]
    assert len(invalid) == 4 and truth["dropouts"][0]["seconds"] == 4 and truth["unchecked_types"]


def test_cli_generates_from_a_geojson_line(tmp_path):
    line = {"type": "Feature", "properties": {}, "geometry": {"type": "LineString", "coordinates": [
        [4.3475, 52.006], [4.353, 52.006], [4.3533, 52.0082], [4.36, 52.0083], [4.3603, 52.0105]]}}
    (tmp_path / "route.geojson").write_text(json.dumps(line))
    proc = _cli("--route", str(tmp_path / "route.geojson"), "--out", str(tmp_path), "--name", "line")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "line.nmea").read_text().count("$GPRMC") > 200


def test_cli_refuses_a_plan_too_close_to_a_threshold_with_one_line(tmp_path):
    proc = _cli("--stop", "0.3:65:Shop", "--out", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "threshold 60" in proc.stderr


def test_cli_bad_waypoints_and_missing_route_are_one_line_each(tmp_path):
    for args in (["--waypoints", "52.0,4.3 nonsense"], ["--route", str(tmp_path / "none.geojson")]):
        proc = _cli(*args, "--out", str(tmp_path))
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_gate_puts_the_waiting_van_on_the_yard_fence_line():
    plan = generate.default_plan()
    plan.gate = (0.75, 90.0)
    drive = generate.build(generate.DELFT_ROUTE, plan, seed=2)
    yard = next(f for f in drive.fences if f["id"] == "yard")
    assert yard["properties"]["type"] == "depot"
    (_, arrive, depart), = [v for v in drive.truth.stops if abs(v[0].at_m - 0.75 * drive.route.length_m) < 1]
    waiting = (drive.truth.t > arrive) & (drive.truth.t < depart)
    lat, lon = drive.truth.lat[waiting][0], drive.truth.lon[waiting][0]
    x, y = drive.route.to_xy(lat, lon)
    ring = [drive.route.to_xy(la, lo) for lo, la in yard["geometry"]["coordinates"][0]]
    boundary = shapely.LineString(ring)
    assert boundary.distance(shapely.Point(x, y)) < 0.1  # on the line, to the centimetre
    truth = generate.ground_truth(drive)
    yard_events = [e["type"] for e in truth["events"] if e.get("geofence_id") == "yard"]
    assert yard_events == ["geofence_enter", "geofence_exit"]  # in once it drives in, out at the far side
