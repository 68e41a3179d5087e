"""Write the wire format golden vectors: tests/golden/wire/<name>.bin and <name>.json.

    .venv/bin/python bench/make_golden.py            # (re)write them
    .venv/bin/python bench/make_golden.py --check    # exit 1 if a file would change

Each .bin is one v2 payload as the encoder writes it; each .json is what a decoder must make of it
(docs/wire-format.md, "Golden vectors"). The cases cover every kind, every field type, absent
values, raw float64 columns, the course modulus, extremes and an empty batch. Real positions come
from the project's own bundled drive, so the vectors need nothing outside the repository.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import msgspec

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent.decode.nmea import decode_file  # noqa: E402
from agent.record import Event, Fix, Record, Signal, Status  # noqa: E402
from agent.wire import columnar, decode_batch  # noqa: E402

OUT = REPO / "tests" / "golden" / "wire"
DEVICE = "truck-0001"


def golden_json(payload: bytes) -> dict:
    """The decoded JSON of a payload: {"device", "version", "records": [{"seq", "utc", "kind", ...}]}."""
    batch = decode_batch(payload)
    records = [{"seq": r.seq, "utc": r.utc, **msgspec.to_builtins(r.data)} for r in batch.records]
    return {"device": batch.device_id, "version": batch.version, "records": records}


def _drive(count: int, start_seq: int = 1000) -> list[Record]:
    fixes = list(decode_file(REPO / "sim" / "drives" / "delivery_route.nmea"))[100 : 100 + count]
    return [Record(utc=utc, mono=0.0, data=fix, seq=start_seq + i) for i, (utc, fix) in enumerate(fixes)]


def cases() -> dict[str, list[Record]]:
    """The batches the vectors hold, by name."""
    t0 = 1_772_440_200.0  # 2026-03-02T08:30:00Z
    drive = _drive(60)
    mixed: list[Record] = []
    for i, fix_record in enumerate(_drive(12, start_seq=5000)):
        seq = 5000 + 5 * i
        mixed.append(Record(utc=fix_record.utc, mono=0.0, data=fix_record.data, seq=seq))
        signals = [
            Signal(name="EngineSpeed", value=800 + 12.125 * i, unit="rpm", source="can0"),
            Signal(name="WheelBasedVehicleSpeed", value=round(fix_record.data.speed_mps * 3.6 * 256) / 256, unit="km/h",
                   source="can0"),
            Signal(name="EngineFuelRate", value=None if i % 4 == 3 else 2.5 + 0.05 * i, unit="L/h", source="can0"),
            Signal(name="ActualEnginePercentTorque", value=float(10 + i % 3), unit="%", source="can0"),
        ]
        mixed.extend(Record(utc=fix_record.utc, mono=0.0, data=s, seq=seq + 1 + j) for j, s in enumerate(signals))
    sparse = [
        Record(utc=t0 + i * 0.5, mono=0.0, seq=i, data=Fix(
            lat=52.0 + i * 1e-5, lon=4.3 - i * 2e-5,
            alt_m=None if i % 3 else 10.0 + i,
            hdop=None if i == 2 else 0.9,
            quality=1 if i < 4 else None,
            status="A" if i % 2 else "V",
            faa_mode=None if i < 5 else "D",
        ))
        for i in range(9)
    ]
    course = [
        Record(utc=t0 + i, mono=0.0, seq=i, data=Fix(lat=-33.9, lon=151.2, course_deg=c, speed_mps=s))
        for i, (c, s) in enumerate([(358.0, 5.0), (359.5, 5.1), (0.5, 5.3), (2.0, 5.2), (1.0, 5.0), (359.0, 4.9)])
    ]
    extremes = [
        Record(utc=0.0, mono=0.0, seq=0, data=Fix(lat=-90.0, lon=-180.0, alt_m=-1e300, course_deg=359.99)),
        Record(utc=4_102_444_800.0, mono=0.0, seq=2**50, data=Fix(lat=90.0, lon=180.0, alt_m=8848.86, course_deg=0.0,
                                                                    quality=-(2**50), sats_used=2**50)),
        Record(utc=1.001, mono=0.0, seq=7, data=Signal(name="ratio", value=1 / 3)),
        Record(utc=1.002, mono=0.0, seq=8, data=Signal(name="ratio", value=-1.5e-9)),
        Record(utc=1.003, mono=0.0, seq=9, data=Signal(name="ratio", value=None)),
    ]
    events = [
        Record(utc=t0 + 1.25, mono=0.0, seq=41, data=Event(type="geofence_enter", lat=52.0123456, lon=4.3654321,
                                                            attrs={"zone": "depot", "dwell_s": 12.5})),
        Record(utc=t0 + 9.0, mono=0.0, seq=44, data=Event(type="harsh_braking", lat=None, lon=None,
                                                           attrs={"g": -0.45, "ok": False, "n": None, "count": 3})),
        Record(utc=t0 + 0.0, mono=0.0, seq=40, data=Status(type="agent_start", attrs={"version": "0.1.0"})),
        Record(utc=t0 + 2.0, mono=0.0, seq=42, data=Status(type="records_dropped", attrs={"count": 17})),
        Record(utc=t0 + 2.0, mono=0.0, seq=43, data=Fix(lat=52.0, lon=4.0)),
    ]
    return {
        "empty": [],
        "drive_60_fixes": drive,
        "fixes_and_signals": mixed,
        "absent_values": sparse,
        "course_wrap": course,
        "extremes": extremes,
        "events_and_status": events,
        "one_event": events[:1],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare with the files in the repository")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    changed = []
    for name, records in cases().items():
        payload = columnar.encode(DEVICE, records)
        text = json.dumps(golden_json(payload), indent=1, allow_nan=False) + "\n"
        for path, content in ((OUT / f"{name}.bin", payload), (OUT / f"{name}.json", text.encode())):
            if not path.exists() or path.read_bytes() != content:
                changed.append(path.name)
                if not args.check:
                    path.write_bytes(content)
    print(("would change: " if args.check else "wrote: ") + (", ".join(changed) or "nothing"))
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
