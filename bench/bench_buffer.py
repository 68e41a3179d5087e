"""Benchmarks of the durable buffer and the MQTT link (issue 5's targets); medians go to BENCHMARKS.md.

    .venv/bin/python bench/bench_buffer.py ingest        # durable ingest rate at the default 1 s window
    .venv/bin/python bench/bench_buffer.py wear          # fsyncs (strace) and bytes written per record
    .venv/bin/python bench/bench_buffer.py drain         # a 24 h backlog at 1 Hz through Mosquitto to the collector
    .venv/bin/python bench/bench_buffer.py agent         # the same drain by `telematics-agent run` (default config): its RSS

Each prints one JSON line per run. ``wear`` re-runs itself under ``strace -f -c`` to count fsync and
fdatasync calls; ``/proc/self/io``'s write_bytes counts what reached the block layer.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent.buffer.store import DurableBuffer  # noqa: E402
from agent.clock import SystemClock  # noqa: E402
from agent.config import BufferConfig, MqttConfig  # noqa: E402
from agent.record import Fix, Record, Signal  # noqa: E402
from agent.wire import encode_batch  # noqa: E402


def make_records(start: int, n: int, utc0: float = 1.7e9) -> list[Record]:
    """A 1 Hz drive: one fix and four CAN signals per second (the project's reference mix)."""
    out = []
    for i in range(start, start + n):
        t = utc0 + i // 5
        if i % 5 == 0:
            out.append(Record(utc=t, mono=float(i), data=Fix(lat=48.1 + i * 1e-6, lon=11.5, alt_m=520.0, speed_mps=13.9,
                                                             course_deg=87.5, quality=1, hdop=0.9, sats_used=9, mode=3)))
        else:
            out.append(Record(utc=t, mono=float(i), data=Signal(name=("rpm", "speed", "fuel", "coolant")[i % 5 - 1],
                                                                value=1450.0 + i % 7, unit="rpm", source="can0")))
    return out


def rss_mb() -> float:
    """Resident memory of this process now, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def bench_ingest(args) -> dict:
    """Append as fast as the pipeline thread can, with the committer running at the default window."""
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        buf = DurableBuffer(Path(tmp), BufferConfig(), SystemClock())
        buf.open()
        buf.start()
        chunks = [make_records(i, 1000) for i in range(0, args.records, 1000)]
        started = time.perf_counter()
        for chunk in chunks:
            buf.append(chunk)
        appended = time.perf_counter() - started
        while buf.stats()["committed_seq"] < args.records:
            time.sleep(0.001)
        durable = time.perf_counter() - started
        buf.close()
    return {"bench": "ingest", "records": args.records, "append_per_s": round(args.records / appended),
            "durable_per_s": round(args.records / durable), "seconds_to_durable": round(durable, 3)}


def _io_write_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise RuntimeError("no write_bytes in /proc/self/io")


def bench_wear(args) -> dict:
    """Steady ingest at ``--rate`` records/s for ``--seconds``, every record taken and acked (as the link
    does); reports bytes written per record against its encoded sizes."""
    if not args.under_strace and shutil.which("strace"):
        out = Path(tempfile.mkstemp(suffix=".strace")[1])
        cmd = ["strace", "-f", "-c", "-e", "trace=fsync,fdatasync", "-o", str(out), sys.executable, __file__, "wear",
               "--under-strace", "--rate", str(args.rate), "--seconds", str(args.seconds), "--window", str(args.window)]
        if args.dir:
            cmd += ["--dir", args.dir]
        result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        calls = 0
        for line in out.read_text().splitlines():
            parts = line.split()
            if parts and parts[-1] in ("fsync", "fdatasync"):
                calls += int(parts[3])
        out.unlink()
        result["syncs"] = calls
        result["syncs_per_commit_window"] = round(calls / (args.seconds / args.window), 2)
        return result
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        buf = DurableBuffer(Path(tmp), BufferConfig(commit_window_s=args.window), SystemClock())
        buf.open()
        buf.start()
        sample = make_records(0, 1000)
        import msgspec

        body = statistics.mean(len(msgspec.msgpack.encode(r)) for r in sample)
        for seq, r in enumerate(sample, 1):
            r.seq = seq
        wire = len(encode_batch("truck-1", sample[:60])[0]) / 60
        before = _io_write_bytes()
        started = time.monotonic()
        n = 0
        tick = started
        while time.monotonic() - started < args.seconds:
            due = int((tick - started + 0.1) * args.rate) - n  # 10 ticks/s, fractional rates accumulate
            if due > 0:
                buf.append(make_records(n, due))
                n += due
            while taken := buf.take(500):
                buf.ack([(taken[0].seq, taken[-1].seq)] if taken[-1].seq - taken[0].seq + 1 == len(taken)
                        else [(r.seq, r.seq) for r in taken])
            tick += 0.1
            time.sleep(max(0.0, tick - time.monotonic()))
        buf.close()
        written = _io_write_bytes() - before
    return {"bench": "wear", "rate": args.rate, "window_s": args.window, "seconds": args.seconds, "records": n,
            "write_bytes_per_record": round(written / n, 1), "buffer_body_bytes": round(body, 1),
            "wire_v1_bytes_per_record": round(wire, 1), "ratio_to_body": round(written / n / body, 2)}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bench_drain(args) -> dict:
    """86,400 records (24 h of 1 Hz fixes) stored while offline, then drained to the collector while a live
    fix is appended every second; reports the drain time and each live record's append-to-stored latency."""
    from agent.publish.mqtt_link import MqttLink
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        port = _free_port()
        conf = tmp / "mosquitto.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
        broker = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(conf)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.3)
            buffer_config = BufferConfig(commit_window_s=args.window)
            buf = DurableBuffer(tmp / "agent", buffer_config, SystemClock())
            buf.open()
            for start in range(0, 86_400, 3_600):
                buf.append([Record(utc=1.7e9 + i, mono=float(i), data=Fix(lat=48.1 + i * 1e-6, lon=11.5, speed_mps=13.9))
                            for i in range(start, start + 3_600)])
            buf.close()
            # The collector runs as its own process, as on a server (and not on this process's GIL).
            collector = subprocess.Popen(
                [str(Path(sys.executable).parent / "telematics-collector"), "run", "--port", str(port),
                 "--db", str(tmp / "collector.sqlite"), "--log-level", "WARNING"])
            while not (tmp / "collector.sqlite").exists():
                time.sleep(0.05)
            time.sleep(0.5)
            buf = DurableBuffer(tmp / "agent", buffer_config, SystemClock())
            buf.open()
            buf.start()
            link = MqttLink(MqttConfig(port=port, batch_max_wait_s=args.batch_wait), "truck-1", buf, SystemClock())
            stop = threading.Event()
            thread = threading.Thread(target=link.run, args=(stop,), daemon=True)
            started = time.monotonic()
            thread.start()
            while not link.stats()["connected"]:
                time.sleep(0.01)
            live: dict[int, float] = {}
            peak_rss = rss_mb()
            conn = sqlite3.connect(tmp / "collector.sqlite", timeout=5)
            latencies = []
            next_live = time.monotonic()
            while True:
                now = time.monotonic()
                peak_rss = max(peak_rss, rss_mb())
                if now >= next_live:
                    record = Record(utc=2e9 + now, mono=now, data=Fix(lat=1.0, lon=2.0))
                    buf.append([record])
                    live[record.seq] = now
                    next_live += 1.0
                stored = conn.execute("SELECT count(*) FROM records").fetchone()[0]
                for seq in [s for s in live if conn.execute(
                        "SELECT 1 FROM records WHERE device='truck-1' AND seq=?", (s,)).fetchone()]:
                    latencies.append(time.monotonic() - live.pop(seq))
                if stored >= 86_400 + len(latencies) and not live and stored >= 86_400:
                    break
                if now - started > 120:
                    raise SystemExit("drain did not finish within 120 s")
                time.sleep(0.01)
            drained = time.monotonic() - started
            stop.set()
            thread.join()
            buf.close()
            collector.send_signal(signal.SIGTERM)
            collector.wait()
        finally:
            broker.send_signal(signal.SIGTERM)
            broker.wait()
    return {"bench": "drain", "backlog": 86_400, "seconds": round(drained, 2), "records_per_s": round(86_400 / drained),
            "live_records": len(latencies), "live_latency_max_s": round(max(latencies), 3),
            "live_latency_median_s": round(statistics.median(latencies), 3), "commit_window_s": args.window,
            "batch_max_wait_s": args.batch_wait, "agent_side_peak_rss_mb_during_drain": round(peak_rss, 1)}


