"""``telematics-sim report``: the bundled drive, stored by the real collector store, drawn by the page's
own script in a real headless Chromium (Debian's package); the DOM it leaves says what it drew."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest
import yaml

from agent.record import Event, Fix, Record, Signal, Status, parse_iso_utc
from collector.store import Incoming, SqliteStore
from conftest import REPO

DRIVES = REPO / "sim" / "drives"
TRUTH = json.loads((DRIVES / "delivery_route.truth.json").read_text())
TOOLS = Path(sys.executable).parent
# The flags the brief asks for: no sandbox (root in CI containers), no GPU, no network chatter.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.environ.get("CI") == "true":
        pytest.fail("CI=true but chromium is not installed (scripts/setup installs it)")
    pytest.skip("chromium is not installed: apt-get install chromium chromium-driver (or scripts/setup)")


def _record(line: dict) -> Record:
    """A line of ``telematics-agent process`` back into a Record."""
    kind, utc = line.pop("kind"), parse_iso_utc(line.pop("time"))
    if kind == "fix":
        data = msgspec.convert(line, Fix)
    elif kind == "signal":
        data = msgspec.convert(line, Signal)
    elif kind == "event":
        data = Event(type=line.pop("type"), lat=line.pop("lat", None), lon=line.pop("lon", None), attrs=line)
    else:
        data = Status(type=line.pop("type"), attrs=line)
    return Record(utc=utc, mono=0.0, data=data)


@pytest.fixture(scope="module")
def drive_db(tmp_path_factory) -> tuple[Path, list[Record]]:
    """The bundled drive with its CAN log and fences, processed and stored by the collector's store."""
    tmp = tmp_path_factory.mktemp("report")
    config = tmp / "agent.yaml"
    config.write_text(yaml.safe_dump({"device": {"id": "truck-7"}, "edge": TRUTH["edge_settings"]}))
    files = TRUTH["files"]
    result = subprocess.run([str(TOOLS / "telematics-agent"), "process", "--nmea", str(DRIVES / files["nmea"]),
                             "--can", str(DRIVES / files["can"]), "--geofences", str(DRIVES / files["geofences"]),
                             "--config", str(config)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    records = [_record(json.loads(line)) for line in result.stdout.splitlines()]
    for seq, record in enumerate(records, 1):
        record.seq = seq
    db = tmp / "collector.sqlite"
    store = SqliteStore(db)
    store.store([Incoming("truck-7", records, backlog=False, received_utc=time.time())], [])
    store.close()
    return db, records


def dump_dom(page: Path, tmp_path: Path) -> tuple[str, dict[str, str]]:
    """The DOM after the page's script ran in headless Chromium, and the data- attributes of <body>."""
    dom = subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
                          page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    body = re.search(r"<body([^>]*)>", dom).group(1)
    return dom, dict(re.findall(r'data-([a-z-]+)="([^"]*)"', body))


def report(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(TOOLS / "telematics-sim"), "report", *args], capture_output=True, text=True, timeout=60)


def test_chromium_draws_the_track_fences_stops_events_and_timeline(drive_db, tmp_path):
    db, records = drive_db
    page = tmp_path / "report.html"
    result = report("--db", str(db), "--fences", str(DRIVES / TRUTH["files"]["geofences"]), "-o", str(page))
    assert result.returncode == 0, result.stderr
    html = page.read_text()
    # Self-contained: nothing is fetched (the SVG namespace URI is a name, not a fetch).
    assert not re.search(r"""(src|href)\s*=|url\(|@import|<link""", html), "the page refers to something outside"
    dom, attrs = dump_dom(page, tmp_path)
    assert "error" not in attrs, attrs
    assert attrs["rendered"] == "1"
    fixes = [r for r in records if r.kind == "fix"]
    events = [r for r in records if r.kind == "event"]
    assert int(attrs["track-points"]) == len(fixes) > 30
    # Laid out by the browser: the track spans most of the 1000 x 640 map.
    assert int(attrs["track-width"]) > 500 or int(attrs["track-height"]) > 400, attrs
    assert int(attrs["events-drawn"]) == len(events) >= 15
    fences = json.loads((DRIVES / TRUTH["files"]["geofences"]).read_text())["features"]
    assert int(attrs["fences-drawn"]) == len(fences) >= 4
    assert int(attrs["stops-drawn"]) == sum(1 for e in events if e.data.type == "stop_depart") >= 2
    assert int(attrs["lanes-drawn"]) >= 3  # speed from the fixes, engine speed, wheel speed, ...
    # The marks are in the DOM the script built, one per event, typed.
    assert len(re.findall(r'<circle[^>]*class="event harsh_brake"', dom)) == sum(
        1 for e in events if e.data.type == "harsh_brake") >= 1
    assert 'data-series="EngineSpeed"' in dom
    assert dom.count("<tr>") == len(events) + 1  # the event table and its header
    assert attrs["tiles-drawn"] == "0" and "<image" not in dom


def test_tiles_go_under_the_track_only_when_asked_for(drive_db, tmp_path):
    db, _ = drive_db
    page = tmp_path / "tiles.html"
    # A closed local port: the browser tries the tiles and gets nothing; the page must still draw.
    result = report("--db", str(db), "--tiles", "http://127.0.0.1:9/{z}/{x}/{y}.png", "-o", str(page))
    assert result.returncode == 0, result.stderr
    dom, attrs = dump_dom(page, tmp_path)
    assert attrs["rendered"] == "1" and "error" not in attrs
    hrefs = re.findall(r'<image href="http://127\.0\.0\.1:9/(\d+)/(\d+)/(\d+)\.png"', dom)
    assert len(hrefs) == int(attrs["tiles-drawn"]) >= 1
    # Delft at 52.0 N, 4.36 E: at zoom z the tile column is floor((lon + 180) / 360 * 2^z) (Web Mercator).
    z, x, _ = map(int, hrefs[0])
    assert 14 <= z <= 19 and x in (int((4.3475 + 180) / 360 * 2**z), int((4.3475 + 180) / 360 * 2**z) - 1)
    assert "OpenStreetMap contributors" in dom
    assert dom.index('id="tiles"') < dom.index('id="fences"') < dom.index('id="track"')  # drawn under
    bad = report("--db", str(db), "--tiles", "http://example.org/tile.png", "-o", str(page))
    assert bad.returncode == 2 and "{z}, {x} and {y}" in bad.stderr


def test_device_choice_and_bad_input_are_one_line_and_exit_2(drive_db, tmp_path):
    db, _ = drive_db
    out = tmp_path / "r.html"
    result = report("--db", str(tmp_path / "missing.sqlite"), "-o", str(out))
    assert result.returncode == 2 and "no such database" in result.stderr and "Traceback" not in result.stderr
    result = report("--db", str(db), "--device", "truck-9", "-o", str(out))
    assert result.returncode == 2 and "no records of device 'truck-9' (devices: truck-7)" in result.stderr
    result = report("--db", str(db), "--device", "truck-7", "-o", str(out))
    assert result.returncode == 0 and out.exists()
    assert result.stdout.startswith(f"{out}: ") and " fixes, " in result.stdout
