"""Simulator benchmarks (not timed tests): results go to BENCHMARKS.md, section "Simulator".

    .venv/bin/python bench/bench_replay.py pacing      # lateness of each NMEA line at 1x, CPU per drive minute
    .venv/bin/python bench/bench_replay.py throughput  # NMEA bytes/s into a pty with pacing off; CAN frames/s
    .venv/bin/python bench/bench_replay.py generate    # seconds to generate the bundled drive

``pacing`` replays 60 s of the bundled drive at 1x and 9600 baud into a pyserial reader and reports
how late each line left compared with its schedule (max of the recorded time and the baud limit),
and the replay's CPU time. ``throughput`` replays the 149-minute Reno-Tahoe corpus drive with
speed and baud limits out of the way, and the bundled drive's CAN log into a virtual bus.
Each figure is the median of 3 runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import can
import serial

from sim import generate
from sim.replay import BITS_PER_BYTE, CanReplay, DriveClock, NmeaReplay
from sim.capture import load_candump

REPO = Path(__file__).resolve().parent.parent
BUNDLED = REPO / "sim" / "drives" / "delivery_route"
TAHOE = REPO.parent / "shared" / "corpus" / "drives" / "dotmorten_NmeaSampleData.txt"


class _Timed(NmeaReplay):
    """NmeaReplay that records when each line left, for the pacing figures."""

    def _write_all(self, data, stop):
        self.sent_at.append(time.monotonic())
        return super()._write_all(data, stop)


def _drain(port: serial.Serial, done: threading.Event) -> int:
    total = 0
    while not done.is_set() or port.in_waiting:
        total += len(port.read(65536))
    return total


def _run(replay: NmeaReplay) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds of the replay thread, bytes read."""
    port = serial.Serial(replay.open_pty(), timeout=0.05)
    done = threading.Event()
    cpu = []

    def work():
        began = time.thread_time()
        replay.run()
        cpu.append(time.thread_time() - began)
        done.set()

    worker = threading.Thread(target=work)
    began = time.monotonic()
    worker.start()
    got = _drain(port, done)
    worker.join()
    wall = time.monotonic() - began
    port.close()
    replay.close()
    return wall, cpu[0], got


def pacing() -> None:
    late_p50, late_p99, cpu_per_min = [], [], []
    for _ in range(3):
        replay = _Timed(BUNDLED.with_suffix(".nmea"), speed=1.0, baud=9600, end_s=60)
        replay.sent_at = []
        _, cpu, _ = _run(replay)
        t0 = replay.sent_at[0]
        wire_free = 0.0
        lateness = []
        for (offset, data), sent in zip(replay.lines, replay.sent_at):
            due = max(t0 + offset, wire_free)
            lateness.append(sent - due)
            wire_free = max(sent, wire_free) + len(data) * BITS_PER_BYTE / 9600
        lateness.sort()
        late_p50.append(lateness[len(lateness) // 2] * 1000)
        late_p99.append(lateness[int(len(lateness) * 0.99)] * 1000)
        cpu_per_min.append(cpu / replay.duration_s * 60 * 1000)
    print(f"pacing at 1x, 9600 baud, 60 s of the bundled drive: lateness p50 {statistics.median(late_p50):.2f} ms, "
          f"p99 {statistics.median(late_p99):.2f} ms; CPU {statistics.median(cpu_per_min):.0f} ms per drive minute")


def throughput() -> None:
    if not TAHOE.is_file():
        sys.exit(f"{TAHOE}: the shared corpus is missing")
    rates = []
    for _ in range(3):
        replay = NmeaReplay(TAHOE, speed=1e9, baud=1_000_000_000)
        wall, _, got = _run(replay)
        rates.append(got / wall)
    print(f"NMEA into a pty, limits off ({TAHOE.name}, {got} bytes): {statistics.median(rates) / 1e6:.1f} MB/s "
          f"(9600 baud needs 960 B/s)")
    frames = load_candump(BUNDLED.with_suffix(".candump.log"))
    fps = []
    for _ in range(3):
        with can.Bus(interface="virtual", channel="bench") as tx, can.Bus(interface="virtual", channel="bench") as rx:
            replay = CanReplay(frames, tx.send)
            began = time.monotonic()
            replay.run(threading.Event(), DriveClock(speed=1e9))
            fps.append(replay.sent / (time.monotonic() - began))
            while rx.recv(0) is not None:
                pass
    print(f"CAN into a virtual bus, limits off ({len(frames)} frames): {statistics.median(fps):,.0f} frames/s "
          f"(the bundled drive needs 21 frames/s, a busy truck bus about 2,000)")


def generation() -> None:
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(3):
            began = time.monotonic()
            generate.write(generate.build(generate.DELFT_ROUTE, generate.bundled_plan()), tmp, "bench")
            times.append(time.monotonic() - began)
    print(f"generate the bundled drive (472 s, NMEA + CAN + fences + truth): {statistics.median(times):.2f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["pacing", "throughput", "generate"])
    {"pacing": pacing, "throughput": throughput, "generate": generation}[parser.parse_args().what]()
