"""Scale-out: two `telematics-collector run` processes on one MQTT 5 shared subscription, 1,000 devices.

Real Mosquitto, real PostgreSQL (127.0.0.1:5432), real collector processes. Each simulated device
publishes a drive of 120 fixes in three v2 batches; every 100th device loses its middle batch (a
gap the collector must report), every 7th sends its batches last-first (late and out of order).
Afterwards: every record stored exactly once, every stored record acknowledged exactly once, both
processes did part of the work, and `telematics-collector gaps` names exactly the lost batches.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.decode.nmea import decode_file
from agent.record import Record
from agent.wire import encode_batch

from conftest import MosquittoBroker, wait_until

psycopg = pytest.importorskip("psycopg")

REPO = Path(__file__).resolve().parent.parent
COLLECTOR = str(Path(sys.executable).parent / "telematics-collector")
DEVICES, BATCHES, PER_BATCH = 1000, 3, 40
PUBLISHERS = 4


def _client(port: int, client_id: str) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5)
    client.max_queued_messages_set(0)  # the test publishes a bounded number of messages
    client.connect("127.0.0.1", port)
    client.loop_start()
    wait_until(client.is_connected, message=f"{client_id} connected")
    return client


def _batches() -> dict[str, list[tuple[int, bytes, str]]]:
    """Per device, the (first seq, payload, content type) of each batch it publishes, in publishing order."""
    fixes = list(decode_file(REPO / "sim" / "drives" / "delivery_route.nmea"))[: BATCHES * PER_BATCH]
    out = {}
    for d in range(DEVICES):
        device = f"truck-{d:04d}"
        records = [Record(utc=utc + d, mono=0.0, data=fix, seq=i) for i, (utc, fix) in enumerate(fixes)]
        batches = []
        for b in range(BATCHES):
            if d % 100 == 0 and b == 1:
                continue  # lost on the way: a gap
            payload, content_type = encode_batch(device, records[b * PER_BATCH : (b + 1) * PER_BATCH], 2)
            batches.append((b * PER_BATCH, payload, content_type))
        out[device] = batches[::-1] if d % 7 == 0 else batches
    return out


@pytest.fixture
def broker(tmp_path):
    """Mosquitto without its 1,000-message queue cap per client: these simulated devices never resend
    (real ones do, after their ack timeout), so a burst the broker dropped would be lost for good."""
    workdir = tmp_path / "mosquitto"
    workdir.mkdir()
    mosquitto = MosquittoBroker(workdir, extra_conf="max_queued_messages 0\n")
    mosquitto.start()
    yield mosquitto
    mosquitto.stop()


def test_two_collectors_share_a_fleet_of_1000_devices(pg_dsn, broker, tmp_path):
    mosquitto = broker
    plan = _batches()
    expected = {(dev, first + i) for dev, bs in plan.items() for first, _, _ in bs for i in range(PER_BATCH)}

    logs = [tmp_path / f"collector-{n}.log" for n in (1, 2)]
    procs = [
        subprocess.Popen(
            [COLLECTOR, "run", "--port", str(mosquitto.port), "--postgres", pg_dsn, "--share-group", "fleet",
             "--client-id", f"collector-{n}"],
            stdout=subprocess.DEVNULL, stderr=log.open("w"),
        )
        for n, log in zip((1, 2), logs)
    ]
    acks: Counter = Counter()
    lock = threading.Lock()

    def on_ack(client, userdata, message):
        device = message.topic.split("/")[1]
        with lock:
            for first, last in json.loads(message.payload)["ranges"]:
                acks.update((device, s) for s in range(first, last + 1))

    listener = _client(mosquitto.port, "ack-listener")
    listener.on_message = on_ack
    listener.subscribe("telematics/+/ack", qos=1)
    try:
        for log in logs:
            wait_until(lambda: "$share/fleet/telematics/+/telemetry" in log.read_text(), timeout=30,
                       message=f"{log.name} subscribed")
        publishers = [_client(mosquitto.port, f"devices-{p}") for p in range(PUBLISHERS)]
        props_by_type: dict[str, Properties] = {}
        infos = []
        for index, (device, batches) in enumerate(plan.items()):
            client = publishers[index % PUBLISHERS]
            for _, payload, content_type in batches:
                props = props_by_type.setdefault(content_type, Properties(PacketTypes.PUBLISH))
                props.ContentType = content_type
                infos.append(client.publish(f"telematics/{device}/telemetry", payload, qos=1, properties=props))
        for info in infos:
            info.wait_for_publish(30)
        wait_until(lambda: len(acks) >= len(expected), timeout=120, interval=0.2,
                   message=f"acks for {len(expected)} records")
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(30)
        listener.loop_stop()
        listener.disconnect()

    with psycopg.connect(pg_dsn) as conn:
        stored = conn.execute("SELECT device, seq FROM records").fetchall()
    assert len(stored) == len(expected) and set(stored) == expected  # every record, exactly once
    assert set(acks) == expected and max(acks.values()) == 1  # every record acknowledged, once
    shares = []
    for log in logs:
        text = log.read_text()
        assert "Traceback" not in text
        shares.append(int(text.rsplit("records_stored ", 1)[1].split(",")[0]))
    assert sum(shares) == len(expected) and min(shares) > 0, shares  # both processes took part

    out = subprocess.run([COLLECTOR, "gaps", "--db", pg_dsn, "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    gaps = [json.loads(line) for line in out.stdout.splitlines()]
    assert gaps == [{"device": f"truck-{d:04d}", "first": PER_BATCH, "last": 2 * PER_BATCH - 1, "missing": PER_BATCH}
                    for d in range(0, DEVICES, 100)]
