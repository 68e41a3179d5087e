"""Bytes on the wire per record and encode/decode rates of wire format v2 (issue 6).

    .venv/bin/python bench/bench_wire.py [--runs 5]

Drives: the real ones in ../shared/corpus/drives (GPS only) and the project's own 1 Hz drive
sim/drives/delivery_route.nmea with four J1939 signals from its candump log, sampled at each fix
(the latest value, stamped with the fix time). Records go in batches of 60 with consecutive
sequence numbers, as the buffer hands them to the publisher.

"Whole PUBLISH" counts the MQTT 5 PUBLISH packet (OASIS MQTT 5.0 section 3.3): fixed header,
topic, packet identifier (QoS 1), properties and payload, with the properties
agent/publish/mqtt_link.py sends: the content type, the ``backlog`` user property, and the topic
alias (the topic name only in the first message of a connection).
Comparisons: per-record JSON (one message per record, the flat shape of ``to_json_dict`` without
null fields), the v1 batch (zlib JSON), the v2 body compressed with zstd instead of DEFLATE (when
the zstandard package is installed), and Teltonika Codec 8 sizes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import zlib
from pathlib import Path

import msgspec
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent.decode.can_decoder import FrameDecoder  # noqa: E402
from agent.decode.can_log import iter_frames  # noqa: E402
from agent.decode.j1939 import J1939Database  # noqa: E402
from agent.decode.nmea import decode_file  # noqa: E402
from agent.record import Record, Signal, to_json_dict  # noqa: E402
from agent.wire import columnar, encode_batch  # noqa: E402

DEVICE = "truck-0001"
TOPIC = f"telematics/{DEVICE}/telemetry"
BATCH = 60
# The four J1939 signals of the project's own drive (J1939-71 SPNs 190, 84, 183, 513).
SIGNALS = ("EngineSpeed", "WheelBasedVehicleSpeed", "EngineFuelRate", "ActualEnginePercentTorque")
# Teltonika Codec 8 (public protocol description): an AVL record is timestamp 8 + priority 1 + GPS
# element 15 + IO header 6 (event id, total count and four per-size counts) = 30 bytes without I/O;
# an I/O element is its 1-byte id plus a 1/2/4/8-byte value. A packet adds preamble 4, data length 4,
# codec id 1, two record counts 2 and CRC 4 = 15 bytes.
CODEC8_RECORD, CODEC8_PACKET = 30, 15
CODEC8_IO = {
    "EngineSpeed": 1 + 2, "WheelBasedVehicleSpeed": 1 + 2, "EngineFuelRate": 1 + 4, "ActualEnginePercentTorque": 1 + 1,
}


def _varint_len(n: int) -> int:
    """Bytes of an MQTT variable byte integer (MQTT 5.0 section 1.5.5)."""
    return 1 if n < 128 else 2 if n < 16384 else 3 if n < 2097152 else 4


def publish_size(payload: bytes, content_type: str, first: bool, backlog: bool = True) -> int:
    """Bytes of the whole QoS 1 PUBLISH packet carrying ``payload``, as the agent's link sends it."""
    props = Properties(PacketTypes.PUBLISH)
    props.ContentType = content_type
    if backlog:
        props.UserProperty = [("backlog", "0")]
    props.TopicAlias = 1
    topic = TOPIC if first else ""  # MQTT 5.0 section 3.3.2.3.4: the alias stands for the topic
    remaining = 2 + len(topic.encode()) + 2 + len(props.pack()) + len(payload)
    return 1 + _varint_len(remaining) + remaining


def corpus_drive(path: Path) -> list[Record]:
    return [Record(utc=utc, mono=0.0, data=fix, seq=i) for i, (utc, fix) in enumerate(decode_file(path))]


def delivery_drive() -> tuple[list[Record], int]:
    """The project's own drive: each fix followed by four signal records; returns (records, fixes)."""
    decoder = FrameDecoder(J1939Database.load())
    samples: list[tuple[float, str, float | None, str | None]] = []
    for frame in iter_frames(REPO / "sim" / "drives" / "delivery_route.candump.log"):
        for item in decoder.feed(frame.time, frame.bus, frame.id, frame.extended, frame.data):
            if item.name in SIGNALS:
                samples.append((item.time, item.name, item.value, item.unit))
    records: list[Record] = []
    latest: dict[str, tuple[float | None, str | None]] = {}
    fixes = list(decode_file(REPO / "sim" / "drives" / "delivery_route.nmea"))
    i = 0
    for utc, fix in fixes:
        while i < len(samples) and samples[i][0] <= utc:
            latest[samples[i][1]] = samples[i][2:]
            i += 1
        records.append(Record(utc=utc, mono=0.0, data=fix, seq=len(records)))
        for name in SIGNALS:
            if name in latest:
                value, unit = latest[name]
                signal = Signal(name=name, value=value, unit=unit, source="can0")
                records.append(Record(utc=utc, mono=0.0, data=signal, seq=len(records)))
    return records, len(fixes)


