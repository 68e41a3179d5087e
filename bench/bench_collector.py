"""Collector throughput and end-to-end latency: one `telematics-collector run` process into PostgreSQL.

    .venv/bin/python bench/bench_collector.py [--devices 500] [--batches 4] [--dsn postgresql://...]

Starts a private Mosquitto (queue cap lifted: these devices never resend) and one collector process
on PostgreSQL (a fresh schema in database ``test`` on 127.0.0.1:5432, dropped at the end). Batches of
60 fixes of the project's bundled drive are encoded (v2) before the clock starts, then:
1. burst: every batch published at once; records/s from the first publish to the last ack;
2. paced: batches published at a steady rate (--rate records/s, below the burst rate); the latency
   of each batch from its publish to its ack arriving back at the "device" (broker -> collector ->
   decode -> COPY -> commit -> ack -> broker -> device), median and p99.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import psycopg
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent.decode.nmea import decode_file  # noqa: E402
from agent.record import Record  # noqa: E402
from agent.wire import encode_batch  # noqa: E402

PER_BATCH = 60


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


class Devices:
    """One MQTT client publishing for every simulated device and receiving their acks."""

    def __init__(self, port: int) -> None:
        self.acked: dict[tuple[str, int], float] = {}  # (device, last seq of a batch) -> arrival
        self._lock = threading.Lock()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id="bench-devices", protocol=MQTTProtocolVersion.MQTTv5)
        self.client.max_inflight_messages_set(1000)
        self.client.on_message = self._on_ack
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        wait(self.client.is_connected, 10, "the device client to connect")
        self.client.subscribe("bench/+/ack", qos=1)
        wait(subscribed.is_set, 10, "SUBACK")

    def _on_ack(self, client, userdata, message) -> None:
        now = time.perf_counter()
        device = message.topic.split("/")[1]
        with self._lock:
            for _, last in json.loads(message.payload)["ranges"]:
                self.acked[(device, last)] = now

    def count(self) -> int:
        with self._lock:
            return len(self.acked)

    def publish(self, device: str, payload: bytes, props: Properties) -> None:
        self.client.publish(f"bench/{device}/telemetry", payload, qos=1, properties=props)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def batches(devices: int, per_device: int, tag: str) -> list[tuple[str, int, bytes, str]]:
    """(device, last seq, payload, content type) of every batch, devices interleaved as a fleet sends."""
    fixes = list(decode_file(REPO / "sim" / "drives" / "delivery_route.nmea"))
    out = []
    for b in range(per_device):
        for d in range(devices):
            records = [
                Record(utc=fixes[(b * PER_BATCH + i) % len(fixes)][0] + d, mono=0.0,
                       data=fixes[(b * PER_BATCH + i) % len(fixes)][1], seq=b * PER_BATCH + i)
                for i in range(PER_BATCH)
            ]
            payload, content_type = encode_batch(f"{tag}{d:05d}", records, 2)
            out.append((f"{tag}{d:05d}", records[-1].seq, payload, content_type))
    return out


def run_phase(devs: Devices, plan, rate: float | None) -> tuple[float, list[float]]:
    """Publish ``plan`` (at ``rate`` records/s, or all at once); returns (seconds, per-batch latencies)."""
    props = Properties(PacketTypes.PUBLISH)
    props.ContentType = plan[0][3]
    sent: dict[tuple[str, int], float] = {}
    start = time.perf_counter()
    for i, (device, last, payload, _) in enumerate(plan):
        if rate:
            due = start + i * PER_BATCH / rate
            while time.perf_counter() < due:
                time.sleep(max(0.0, min(0.002, due - time.perf_counter())))
        sent[(device, last)] = time.perf_counter()
        devs.publish(device, payload, props)
    wait(lambda: all(key in devs.acked for key in sent), 600, f"acks of {len(plan)} batches")
    elapsed = max(devs.acked[k] for k in sent) - start
    return elapsed, sorted(devs.acked[k] - t for k, t in sent.items())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=500)
    parser.add_argument("--batches", type=int, default=4, help="batches of 60 records per device in the burst")
    parser.add_argument("--rate", type=float, default=10000, help="records/s of the paced phase")
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/test")
    # Mosquitto's default is 20: the collector acknowledges a message only after its commit, so
    # this window bounds how many batches one transaction can group.
    parser.add_argument("--inflight", type=int, default=20, help="the broker's max_inflight_messages")
    parser.add_argument("--nodelay", action="store_true", help="Mosquitto's set_tcp_nodelay true (default false)")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bench-collector-"))
    port = free_port()
    # set_tcp_nodelay (--nodelay): Mosquitto's default leaves Nagle's algorithm on, which holds small
    # ack messages back at light load (BENCHMARKS.md, "Collector on PostgreSQL").
    (workdir / "mosquitto.conf").write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 0\n"
        f"max_inflight_messages {args.inflight}\nset_tcp_nodelay {'true' if args.nodelay else 'false'}\n")
    broker = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(workdir / "mosquitto.conf")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    admin = psycopg.connect(args.dsn, autocommit=True)
    admin.execute(f"CREATE SCHEMA {schema}")
    dsn = f"{args.dsn}?options=-csearch_path%3D{schema}"
    log = workdir / "collector.log"
    collector = None
    try:
        wait(lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0, 10, "mosquitto")
        burst = batches(args.devices, args.batches, "burst-")
        paced = batches(args.devices, 1, "paced-")
        collector = subprocess.Popen(
            [str(Path(sys.executable).parent / "telematics-collector"), "run", "--port", str(port), "--topic-prefix",
             "bench", "--postgres", dsn, "--client-id", "bench-collector", "--log-level", "WARNING"],
            stdout=subprocess.DEVNULL, stderr=log.open("w"))
        devs = Devices(port)
        # A batch is lost while the collector is not yet subscribed: send one until it is acknowledged.
        device, _, payload, content_type = batches(1, 1, "warmup-")[0]
        deadline = time.monotonic() + 30
        while devs.count() == 0:
            if time.monotonic() > deadline:
                raise SystemExit(f"the collector did not come up: {log.read_text()[-500:]}")
            devs.publish(device, payload, _props(content_type))
            time.sleep(0.3)

        seconds, _ = run_phase(devs, burst, None)
        records = len(burst) * PER_BATCH
        print(f"burst: {records} records in {len(burst)} batches of {PER_BATCH} from {args.devices} devices: "
              f"{seconds:.2f} s, {records / seconds:,.0f} records/s")
        seconds, latencies = run_phase(devs, paced, args.rate)
        p50 = statistics.median(latencies) * 1000
        p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1000
        print(f"paced at {args.rate:,.0f} records/s: {len(paced)} batches, publish-to-ack latency "
              f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {latencies[-1] * 1000:.1f} ms")
        stored = admin.execute(f"SELECT count(*) FROM {schema}.records").fetchone()[0]
        print(f"stored: {stored} records (expected {records + len(paced) * PER_BATCH + PER_BATCH})")
        devs.close()
    finally:
        if collector is not None:
            collector.send_signal(signal.SIGTERM)
            collector.wait(30)
        broker.send_signal(signal.SIGTERM)
        broker.wait(10)
        admin.execute(f"DROP SCHEMA {schema} CASCADE")
        admin.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _props(content_type: str) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    props.ContentType = content_type
    return props


if __name__ == "__main__":
    sys.exit(main())