def _vm_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def bench_agent(args) -> dict:
    """``telematics-agent run`` with the default config (a GPS pty that stays silent) drains a 24 h backlog
    its buffer holds at start; reports the drain time and the agent process's peak resident memory."""
    import pty

    tools = Path(sys.executable).parent
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        port = _free_port()
        (tmp / "mosquitto.conf").write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
        broker = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(tmp / "mosquitto.conf")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs = [broker]
        try:
            buf = DurableBuffer(tmp / "agent", BufferConfig(), SystemClock())
            buf.open()
            for start in range(0, 86_400, 3_600):
                buf.append([Record(utc=1.7e9 + i, mono=float(i), data=Fix(lat=48.1 + i * 1e-6, lon=11.5, speed_mps=13.9))
                            for i in range(start, start + 3_600)])
            buf.close()
            master, slave = pty.openpty()
            (tmp / "agent.yaml").write_text(
                f"device:\n  id: truck-1\n  data_dir: {tmp / 'agent'}\ngps:\n  port: {os.ttyname(slave)}\n"
                f"mqtt:\n  port: {port}\n"
            )
            db = tmp / "collector.sqlite"
            procs.append(subprocess.Popen([str(tools / "telematics-collector"), "run", "--port", str(port), "--db", str(db),
                                           "--log-level", "WARNING"]))
            while not db.exists():
                time.sleep(0.05)
            time.sleep(0.5)
            started = time.monotonic()
            agent = subprocess.Popen([str(tools / "telematics-agent"), "run", "--config", str(tmp / "agent.yaml")],
                                     stdout=subprocess.DEVNULL, stderr=open(tmp / "agent.log", "wb"))
            procs.append(agent)
            conn = sqlite3.connect(db, timeout=5)
            peak = 0.0
            while conn.execute("SELECT count(*) FROM records").fetchone()[0] < 86_400:
                if agent.poll() is not None:
                    raise SystemExit(f"the agent exited: {(tmp / 'agent.log').read_text()[-2000:]}")
                peak = max(peak, _vm_rss_mb(agent.pid))
                if time.monotonic() - started > 120:
                    raise SystemExit("drain did not finish within 120 s")
                time.sleep(0.05)
            drained = time.monotonic() - started
            for _ in range(20):  # a little longer at rest
                peak = max(peak, _vm_rss_mb(agent.pid))
                time.sleep(0.05)
        finally:
            for proc in reversed(procs):
                proc.send_signal(signal.SIGTERM)
                proc.wait()
    return {"bench": "agent", "backlog": 86_400, "seconds_including_start": round(drained, 2),
            "agent_peak_rss_mb": round(peak, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bench", choices=["ingest", "wear", "drain", "agent"])
    parser.add_argument("--records", type=int, default=500_000)
    parser.add_argument("--rate", type=float, default=5.0, help="wear: records/s")
    parser.add_argument("--seconds", type=float, default=20.0, help="wear: how long")
    parser.add_argument("--window", type=float, default=1.0, help="commit window, s")
    parser.add_argument("--batch-wait", type=float, default=1.0, help="drain: mqtt.batch_max_wait_s")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--dir", default=None, help="where the store goes (default: the system temp dir)")
    parser.add_argument("--under-strace", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    for _ in range(args.runs):
        print(json.dumps({"ingest": bench_ingest, "wear": bench_wear, "drain": bench_drain, "agent": bench_agent}[args.bench](args)), flush=True)
    os._exit(0)


if __name__ == "__main__":
    main()