def sizes(records: list[Record], epochs: int) -> dict[str, float]:
    """Bytes per record (and per epoch, i.e. per second of a 1 Hz drive) of every encoding."""
    batches = [records[i : i + BATCH] for i in range(0, len(records), BATCH)]
    out: dict[str, float] = {}
    v2 = [encode_batch(DEVICE, b, 2) for b in batches]
    v1 = [encode_batch(DEVICE, b, 1) for b in batches]
    n = len(records)
    out["v2 payload"] = sum(len(p) for p, _ in v2) / n
    out["v2 PUBLISH (as the agent sends it)"] = sum(
        publish_size(p, ct, i == 0) for i, (p, ct) in enumerate(v2)
    ) / n
    bodies = [zlib.decompress(p[1:], columnar.WBITS) for p, _ in v2]
    out["v2 body, msgpack uncompressed"] = sum(map(len, bodies)) / n
    try:
        import zstandard
    except ImportError:
        print("  (the zstandard package is not installed: no zstd comparison)")
    else:
        for level in (3, 9, 19):
            zstd = zstandard.ZstdCompressor(level=level, write_checksum=False)
            out[f"v2 body with zstd -{level} instead of DEFLATE"] = sum(1 + len(zstd.compress(b)) for b in bodies) / n
    out["v1 PUBLISH (zlib JSON batch)"] = sum(publish_size(p, ct, i == 0) for i, (p, ct) in enumerate(v1)) / n
    json_sizes = [len(msgspec.json.encode({k: v for k, v in to_json_dict(r).items() if v is not None})) for r in records]
    out["per-record JSON payload"] = sum(json_sizes) / n
    out["per-record JSON PUBLISH (alias, content type)"] = sum(
        publish_size(b"x" * s, "application/json", False, backlog=False) for s in json_sizes
    ) / n
    per_epoch_io = sum(CODEC8_IO[r.data.name] for r in records if isinstance(r.data, Signal)) / max(epochs, 1)
    codec8 = CODEC8_RECORD + per_epoch_io + CODEC8_PACKET * len(batches) / max(epochs, 1)
    out["Codec 8, per fix epoch (AVL record + I/O)"] = codec8
    out["records per epoch"] = n / max(epochs, 1)
    return out


def rates(all_batches: list[list[Record]], runs: int, clock) -> tuple[float, float]:
    """Median encode and decode rates in records/s over ``runs`` passes, timed by ``clock``."""
    n = sum(map(len, all_batches))
    enc, dec = [], []
    for _ in range(runs):
        start = clock()
        payloads = [columnar.encode(DEVICE, b) for b in all_batches]
        mid = clock()
        for p in payloads:
            columnar.decode(p)
        end = clock()
        enc.append(n / (mid - start))
        dec.append(n / (end - mid))
    return statistics.median(enc), statistics.median(dec)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    drives: dict[str, tuple[list[Record], int]] = {}
    corpus = REPO.parent / "shared" / "corpus" / "drives"
    for path in sorted(corpus.glob("*")) if corpus.is_dir() else []:
        records = corpus_drive(path)
        drives[path.name] = (records, len(records))
    if not drives:
        print(f"(no corpus at {corpus}: real drives skipped)")
    drives["delivery_route (own, + 4 CAN signals)"] = delivery_drive()
    for name, (records, epochs) in drives.items():
        print(f"\n{name}: {len(records)} records, {epochs} fix epochs, batches of {BATCH}")
        for label, value in sizes(records, epochs).items():
            per_epoch = "" if "epoch" in label else f"   ({value * len(records) / epochs:6.1f} per epoch)"
            print(f"  {label:46s} {value:7.2f}{per_epoch}")
    all_batches = [r[i : i + BATCH] for r, _ in drives.values() for i in range(0, len(r), BATCH)]
    print()
    # CPU time of this process as well as wall time: on a shared 2-core machine the wall clock also
    # counts the time other processes held the core.
    for label, clock in (("wall clock", time.perf_counter), ("CPU time", time.process_time)):
        enc, dec = rates(all_batches, args.runs, clock)
        print(f"v2 rates over every drive, {label} (median of {args.runs}): "
              f"encode {enc:,.0f} records/s, decode {dec:,.0f} records/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
