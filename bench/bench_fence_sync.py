"""Fence sets over MQTT (issue 7): what a reconnect costs with the retained manifest, what a change costs.

    .venv/bin/python bench/bench_fence_sync.py [--fences 10000] [--runs 3]

Through a local Mosquitto, with the agent's own MqttLink, remote management, geofence processor and
FenceSync on one side and the collector's FencePublisher on the other (the set from
bench_geofence.py): the set bytes at a first start, after a
reconnect (a broker restart), and after an agent restart with the same manifest (the device's own
counts of set bytes received); the manifest's size; and the time from the manifest to
the set in force (fetch, hash check, validation, index, remote.json written). Medians.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

from bench_geofence import fence_set  # noqa: E402
from conftest import MosquittoBroker, wait_until  # noqa: E402  (the tests' real broker on a free port)
from test_fence_sync import DEVICE, Device  # noqa: E402

from collector.fences import FencePublisher  # noqa: E402


def one_run(work: Path, port: int, data: bytes, broker: MosquittoBroker) -> dict:
    data_dir = work / "data"
    data_dir.mkdir()
    config_path = work / "agent.yaml"
    config_path.write_text(f"device:\n  id: {DEVICE}\n  data_dir: {data_dir}\nmqtt:\n  port: {port}\n"
                           "  reconnect_min_s: 0.2\n  reconnect_max_s: 1\n")
    publisher = FencePublisher("127.0.0.1", port, "telematics", work / "fences").start()
    wait_until(publisher.connected.is_set)
    device = Device(config_path, data_dir)
    start = time.perf_counter()
    publisher.assign(data, "v1", [DEVICE])
    wait_until(lambda: device.fences.version == "v1", 600, interval=0.01)
    applied_s = time.perf_counter() - start
    first = device.sync.counts["set_bytes"]
    manifest_bytes = len(json.dumps(publisher.manifest_for(DEVICE)))

    connects, manifests = device.link.stats()["connects"], device.sync.counts["manifests"]
    broker.restart()  # no persistence: the publisher announces the manifest again on reconnecting
    wait_until(lambda: device.link.stats()["connects"] > connects and device.sync.counts["manifests"] > manifests, 30,
               message="the manifest after the broker restart")
    reconnect = device.sync.counts["set_bytes"] - first

    device.close()
    device = Device(config_path, data_dir)
    wait_until(lambda: device.sync.counts["manifests"] >= 1, 30, message="the manifest after the agent restart")
    time.sleep(0.5)
    restart = device.sync.counts["set_bytes"]
    device.close()
    publisher.stop()
    return {"applied_s": applied_s, "set_bytes_first_start": first, "set_bytes_after_reconnect": reconnect,
            "set_bytes_after_restart": restart, "manifest_bytes": manifest_bytes}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fences", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    data, _ = fence_set(args.fences, random.Random(1))
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-fence-sync-") as tmp:
        for run in range(args.runs):
            work = Path(tmp) / f"run{run}"
            work.mkdir()
            broker = MosquittoBroker(work)  # a fresh one: no retained manifest of an earlier run
            broker.start()
            try:
                results.append(one_run(work, broker.port, data, broker))
            finally:
                broker.stop()
    summary = {"fences": args.fences, "set_bytes": len(data), "runs": args.runs}
    summary.update({key: statistics.median(r[key] for r in results) for key in results[0]})
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
