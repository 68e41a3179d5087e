"""Recorder benchmark (not a timed test): what recording raw CAN and NMEA costs; results in BENCHMARKS.md.

    .venv/bin/python bench/bench_recorder.py

Loops the real J1939 truck capture (../shared/corpus/can) held in memory through ``Recorder.can``
(a candump -L line per frame, buffered writes, rotation at 16 MiB) and the bundled NMEA drive through
``Recorder.nmea`` in 1 KiB chunks, into a temporary directory on this machine's disk. Prints the
median of 5 runs: frames/s and bytes/s on one core, CPU per frame, and what a truck's typical 1,850
frames/s would cost of one core.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import can

from agent.config import RecordConfig
from agent.decode.can_log import iter_frames
from agent.ops.recorder import Recorder

REPO = Path(__file__).resolve().parent.parent
TRUCK = REPO.parent / "shared" / "corpus" / "can" / "css_FCBF0606_j1939_truck.derived.candump.log"
DRIVE = REPO / "sim" / "drives" / "delivery_route.nmea"
FRAMES = 200_000
TRUCK_LOAD_FPS = 1850  # a typical heavy truck's J1939 bus (issue 4)
RUNS = 5


def can_run(messages: list[can.Message], directory: Path) -> tuple[float, int]:
    recorder = Recorder(RecordConfig(enabled=True, dir=str(directory)))
    recorder.open()
    record = recorder.can
    start = time.process_time()
    for i in range(FRAMES):
        record(messages[i % len(messages)], "can0")
    recorder.close()
    elapsed = time.process_time() - start
    return elapsed, sum(p.stat().st_size for p in recorder.can_files.recordings())


def nmea_run(data: bytes, directory: Path) -> tuple[float, int]:
    recorder = Recorder(RecordConfig(enabled=True, dir=str(directory)))
    recorder.open()
    chunks = [data[i:i + 1024] for i in range(0, len(data), 1024)]
    start = time.process_time()
    for _ in range(50):
        for chunk in chunks:
            recorder.nmea(chunk)
    recorder.close()
    return time.process_time() - start, 50 * len(data)


def main() -> None:
    messages = [can.Message(timestamp=f.time, arbitration_id=f.id, is_extended_id=f.extended, data=f.data)
                for f in iter_frames(TRUCK) if not f.error]
    data = DRIVE.read_bytes()
    can_times, nmea_times = [], []
    for _ in range(RUNS):
        with tempfile.TemporaryDirectory() as tmp:
            elapsed, size = can_run(messages, Path(tmp) / "can")
            can_times.append(elapsed)
            nmea_elapsed, nmea_bytes = nmea_run(data, Path(tmp) / "nmea")
            nmea_times.append(nmea_elapsed)
    per_frame = statistics.median(can_times) / FRAMES
    print(f"CAN: {FRAMES / statistics.median(can_times):,.0f} frames/s on one core, {per_frame * 1e6:.2f} us CPU "
          f"per frame, {size / FRAMES:.1f} bytes per frame on disk; at {TRUCK_LOAD_FPS} frames/s: "
          f"{per_frame * TRUCK_LOAD_FPS * 100:.2f}% of one core, {size / FRAMES * TRUCK_LOAD_FPS * 3600 / 2**20:.0f} MiB/h")
    print(f"NMEA: {nmea_bytes / statistics.median(nmea_times) / 2**20:,.0f} MiB/s on one core (1 KiB reads)")


if __name__ == "__main__":
    main()
