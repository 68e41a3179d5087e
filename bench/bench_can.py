"""CAN benchmarks (not timed tests): results go to BENCHMARKS.md.

    .venv/bin/python bench/bench_can.py throughput   # frames/s through the whole CAN path on one core
    .venv/bin/python bench/bench_can.py throughput --requests   # the same, sending J1939 requests
    .venv/bin/python bench/bench_can.py slcan        # CPU of one core at 1,850 frames/s over an slcan pty

``throughput`` loops the real J1939 truck capture held in memory through CanSource.run: python-can
``recv`` from an in-memory bus, the PGN split and per-id plan, the default sampling policies,
decoding, and records handed to ``emit``; with ``--requests`` the bus allows transmitting and
the default J1939 requests (can.j1939) are sent and watched for (the capture answers none of them,
so they are retried throughout). ``slcan`` runs an slcan adapter emulated on a pty in a
second process (sim/slcan_adapter.py) that delivers the capture at a truck's typical 1,850
frames/s in 1 ms USB-like slices, and measures the CPU time of the agent's process receiving it
through CanSource, with the project's ``slcan_buffered`` and, for comparison, python-can's ``slcan``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import can

from agent.clock import SystemClock
from agent.config import CanBusConfig, CanConfig
from agent.decode.can_log import iter_frames
from agent.sources import can_bus
from agent.sources.can_bus import CanSource

REPO = Path(__file__).resolve().parent.parent
TRUCK = REPO.parent / "shared" / "corpus" / "can" / "css_FCBF0606_j1939_truck.derived.candump.log"


def load_messages() -> list[can.Message]:
    return [can.Message(timestamp=f.time, arbitration_id=f.id, is_extended_id=f.extended, data=f.data)
            for f in iter_frames(TRUCK) if not f.error]


class MemoryBus(can.BusABC):
    """Replays MEMORY["messages"] in a loop, moving their timestamps on by the capture's length each
    time round, and sets MEMORY["stop"] after MEMORY["count"] frames."""

    def __init__(self, channel: str, **kwargs) -> None:
        self.channel_info = "memory"
        self._messages = MEMORY["messages"]
        self._span = self._messages[-1].timestamp - self._messages[0].timestamp + 0.01
        self._index = 0
        self._left = MEMORY["count"]
        super().__init__(channel=channel, **kwargs)

    def _recv_internal(self, timeout):
        if self._left == 0:
            MEMORY["stop"].set()
            return None, False
        self._left -= 1
        if self._index == len(self._messages):
            self._index = 0
            for msg in self._messages:
                msg.timestamp += self._span
        msg = self._messages[self._index]
        self._index += 1
        return msg, True

    def send(self, msg, timeout=None):
        if not MEMORY.get("transmit"):
            raise can.CanOperationError("listen-only")
        MEMORY["sent"] += 1


MEMORY: dict = {}


def throughput(runs: int, count: int, requests: bool = False) -> None:
    can.interfaces.BACKENDS["memory"] = (__name__, "MemoryBus")
    can.util.VALID_INTERFACES = can.util.VALID_INTERFACES | {"memory"}
    can_bus.LISTEN_ONLY_ARGS["memory"] = {}
    rates = []
    for _ in range(runs):
        stop = threading.Event()
        MEMORY.update(messages=load_messages(), count=count, stop=stop, transmit=requests, sent=0)
        source = CanSource(CanConfig(allow_transmit=requests, buses=[CanBusConfig(interface="memory", channel="m")]),
                           SystemClock())
        records: list = []
        start = time.process_time()
        source.run(records.append, stop)
        elapsed = time.process_time() - start
        assert source.stats()["frames"] == count
        rates.append(count / elapsed)
        print(f"  {count} frames in {elapsed:.3f} s CPU: {count / elapsed:,.0f} frames/s, {len(records)} records, "
              f"{MEMORY['sent']} requests sent")
    print(f"throughput median of {runs}: {statistics.median(rates):,.0f} frames/s on one core")


def adapter(link: str, rate: float, seconds: float) -> None:
    """The emulated adapter process: deliver the capture at ``rate`` frames/s, in 1 ms slices."""
    from sim.slcan_adapter import SlcanAdapter

    messages = load_messages()
    emulator = SlcanAdapter()
    os.symlink(emulator.open_pty(), link)
    while not emulator.is_open:
        time.sleep(0.01)
    print("open", flush=True)
    start = time.monotonic()
    sent = 0
    total = int(rate * seconds)
    while sent < total:
        due = min(total, int((time.monotonic() - start) * rate))
        while sent < due:
            while not emulator.deliver(messages[sent % len(messages)]):
                time.sleep(0.0005)
            sent += 1
        time.sleep(0.001)
    print(f"sent {sent}", flush=True)
    sys.stdin.readline()
    emulator.close()


def slcan_cpu(interface: str, rate: float, seconds: float) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        link = Path(tmp) / "ttyACM0"
        proc = subprocess.Popen([sys.executable, __file__, "adapter", str(link), str(rate), str(seconds)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            while not link.exists():
                time.sleep(0.01)
            options = {"sleep_after_open": 0} if interface == "slcan" else {}
            config = CanConfig(buses=[CanBusConfig(interface=interface, channel=str(link), options=options)])
            source = CanSource(config, SystemClock())
            stop = threading.Event()
            thread = threading.Thread(target=source.run, args=(lambda r: None, stop))
            thread.start()
            assert proc.stdout.readline().strip() == "open"
            cpu0, wall0 = time.process_time(), time.monotonic()
            done = proc.stdout.readline().split()
            cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
            stop.set()
            thread.join(5)
            proc.stdin.write("\n")
            proc.stdin.flush()
            frames = source.stats()["frames"]
            print(f"  {interface}: sent {done[1]}, received {frames} in {wall:.1f} s: {100 * cpu / wall:.2f}% of a core")
            return 100 * cpu / wall
        finally:
            proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--runs", type=int, default=5)
    t.add_argument("--frames", type=int, default=500_000)
    t.add_argument("--requests", action="store_true", help="allow transmitting: J1939 requests on")
    s = sub.add_parser("slcan")
    s.add_argument("--runs", type=int, default=3)
    s.add_argument("--rate", type=float, default=1850.0)
    s.add_argument("--seconds", type=float, default=20.0)
    s.add_argument("--interfaces", default="slcan_buffered,slcan")
    a = sub.add_parser("adapter")
    a.add_argument("link")
    a.add_argument("rate", type=float)
    a.add_argument("seconds", type=float)
    args = parser.parse_args()
    if args.what == "throughput":
        throughput(args.runs, args.frames, args.requests)
    elif args.what == "adapter":
        adapter(args.link, args.rate, args.seconds)
    else:
        for interface in args.interfaces.split(","):
            results = [slcan_cpu(interface, args.rate, args.seconds) for _ in range(args.runs)]
            print(f"{interface} at {args.rate:.0f} frames/s, median of {args.runs}: {statistics.median(results):.2f}% of a core")


if __name__ == "__main__":
    main()
