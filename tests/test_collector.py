"""The collector against a real broker: exactly-once storage, ack after commit, dead letters, CLI."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.record import Event, Fix, Record
from agent.wire import encode_batch
from collector.service import ack_payload
from collector.store import Incoming, SqliteStore
from conftest import wait_until
from transport_helpers import count

BIN = Path(sys.executable).parent


def records(first: int, n: int) -> list[Record]:
    return [Record(utc=1.7e9 + s, mono=0.0, seq=s, data=Fix(lat=48.0 + s * 0.01, lon=11.0)) for s in range(first, first + n)]


class Device:
    """A bare MQTT client playing a device: publishes raw payloads, records the acks it gets."""

    def __init__(self, port: int, device: str = "truck-1") -> None:
        self.device = device
        self.acks: list[dict] = []
        self.db_rows_at_ack: list[int] = []
        self.db: Path | None = None
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_ack
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(f"telematics/{device}/ack", qos=1)
        self.client.loop_start()
        time.sleep(0.2)

    def _on_ack(self, client, userdata, message) -> None:
        if self.db is not None:
            self.db_rows_at_ack.append(count(self.db, self.device))
        self.acks.append(json.loads(message.payload))

    def send(self, payload: bytes, content_type: str | None = None, topic_device: str | None = None) -> None:
        props = None
        if content_type:
            props = Properties(PacketTypes.PUBLISH)
            props.ContentType = content_type
        topic = f"telematics/{topic_device or self.device}/telemetry"
        self.client.publish(topic, payload, qos=1, properties=props).wait_for_publish(5)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def device(mosquitto):
    dev = Device(mosquitto.port)
    yield dev
    dev.close()


def dead_letters(db: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT topic, reason FROM dead_letters ORDER BY id").fetchall()


def test_a_batch_is_stored_once_and_acknowledged_after_the_commit_every_time_it_comes(device, collector_sqlite):
    device.db = collector_sqlite.db_path
    payload, content_type = encode_batch("truck-1", records(1, 60))
    device.send(payload, content_type)
    wait_until(lambda: len(device.acks) == 1, 5, message="the first ack")
    device.send(payload, content_type)
    wait_until(lambda: len(device.acks) == 2, 5, message="the second ack")
    assert device.acks == [{"ranges": [[1, 60]]}] * 2
    assert device.db_rows_at_ack == [60, 60], "the rows were committed before the ack left"
    assert count(collector_sqlite.db_path) == 60
    stats = collector_sqlite.stats()
    assert stats["records_stored"] == 60 and stats["records_duplicate"] == 60


@pytest.mark.parametrize(
    "payload, content_type, topic_device, reason",
    [
        (b"\x00garbage", None, None, "no known wire format"),
        (b"x\x9c not really zlib", None, None, "zlib"),
        (encode_batch("truck-1", records(1, 3))[0], "application/x-v9", None, "unknown content type"),
        (encode_batch("truck-2", records(1, 3))[0], None, None, "names device 'truck-2'"),
        (encode_batch("truck-1", records(1, 3))[0][:20], None, None, "truncated"),
    ],
)
def test_malformed_payloads_become_dead_letters_and_are_not_acknowledged(
    device, collector_sqlite, payload, content_type, topic_device, reason
):
    device.send(payload, content_type, topic_device)
    wait_until(lambda: collector_sqlite.stats()["dead_letters"] == 1, 5, message="the dead letter")
    [(topic, why)] = dead_letters(collector_sqlite.db_path)
    assert topic == "telematics/truck-1/telemetry" and reason in why
    good, ct = encode_batch("truck-1", records(10, 5))
    device.send(good, ct)
    wait_until(lambda: device.acks, 5, message="an ack for the good batch after the bad one")
    assert device.acks == [{"ranges": [[10, 14]]}], "nothing acknowledged for the dead letter"


def test_ack_payload_ranges():
    assert json.loads(ack_payload([5, 3, 4, 9, 9, 1])) == {"ranges": [[1, 1], [3, 5], [9, 9]]}


def test_summary_prints_records_time_span_and_distance(tmp_path):
    db = tmp_path / "c.sqlite"
    store = SqliteStore(db)
    fixes = records(1, 11)  # 10 steps of 0.01 degree of latitude: 11.12 km
    events = [Record(utc=1.7e9 + 5, mono=0.0, seq=100, data=Event(type="harsh_brake")),
              Record(utc=1.7e9 + 9, mono=0.0, seq=101, data=Event(type="trip_end"))]
    store.store([Incoming("truck-1", fixes + events, False, time.time())], [])
    store.close()
    out = subprocess.run([BIN / "telematics-collector", "summary", "--db", str(db)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "device truck-1: 13 records stored (2 event, 11 fix)" in out.stdout
    assert "0 min 10 s" in out.stdout and "distance 11.12 km" in out.stdout and "1 trips completed" in out.stdout
    assert "events: harsh_brake 1, trip_end 1" in out.stdout
    as_json = subprocess.run(
        [BIN / "telematics-collector", "summary", "--db", str(db), "--json"], capture_output=True, text=True
    )
    doc = json.loads(as_json.stdout)
    assert doc["records"] == 13 and doc["duration_s"] == 10.0 and abs(doc["distance_km"] - 11.119) < 0.01
    assert doc["trips"] == 1 and doc["events"] == {"harsh_brake": 1, "trip_end": 1}
    last = fixes[-1].data
    assert doc["last_position"] == {"lat": last.lat, "lon": last.lon}
    assert doc["last_seen"] is not None


def test_summary_of_a_missing_database_is_one_clear_line(tmp_path):
    out = subprocess.run([BIN / "telematics-collector", "summary", "--db", str(tmp_path / "none")], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.strip().endswith("no such database") and "Traceback" not in out.stderr


def test_run_command_stores_and_stops_cleanly_on_sigterm(mosquitto, tmp_path, device):
    db = tmp_path / "c.sqlite"
    proc = subprocess.Popen(
        [BIN / "telematics-collector", "run", "--port", str(mosquitto.port), "--topic-prefix", "telematics", "--db", str(db)],
        stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_until(lambda: db.exists(), 10, message="the database file")
        time.sleep(0.5)
        device.send(*encode_batch("truck-1", records(1, 30)))
        wait_until(lambda: count(db) == 30, 10, message="30 records stored by the command")
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0 and "Traceback" not in err
    assert "collector stopped" in err


def test_run_command_with_a_bad_config_key_exits_2_with_the_key_named(tmp_path):
    config = tmp_path / "collector.yaml"
    config.write_text("mqtt:\n  hots: example\n")
    out = subprocess.run([BIN / "telematics-collector", "run", "--config", str(config)], capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "hots" in out.stderr and str(config) in out.stderr
