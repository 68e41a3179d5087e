"""``telematics-sim report --db COLLECTOR [--device D] [--fences FILE] -o report.html``: one drive as a page.

The page is self-contained (no external scripts, fonts, styles or tiles), so it opens on a laptop
without a network (``--tiles URL`` adds web-map tiles under the track for a viewer who is online): the records are embedded as JSON and the page's own script draws the track,
geofences, stops and events as inline SVG, and a timeline of speed and engine signals under it.
When the script has drawn everything it sets ``data-rendered="1"`` and counts
(``data-track-points``, ``data-events-drawn``, ...) on ``<body>``: what the browser test reads.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from agent.cli_base import CommandError
from agent.geo import haversine_m
from agent.record import iso_utc

# At most this many signal lanes in the timeline (after speed); the most frequent names win.
MAX_SIGNAL_LANES = 6
# Signals drawn first when present (J1939-71 names of the project's DBC, then OBD-II's).
PREFERRED_SIGNALS = ("EngineSpeed", "WheelBasedVehicleSpeed", "EngineFuelRate", "EngineCoolantTemperature",
                     "FuelLevel1", "EngineRPM", "VehicleSpeed")
MPS_TO_KMH = 3.6


def load_drive(db_target: str, device: str | None) -> dict:
    """The device's fixes, events and signals from a collector database, shaped for the page.

    Raises CommandError when the database cannot be read or the device is unknown or ambiguous.
    """
    from collector.queries import DatabaseError, open_database, records

    try:
        with open_database(db_target) as db:
            devices = [row[0] for row in db.execute(
                "SELECT device FROM records GROUP BY device ORDER BY count(*) DESC")]
            if device is None:
                if len(devices) != 1:
                    raise CommandError(f"{db_target}: holds {len(devices)} devices; name one with --device "
                                       f"({', '.join(devices) or 'none'})")
                device = devices[0]
            elif device not in devices:
                raise CommandError(f"{db_target}: no records of device {device!r} (devices: {', '.join(devices) or 'none'})")
            rows = list(records(db, device, -math.inf, math.inf))
    except DatabaseError as exc:
        raise CommandError(str(exc)) from exc
    track, events, signals = [], [], {}
    for record in rows:
        data = record.data
        if record.kind == "fix":
            speed = None if data.speed_mps is None else round(data.speed_mps * MPS_TO_KMH, 1)
            track.append([round(record.utc, 3), round(data.lat, 7), round(data.lon, 7), speed])
        elif record.kind == "event":
            events.append({"type": data.type, "t": round(record.utc, 3), "time": iso_utc(record.utc),
                           "lat": data.lat, "lon": data.lon, "attrs": data.attrs})
        elif record.kind == "signal" and data.value is not None:
            series = signals.setdefault(data.name, {"name": data.name, "unit": data.unit, "points": []})
            series["points"].append([round(record.utc, 3), data.value])
    names = sorted(signals, key=lambda n: (n not in PREFERRED_SIGNALS, PREFERRED_SIGNALS.index(n)
                                           if n in PREFERRED_SIGNALS else 0, -len(signals[n]["points"]), n))
    distance = sum(haversine_m(a[1], a[2], b[1], b[2]) for a, b in zip(track, track[1:]))
    return {"device": device, "track": track, "events": events,
            "series": [signals[n] for n in names[:MAX_SIGNAL_LANES]],
            "summary": {"fixes": len(track), "events": len(events),
                        "signals": sum(len(s["points"]) for s in signals.values()),
                        "start": iso_utc(rows[0].utc) if rows else None, "end": iso_utc(rows[-1].utc) if rows else None,
                        "distance_km": round(distance / 1000, 2)}}


def load_fences(path: str) -> list[dict]:
    """Geofences of a GeoJSON file (the agent's format, docs/geofences.md) as rings or circles."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise CommandError(f"{path}: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise CommandError(f"{path}: not JSON: {exc}") from exc
    features = doc.get("features", [doc]) if isinstance(doc, dict) else []
    out = []
    for feature in features:
        geometry, props = feature.get("geometry") or {}, feature.get("properties") or {}
        fence = {"id": str(feature.get("id", props.get("id", ""))), "name": props.get("name"), "type": props.get("type")}
        if geometry.get("type") == "Point" and "radius_m" in props:
            lon, lat = geometry["coordinates"][:2]
            out.append({**fence, "circle": [lat, lon, props["radius_m"]]})
        elif geometry.get("type") == "Polygon":
            out.append({**fence, "rings": geometry["coordinates"]})
        elif geometry.get("type") == "MultiPolygon":
            out.append({**fence, "rings": [ring for polygon in geometry["coordinates"] for ring in polygon]})
    return out


def render_html(drive: dict, fences: list[dict], tiles: dict | None = None) -> str:
    """The page: the data as JSON in the page, drawn by its own script. ``tiles`` (``url`` with {z} {x}
    {y}, ``attribution``) puts map tiles under the track when the viewer is online; without it the
    page refers to nothing outside itself."""
    data = json.dumps({**drive, "fences": fences, "tiles": tiles}, separators=(",", ":"))
    # "</" would end the <script> element early; JSON allows "<\/" for it.
    data = data.replace("</", "<\\/")
    title = f"Drive report: {drive['device']}"
    return _PAGE.replace("__TITLE__", _escape(title)).replace("__DATA__", data)


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", required=True, help="the collector's SQLite file or a postgresql:// DSN")
    parser.add_argument("--device", help="the device to draw (default: the only one in the database)")
    parser.add_argument("--fences", help="GeoJSON fence set to draw under the track")
    parser.add_argument("--tiles", metavar="URL", help="map tiles under the track when the viewer is online, "
                        "e.g. 'https://tile.openstreetmap.org/{z}/{x}/{y}.png' (default: none, fully offline)")
    parser.add_argument("--tiles-attribution", default="\u00a9 OpenStreetMap contributors",
                        help="the attribution the tile server asks for (default: OpenStreetMap's)")
    parser.add_argument("-o", "--output", required=True, help="the HTML file to write")


def run(args: argparse.Namespace) -> int:
    drive = load_drive(args.db, args.device)
    fences = load_fences(args.fences) if args.fences else []
    if args.tiles and not all(part in args.tiles for part in ("{z}", "{x}", "{y}")):
        raise CommandError("--tiles: the URL needs {z}, {x} and {y}")
    tiles = {"url": args.tiles, "attribution": args.tiles_attribution} if args.tiles else None
    try:
        Path(args.output).write_text(render_html(drive, fences, tiles), encoding="utf-8")
    except OSError as exc:
        raise CommandError(f"{args.output}: {exc.strerror or exc}") from exc
    s = drive["summary"]
    print(f"{args.output}: {s['fixes']} fixes, {s['events']} events, {s['signals']} signal values, "
          f"{len(fences)} fences of {drive['device']}")
    return 0


_PAGE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body { font: 14px/1.4 system-ui, sans-serif; margin: 1em 2em; color: #222; }
 h1 { font-size: 1.3em; margin: 0 0 .2em; }
 #summary { color: #555; margin-bottom: .8em; }
 svg { background: #fafafa; border: 1px solid #ddd; display: block; }
 #map { width: 100%; max-width: 1000px; height: auto; }
 #timeline { width: 100%; max-width: 1000px; height: auto; margin-top: 1em; }
 .track { fill: none; stroke: #d62728; stroke-width: 3; stroke-linejoin: round; }
 .fence { fill: #1f77b4; fill-opacity: .12; stroke: #1f77b4; stroke-width: 1.5; }
 .fence.speed_zone { fill: #ff7f0e; stroke: #ff7f0e; }
 .fence.depot { fill: #2ca02c; stroke: #2ca02c; }
 .stop { fill: #ffdd57; stroke: #222; stroke-width: 1.5; }
 .event { stroke: #fff; stroke-width: 1.5; }
 .lane-line { fill: none; stroke-width: 1.5; }
 .label { font-size: 11px; fill: #444; }
 table { border-collapse: collapse; margin-top: 1em; font-size: 13px; }
 td, th { border-bottom: 1px solid #eee; padding: 2px 10px 2px 0; text-align: left; }
 .swatch { display: inline-block; width: .8em; height: .8em; border-radius: 50%; margin-right: .3em; }
</style></head>
<body data-rendered="0">
<h1>__TITLE__</h1>
<div id="summary"></div>
<svg id="map" viewBox="0 0 1000 640" role="img" aria-label="track"></svg>
<svg id="timeline" viewBox="0 0 1000 200" role="img" aria-label="timeline"></svg>
<table id="events"><thead><tr><th>time (UTC)</th><th>event</th><th>details</th></tr></thead><tbody></tbody></table>
<script type="application/json" id="drive-data">__DATA__</script>
<script>
"use strict";
window.onerror = function (msg) { document.body.dataset.error = String(msg); };
const NS = "http://www.w3.org/2000/svg";
const D = JSON.parse(document.getElementById("drive-data").textContent);
const COLORS = {geofence_enter: "#1f77b4", geofence_exit: "#17becf", geofence_dwell: "#9467bd",
  stop_approach: "#bcbd22", stop_arrive: "#8c564b", stop_depart: "#e377c2", trip_start: "#2ca02c",
  trip_end: "#2ca02c", idle_start: "#7f7f7f", idle_end: "#7f7f7f", harsh_accel: "#ff7f0e",
  harsh_brake: "#d62728", harsh_corner: "#ff9896", overspeed: "#ff0000"};
const LANE_COLORS = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#ff7f0e", "#17becf"];
function el(parent, name, attrs, text) {
  const node = document.createElementNS(NS, name);
  for (const k in attrs) node.setAttribute(k, attrs[k]);
  if (text !== undefined) node.textContent = text;
  parent.appendChild(node);
  return node;
}
function fmtTime(t) { return new Date(t * 1000).toISOString().slice(11, 19); }

// Map: an equirectangular projection around the drive's middle (metres, good for a city's size).
const map = document.getElementById("map");
const W = 1000, H = 640, PAD = 30, R = 6371008.8;  // mean Earth radius (IUGG)
const pts = [];
D.track.forEach(p => pts.push([p[1], p[2]]));
D.events.forEach(e => { if (e.lat !== null) pts.push([e.lat, e.lon]); });
D.fences.forEach(f => { if (f.circle) pts.push([f.circle[0], f.circle[1]]); });
const lat0 = pts.length ? pts.reduce((a, p) => a + p[0], 0) / pts.length : 0;
const k = Math.cos(lat0 * Math.PI / 180);
const xy = (lat, lon) => [lon * Math.PI / 180 * R * k, -lat * Math.PI / 180 * R];
const P = pts.map(p => xy(p[0], p[1]));
const minX = Math.min(...P.map(p => p[0])), maxX = Math.max(...P.map(p => p[0]));
const minY = Math.min(...P.map(p => p[1])), maxY = Math.max(...P.map(p => p[1]));
const scale = Math.min((W - 2 * PAD) / Math.max(maxX - minX, 1), (H - 2 * PAD) / Math.max(maxY - minY, 1));
// The map is as tall as the drive needs (at most H).
const MH = Math.min(H, Math.ceil((maxY - minY) * scale + 2 * PAD));
map.setAttribute("viewBox", "0 0 " + W + " " + MH);
const px = (lat, lon) => { const q = xy(lat, lon); return [PAD + (q[0] - minX) * scale, PAD + (q[1] - minY) * scale]; };
let fencesDrawn = 0, stopsDrawn = 0, eventsDrawn = 0, lanesDrawn = 0, tilesDrawn = 0;
// Optional web-map tiles (only with --tiles, only online), under everything else. Over a drive's few
// kilometres this projection and Web Mercator differ by far less than a pixel, so tiles are placed
// by their corners' coordinates.
if (D.tiles && navigator.onLine && pts.length) {
  const layer = el(map, "g", {id: "tiles"});
  const unx = X => ((X - PAD) / scale + minX) / (R * k) * 180 / Math.PI;  // map x -> longitude
  const uny = Y => -((Y - PAD) / scale + minY) / R * 180 / Math.PI;  // map y -> latitude
  const CIRC = 40075016.686;  // WGS 84 equator, metres (Web Mercator tile grid)
  const z = Math.max(0, Math.min(19, Math.round(Math.log2(CIRC * k * scale / 256))));
  const n = 2 ** z;
  const tileX = lon => Math.floor((lon + 180) / 360 * n);
  const tileY = lat => Math.floor((1 - Math.asinh(Math.tan(lat * Math.PI / 180)) / Math.PI) / 2 * n);
  const lonOf = x => x / n * 360 - 180;
  const latOf = y => Math.atan(Math.sinh(Math.PI * (1 - 2 * y / n))) * 180 / Math.PI;
  const x0 = tileX(unx(0)), x1 = tileX(unx(W)), y0 = tileY(uny(0)), y1 = tileY(uny(MH));
  for (let x = x0; x <= x1 && tilesDrawn < 100; x++) {
    for (let y = y0; y <= y1 && tilesDrawn < 100; y++) {
      const a = px(latOf(y), lonOf(x)), b = px(latOf(y + 1), lonOf(x + 1));
      el(layer, "image", {href: D.tiles.url.replace("{z}", z).replace("{x}", x).replace("{y}", y), x: a[0], y: a[1],
                          width: b[0] - a[0], height: b[1] - a[1], preserveAspectRatio: "none", opacity: 0.6});
      tilesDrawn++;
    }
  }
  el(map, "text", {x: W - 4, y: MH - 4, class: "label", "text-anchor": "end"}, D.tiles.attribution);
}
const fenceLayer = el(map, "g", {id: "fences"});
D.fences.forEach(f => {
  let shape;
  if (f.circle) {
    const c = px(f.circle[0], f.circle[1]);
    shape = el(fenceLayer, "circle", {cx: c[0], cy: c[1], r: Math.max(f.circle[2] * scale, 2), class: "fence " + (f.type || "")});
  } else {
    const d = f.rings.map(ring => "M" + ring.map(c => px(c[1], c[0]).join(",")).join("L") + "Z").join(" ");
    shape = el(fenceLayer, "path", {d: d, class: "fence " + (f.type || "")});
  }
  el(shape, "title", {}, (f.name || f.id) + (f.type ? " (" + f.type + ")" : ""));
  const box = shape.getBBox();
  el(fenceLayer, "text", {x: box.x, y: box.y - 3, class: "label"}, f.name || f.id);
  fencesDrawn++;
});
const track = el(map, "polyline", {id: "track", class: "track",
  points: D.track.map(p => px(p[1], p[2]).map(v => v.toFixed(1)).join(",")).join(" ")});
const stopLayer = el(map, "g", {id: "stops"});
D.events.filter(e => e.type === "stop_depart" || e.type === "stop_arrive").forEach(e => {
  if (e.type === "stop_arrive" && D.events.some(d => d.type === "stop_depart" && d.t > e.t)) return;  // drawn at its departure
  const c = px(e.lat, e.lon);
  const m = el(stopLayer, "rect", {x: c[0] - 7, y: c[1] - 7, width: 14, height: 14, class: "stop"});
  el(m, "title", {}, "stop" + (e.attrs.geofence_id ? " at " + e.attrs.geofence_id : "") +
     (e.attrs.dwell_s !== undefined ? ", " + Math.round(e.attrs.dwell_s) + " s" : ""));
  stopsDrawn++;
});
const eventLayer = el(map, "g", {id: "event-marks"});
D.events.forEach(e => {
  if (e.lat === null || e.lon === null) return;
  const c = px(e.lat, e.lon);
  const m = el(eventLayer, "circle", {cx: c[0], cy: c[1], r: 5, class: "event " + e.type,
                                      fill: COLORS[e.type] || "#333", "data-type": e.type});
  el(m, "title", {}, e.type + " " + e.time);
  eventsDrawn++;
});
if (D.track.length) {
  const s = px(D.track[0][1], D.track[0][2]), f = px(D.track.at(-1)[1], D.track.at(-1)[2]);
  el(map, "text", {x: s[0] + 8, y: s[1] - 8, class: "label"}, "start " + fmtTime(D.track[0][0]));
  el(map, "text", {x: f[0] + 8, y: f[1] + 14, class: "label"}, "end " + fmtTime(D.track.at(-1)[0]));
}
// A 100 m / 1 km scale bar.
const barM = (maxX - minX) > 3000 ? 1000 : 100;
el(map, "line", {x1: PAD, y1: MH - 8, x2: PAD + barM * scale, y2: MH - 8, stroke: "#222", "stroke-width": 2});
el(map, "text", {x: PAD, y: MH - 12, class: "label"}, barM >= 1000 ? "1 km" : "100 m");

// Timeline: one lane per series (speed from the fixes, then engine signals), events as ticks.
const lanes = [];
if (D.track.some(p => p[3] !== null)) {
  lanes.push({name: "speed", unit: "km/h", points: D.track.filter(p => p[3] !== null).map(p => [p[0], p[3]])});
}
D.series.forEach(s => lanes.push(s));
const tl = document.getElementById("timeline");
const LANE_H = 60, LEFT = 170, RIGHT = 20;
const TH = Math.max(1, lanes.length) * LANE_H + 40;
tl.setAttribute("viewBox", "0 0 1000 " + TH);
const times = lanes.flatMap(l => l.points.map(p => p[0])).concat(D.events.map(e => e.t));
const t0 = Math.min(...times), t1 = Math.max(...times);
const tx = t => LEFT + (t - t0) / Math.max(t1 - t0, 1) * (1000 - LEFT - RIGHT);
lanes.forEach((lane, i) => {
  const top = 10 + i * LANE_H, vals = lane.points.map(p => p[1]);
  const lo = Math.min(...vals), hi = Math.max(...vals);
  const ty = v => top + LANE_H - 10 - (v - lo) / Math.max(hi - lo, 1e-9) * (LANE_H - 20);
  el(tl, "text", {x: 4, y: top + LANE_H / 2, class: "label"}, lane.name + (lane.unit ? " (" + lane.unit + ")" : ""));
  el(tl, "text", {x: LEFT - 4, y: top + 14, class: "label", "text-anchor": "end"}, +hi.toFixed(1));
  el(tl, "text", {x: LEFT - 4, y: top + LANE_H - 10, class: "label", "text-anchor": "end"}, +lo.toFixed(1));
  el(tl, "polyline", {class: "lane-line", stroke: LANE_COLORS[i % LANE_COLORS.length], "data-series": lane.name,
    points: lane.points.map(p => tx(p[0]).toFixed(1) + "," + ty(p[1]).toFixed(1)).join(" ")});
  lanesDrawn++;
});
D.events.forEach(e => {
  const x = tx(e.t);
  const m = el(tl, "line", {x1: x, x2: x, y1: 6, y2: TH - 28, stroke: COLORS[e.type] || "#333", "stroke-opacity": .6,
                            class: "event-tick"});
  el(m, "title", {}, e.type + " " + e.time);
});
if (times.length) {
  el(tl, "text", {x: LEFT, y: TH - 10, class: "label"}, fmtTime(t0));
  el(tl, "text", {x: 1000 - RIGHT, y: TH - 10, class: "label", "text-anchor": "end"}, fmtTime(t1));
}

// The events as a table, and the summary line.
const tbody = document.querySelector("#events tbody");
D.events.forEach(e => {
  const row = tbody.insertRow();
  row.insertCell().textContent = e.time;
  const name = row.insertCell();
  const sw = document.createElement("span");
  sw.className = "swatch"; sw.style.background = COLORS[e.type] || "#333";
  name.append(sw, e.type);
  row.insertCell().textContent = Object.entries(e.attrs).map(([k, v]) => k + " " + v).join(", ");
});
const S = D.summary;
document.getElementById("summary").textContent = S.start ? S.start + " to " + S.end + " \u00b7 " + S.distance_km +
  " km \u00b7 " + S.fixes + " positions \u00b7 " + S.events + " events \u00b7 " + S.signals + " engine values" : "no records";
const box = track.getBBox();
Object.assign(document.body.dataset, {trackPoints: track.points.numberOfItems, trackWidth: Math.round(box.width),
  trackHeight: Math.round(box.height), fencesDrawn: fencesDrawn, stopsDrawn: stopsDrawn, eventsDrawn: eventsDrawn,
  lanesDrawn: lanesDrawn, tilesDrawn: tilesDrawn, rendered: "1"});
</script>
</body></html>
"""
