"""Benchmark of the NMEA path (issue 3's target): framing, parsing and epoch assembly, not a timed test.

    .venv/bin/python bench/bench_nmea.py            # decoder only: 5 runs; medians as one JSON line
    .venv/bin/python bench/bench_nmea.py live 20    # GpsSerialSource on a pty at 10 Hz for 20 s
    .venv/bin/python bench/bench_nmea.py idle 150   # the decoder fed one epoch every 100 ms, 150 times

The input is a real multi-constellation receiver (u-blox NEO-M9N: RMC VTG GGA GSA x4 GSV x12 GLL GST
GBS ZDA, about 24 sentences per epoch) from ../shared/corpus/nmea, repeated to about 60,000
sentences and fed in 256-byte reads (what a read of everything waiting returns every ~20 ms at
115200 baud). CPU time is the process's own (time.process_time). The 10 Hz figure is that receiver
at 10 epochs per second: 10 x (CPU per epoch), as a share of one core and as CPU seconds per hour.
Target: under 0.5% of one core.

``live`` measures the whole source instead: a writer thread sends that receiver's epochs into a real
pty at 10 Hz (at 460800 baud a 10 Hz M9N with every sentence enabled needs ~14 kB/s: 115200 baud
carries only 11.5 kB/s), GpsSerialSource reads it with pyserial on its own thread, and the source
thread's own CPU time (its CLOCK_THREAD_CPUTIME_ID, from the port being open to the end) is
divided by the wall time. ``reads`` is how many reads brought bytes: the pty hands each epoch's
write over in one piece, so one read per epoch unless the source coalesces (gps_serial.COALESCE_S).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent.decode.nmea import NmeaDecoder  # noqa: E402

CAPTURE = REPO.parent / "shared" / "corpus" / "nmea" / "ublox-neo-m9n-nmea.log"
READ_SIZE = 256
RUNS = 5


def stream() -> bytes:
    lines = [line for line in CAPTURE.read_bytes().splitlines(keepends=True) if not line.startswith(b"#")]
    one = b"".join(lines)
    return one * max(1, 60_000 // len(lines))


def run_once(data: bytes) -> tuple[float, int, int]:
    decoder = NmeaDecoder()
    chunks = [data[i:i + READ_SIZE] for i in range(0, len(data), READ_SIZE)]
    began = time.process_time()
    fixes = 0
    for chunk in chunks:
        fixes += len(decoder.feed(chunk))
    fixes += len(decoder.flush())
    cpu = time.process_time() - began
    sentences = decoder.counters["sentences"] + decoder.counters["ignored"]
    return cpu, sentences, decoder.counters["epochs"]


def epochs() -> list[bytes]:
    """The capture's epochs (each starts with its RMC)."""
    groups: list[bytes] = []
    for line in CAPTURE.read_bytes().splitlines(keepends=True):
        if line.startswith(b"#"):
            continue
        if line.startswith(b"$GNRMC") or not groups:
            groups.append(b"")
        groups[-1] += line
    return groups


def live(seconds: float) -> dict:
    import os
    import threading
    import tty

    from agent.clock import SystemClock
    from agent.config import GpsConfig
    from agent.sources.gps_serial import GpsSerialSource

    master, slave = os.openpty()
    tty.setraw(slave)
    config = GpsConfig(port=os.ttyname(slave), baud=460800)  # default epoch_timeout_s
    source = GpsSerialSource(config, SystemClock())
    stop = threading.Event()
    records: list = []
    reads: list[bytes] = []
    source.on_raw = reads.append  # counts the thread's reads (wake-ups with bytes)
    reader = threading.Thread(target=source.run, args=(records.append, stop))
    reader.start()
    while not source.stats["port_open"]:
        time.sleep(0.01)
    # The source thread's own CPU clock, read from here: start-up (imports, open) is not counted.
    clock_id = time.pthread_getcpuclockid(reader.ident)
    cpu_began = time.clock_gettime(clock_id)
    groups = epochs()
    began = time.monotonic()
    sent = 0
    while time.monotonic() - began < seconds:
        os.write(master, groups[sent % len(groups)])
        sent += 1
        time.sleep(max(0.0, began + sent * 0.1 - time.monotonic()))
    time.sleep(0.3)
    wall = time.monotonic() - began
    cpu = time.clock_gettime(clock_id) - cpu_began
    stop.set()
    reader.join()
    os.close(master)
    os.close(slave)
    return {
        "mode": "live", "seconds": round(wall, 1), "epochs_sent": sent, "records": len(records),
        "reads": len(reads),
        "source_thread_cpu_s": round(cpu, 3), "core_percent_at_10hz": round(100 * cpu / wall, 3),
        "baud": config.baud,
    }


def idle(count: int) -> dict:
    """The decoder fed one epoch after sleeping 100 ms, as the source's thread runs it at 10 Hz
    (without coalescing): each feed starts with the caches of a thread that was asleep."""
    decoder = NmeaDecoder()
    groups = epochs()
    costs = []
    for i in range(count):
        time.sleep(0.1)
        began = time.thread_time_ns()
        decoder.feed(groups[i % len(groups)])
        costs.append(time.thread_time_ns() - began)
    quartiles = statistics.quantiles(costs, n=4)
    return {
        "mode": "idle", "epochs": count, "us_per_epoch_median": round(statistics.median(costs) / 1000, 1),
        "us_per_epoch_iqr": [round(quartiles[0] / 1000), round(quartiles[2] / 1000)],
    }


def main() -> int:
    if not CAPTURE.is_file():
        print(f"the shared corpus is not at {CAPTURE}", file=sys.stderr)
        return 2
    if sys.argv[1:2] == ["live"]:
        print(json.dumps(live(float(sys.argv[2]) if len(sys.argv) > 2 else 20.0)))
        return 0
    if sys.argv[1:2] == ["idle"]:
        print(json.dumps(idle(int(sys.argv[2]) if len(sys.argv) > 2 else 150)))
        return 0
    data = stream()
    results = [run_once(data) for _ in range(RUNS)]
    cpu = statistics.median(r[0] for r in results)
    sentences, epochs = results[0][1], results[0][2]
    per_epoch = cpu / epochs
    core_share_10hz = 10 * per_epoch
    print(json.dumps({
        "sentences": sentences,
        "epochs": epochs,
        "sentences_per_epoch": round(sentences / epochs, 1),
        "sentences_per_s": round(sentences / cpu),
        "us_per_sentence": round(1e6 * cpu / sentences, 2),
        "us_per_epoch": round(1e6 * per_epoch, 1),
        "core_percent_at_10hz": round(100 * core_share_10hz, 3),
        "cpu_s_per_hour_at_10hz": round(3600 * core_share_10hz, 1),
        "runs": RUNS,
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
