"""``telematics-sim demo``: the bundled delivery drive through a pty, the agent, MQTT and the collector.

It uses the broker on 127.0.0.1:1883 when one listens there, or starts its own ``mosquitto`` on a free
port; runs the collector and the agent as separate processes, exactly as on a truck and a server;
replays the drive into a pseudo-terminal the agent opens with pyserial; waits until the agent's buffer
is empty and the collector has stored everything; and prints a summary.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from agent.cli_base import CommandError
from sim.broker import BrokerError, MosquittoBroker, end_process, listening

BUNDLED_DRIVE = Path(__file__).resolve().parent / "drives" / "delivery_route.nmea"
BUNDLED_FENCES = BUNDLED_DRIVE.with_suffix(".geojson")
DEMO_BAUD = 115200


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nmea", type=Path, default=BUNDLED_DRIVE, help="the drive to replay (default: the bundled one)")
    parser.add_argument("--speed", type=float, default=20.0, help="replay this many times faster than recorded (default 20)")
    parser.add_argument("--workdir", type=Path, default=Path("demo-data"), help="where the demo keeps its files (emptied first)")
    parser.add_argument("--broker", default=None, help="HOST:PORT of a broker to use instead of 127.0.0.1:1883 or our own")
    parser.add_argument("--timeout", type=float, default=300.0, help="give up after this many seconds")


def _tool(name: str) -> str:
    """A console command installed beside this Python (the project's venv)."""
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if not found:
        raise CommandError(f"{name} is not installed: run scripts/setup first")
    return found


class _Processes:
    """Child processes of the demo, ended by PID when the demo ends however it ends."""

    def __init__(self) -> None:
        self.children: list[subprocess.Popen] = []

    def start(self, args: list[str], log_path: Path) -> subprocess.Popen:
        log = open(log_path, "wb")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        self.children.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, timeout: float = 15.0) -> None:
        end_process(proc, timeout=timeout)

    def stop_all(self) -> None:
        for proc in reversed(self.children):
            self.stop(proc)


def _broker(args: argparse.Namespace, workdir: Path) -> tuple[str, int, MosquittoBroker | None]:
    """The broker to use: ``--broker``, the one on 127.0.0.1:1883, or our own on a free port."""
    if args.broker:
        host, _, port = args.broker.rpartition(":")
        return host or "127.0.0.1", int(port), None
    if listening("127.0.0.1", 1883):
        print("demo: using the Mosquitto broker on 127.0.0.1:1883")
        return "127.0.0.1", 1883, None
    try:
        broker = MosquittoBroker(workdir)
        broker.start()
    except BrokerError as exc:
        raise CommandError(f"no broker on 127.0.0.1:1883, and {exc}") from exc
    print(f"demo: no broker on 127.0.0.1:1883, started mosquitto on 127.0.0.1:{broker.port}")
    return "127.0.0.1", broker.port, broker


def _agent_config(workdir: Path, pty_path: str, host: str, port: int) -> Path:
    path = workdir / "agent.yaml"
    path.write_text(
        "device:\n  id: demo-truck-01\n"
        f"  data_dir: {workdir / 'agent-data'}\n"
        f"gps:\n  port: {pty_path}\n  baud: {DEMO_BAUD}\n"
        # The replay moves the drive to today but keeps its time of day: not "too old" for the demo.
        "  filter: {max_age_s: 86400, max_future_s: 86400}\n"
        f"mqtt:\n  host: {host}\n  port: {port}\n  topic_prefix: demo\n"
        "buffer:\n  commit_window_s: 0.5\n"
        f"edge:\n  geofences:\n    file: {BUNDLED_FENCES}\n"
    )
    return path


def _stored(db: Path) -> int:
    import sqlite3

    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            return conn.execute("SELECT count(*) FROM records").fetchone()[0]
    except sqlite3.Error:
        return 0


def run(args: argparse.Namespace) -> int:
    from sim.replay import NmeaReplay

    if not args.nmea.is_file():
        raise CommandError(f"{args.nmea}: no such drive")
    workdir = args.workdir.resolve()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    procs = _Processes()
    broker = None
    try:
        host, port, broker = _broker(args, workdir)
        db = workdir / "collector.sqlite"
        procs.start(
            [_tool("telematics-collector"), "run", "--host", host, "--port", str(port),
             "--topic-prefix", "demo", "--db", str(db)],
            workdir / "collector.log",
        )
        replay = NmeaReplay(args.nmea, speed=args.speed, keep_dates=False, baud=DEMO_BAUD)
        pty_path = replay.open_pty()
        config = _agent_config(workdir, pty_path, host, port)
        agent = procs.start([_tool("telematics-agent"), "run", "--config", str(config)], workdir / "agent.log")
        print(f"demo: replaying {args.nmea.name} at {args.speed:g}x into {pty_path}; agent log {workdir / 'agent.log'}")
        started = time.monotonic()
        done = threading.Event()
        thread = threading.Thread(target=lambda: (replay.run(), done.set()), daemon=True)
        thread.start()
        last, last_change = -1, time.monotonic()
        interactive = sys.stdout.isatty()
        while True:
            time.sleep(0.5)
            if agent.poll() is not None:
                raise CommandError(f"the agent exited with status {agent.returncode}: see {workdir / 'agent.log'}")
            count = _stored(db)
            if count != last:
                last, last_change = count, time.monotonic()
                if interactive:  # a counter in place on a terminal; one line at the end otherwise
                    print(f"\rdemo: {count} records stored", end="", flush=True)
            if done.is_set() and count > 0 and time.monotonic() - last_change > 3.0:
                break
            if time.monotonic() - started > args.timeout:
                raise CommandError(f"timed out after {args.timeout:g} s with {count} records stored")
        print("" if interactive else f"demo: {last} records stored")
        procs.stop(agent)
        summary = subprocess.run(
            [_tool("telematics-collector"), "summary", "--db", str(db)], capture_output=True, text=True
        )
        print(summary.stdout, end="")
        if summary.returncode != 0:
            raise CommandError(f"collector summary failed: {summary.stderr.strip()}")
        print(f"demo: done in {time.monotonic() - started:.1f} s; files in {workdir}")
        return 0
    finally:
        procs.stop_all()
        if broker is not None:
            broker.stop()
