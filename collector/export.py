"""A device's track as GeoJSON (RFC 7946), GPX 1.1 or CSV, from its stored fixes."""

from __future__ import annotations

import csv
import io
import json
from typing import Iterable, TextIO
from xml.sax.saxutils import escape

from agent.record import Fix, Record, iso_utc

FORMATS = ("geojson", "gpx", "csv")
# CSV columns: the fix fields a spreadsheet user wants first, then the rest of a Fix.
CSV_FIELDS = ("time", "seq", "lat", "lon", "alt_m", "speed_mps", "course_deg", "hdop", "sats_used", "quality", "mode")


def write(fmt: str, device: str, fixes: Iterable[Record], out: TextIO) -> int:
    """Write ``fixes`` (Records of Fix, in time order) to ``out`` in ``fmt``; returns how many."""
    return {"geojson": _geojson, "gpx": _gpx, "csv": _csv}[fmt](device, list(fixes), out)


def _geojson(device: str, fixes: list[Record], out: TextIO) -> int:
    # RFC 7946 section 3.1.1: positions are [longitude, latitude(, altitude)].
    coords = [[r.data.lon, r.data.lat] + ([r.data.alt_m] if r.data.alt_m is not None else []) for r in fixes]
    feature = {
        "type": "Feature",
        "geometry": {"type": "LineString", "coordinates": coords} if len(coords) > 1 else
                    {"type": "Point", "coordinates": coords[0]} if coords else None,
        "properties": {
            "device": device,
            "times": [iso_utc(r.utc) for r in fixes],
            "seqs": [r.seq for r in fixes],
            "speeds_mps": [r.data.speed_mps for r in fixes],
        },
    }
    json.dump({"type": "FeatureCollection", "features": [feature] if fixes else []}, out)
    out.write("\n")
    return len(fixes)


def _gpx(device: str, fixes: list[Record], out: TextIO) -> int:
    out.write('<?xml version="1.0" encoding="UTF-8"?>\n'
              '<gpx version="1.1" creator="telematics-collector" xmlns="http://www.topografix.com/GPX/1/1">\n'
              f"  <trk>\n    <name>{escape(device)}</name>\n    <trkseg>\n")
    for r in fixes:
        fix: Fix = r.data
        ele = f"<ele>{fix.alt_m}</ele>" if fix.alt_m is not None else ""
        out.write(f'      <trkpt lat="{fix.lat!r}" lon="{fix.lon!r}">{ele}<time>{iso_utc(r.utc)}</time></trkpt>\n')
    out.write("    </trkseg>\n  </trk>\n</gpx>\n")
    return len(fixes)


def _csv(device: str, fixes: list[Record], out: TextIO) -> int:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for r in fixes:
        writer.writerow([iso_utc(r.utc), r.seq] + ["" if (v := getattr(r.data, f)) is None else v for f in CSV_FIELDS[2:]])
    return len(fixes)


def render(fmt: str, device: str, fixes: Iterable[Record]) -> str:
    """The export as one string (for tests and small tracks)."""
    buffer = io.StringIO()
    write(fmt, device, fixes, buffer)
    return buffer.getvalue()
