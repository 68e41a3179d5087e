"""The collector on PostgreSQL (127.0.0.1:5432, database ``test``), gaps, export and reprocess.

Each test gets its own PostgreSQL schema (search_path in the DSN), dropped afterwards. Without a
server on 127.0.0.1:5432 the tests are skipped on a user's machine and fail in CI.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.record import Event, Fix, Record, Signal
from agent.wire import encode_batch
from collector.store import DeadLetter, Incoming

psycopg = pytest.importorskip("psycopg")

from collector.store_pg import PostgresStore  # noqa: E402

from conftest import wait_until  # noqa: E402

def _fixes(device_seq0: int, n: int, t0: float = 1_772_440_200.0) -> list[Record]:
    return [Record(utc=t0 + i, mono=0.0, seq=device_seq0 + i,
                   data=Fix(lat=52.0 + i * 1e-4, lon=4.3 + i * 1e-4, alt_m=1.5, speed_mps=10.0, course_deg=45.0))
            for i in range(n)]


COLLECTOR = str(Path(sys.executable).parent / "telematics-collector")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([COLLECTOR, *args], capture_output=True, text=True, timeout=120)


def _device_client(port: int, client_id: str, on_ack) -> mqtt.Client:
    """An MQTT 5 client (standing in for devices) subscribed to every ack topic, its loop running."""
    subscribed = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5)
    client.on_message = lambda c, u, m: on_ack(m)
    client.on_connect = lambda c, u, f, rc, p: c.subscribe("telematics/+/ack", qos=1)
    client.on_subscribe = lambda *a: subscribed.set()
    client.connect("127.0.0.1", port)
    client.loop_start()
    assert subscribed.wait(10), "no SUBACK from the broker"
    return client


def _rows(dsn: str, sql: str) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql).fetchall()


def test_store_is_exactly_once_and_keeps_dead_letters(pg_dsn):
    store = PostgresStore(pg_dsn)
    try:
        batch = Incoming("truck-1", _fixes(0, 60) + [Record(utc=1.0, mono=0.0, seq=60, data=Signal(name="rpm", value=800.0))],
                         backlog=True, received_utc=time.time())
        dead = DeadLetter("telematics/truck-1/telemetry", "application/x-unknown", "unknown content type", b"\x00\xff", 1.0)
        assert store.store([batch], [dead]) == 61
        assert store.store([batch], []) == 0  # a batch sent again stores nothing new
        assert store.store([], []) == 0
    finally:
        store.close()
    assert _rows(pg_dsn, "SELECT count(*), count(DISTINCT seq), bool_and(backlog) FROM records") == [(61, 61, True)]
    assert _rows(pg_dsn, "SELECT data->>'name', utc FROM records WHERE kind = 'signal'") == [("rpm", 1.0)]
    assert _rows(pg_dsn, "SELECT topic, reason, payload FROM dead_letters") == [
        ("telematics/truck-1/telemetry", "unknown content type", b"\x00\xff")]
    indexes = {r[0] for r in _rows(pg_dsn, "SELECT indexname FROM pg_indexes WHERE tablename = 'records'")}
    assert "records_device_utc" in indexes


def test_migrations_are_versioned_and_safe_from_two_processes_at_once(pg_dsn):
    errors: list[Exception] = []

    def open_close():
        try:
            PostgresStore(pg_dsn).close()
        except Exception as exc:  # noqa: BLE001 - the assertion below reports it
            errors.append(exc)

    threads = [threading.Thread(target=open_close) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [r[0] for r in _rows(pg_dsn, "SELECT version FROM schema_migrations")] == [1]


def test_unreachable_database_is_one_clear_line():
    out = _cli("run", "--postgres", "postgresql://postgres@127.0.0.1:1/test", "--port", "1")
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "PostgreSQL" in out.stderr and "Traceback" not in out.stderr


def test_collector_on_postgres_stores_acks_and_dead_letters(pg_dsn, mosquitto):
    from collector.service import Collector

    acks: list[dict] = []
    client = _device_client(mosquitto.port, "device-sim", lambda m: acks.append(json.loads(m.payload)))
    collector = Collector("127.0.0.1", mosquitto.port, "telematics", store=PostgresStore(pg_dsn), client_id="col-1").start()
    try:
        for version, records in ((2, _fixes(0, 60)), (1, _fixes(60, 30))):
            payload, content_type = encode_batch("truck-9", records, version)
            props = Properties(PacketTypes.PUBLISH)
            props.ContentType = content_type
            client.publish("telematics/truck-9/telemetry", payload, qos=1, properties=props).wait_for_publish(5)
        bad = Properties(PacketTypes.PUBLISH)
        bad.ContentType = "application/vnd.telematics.batch.v9"
        client.publish("telematics/truck-9/telemetry", b"\x09future", qos=1, properties=bad).wait_for_publish(5)
        client.publish("telematics/truck-9/telemetry", os.urandom(200), qos=1).wait_for_publish(5)
        wait_until(lambda: collector.stats()["dead_letters"] == 2 and collector.stats()["records_stored"] == 90,
                   message="90 records and 2 dead letters")
        wait_until(lambda: sum(r[1] - r[0] + 1 for a in acks for r in a["ranges"]) == 90, message="acks for 90 records")
    finally:
        collector.stop()
        client.loop_stop()
        client.disconnect()
    acked = sorted(s for a in acks for first, last in a["ranges"] for s in range(first, last + 1))
    assert acked == list(range(90))  # every stored record acknowledged once; the dead letters not at all
    assert _rows(pg_dsn, "SELECT count(*) FROM records WHERE device = 'truck-9'") == [(90,)]
    reasons = sorted(r[0] for r in _rows(pg_dsn, "SELECT reason FROM dead_letters"))
    assert "unknown content type" in reasons[1] and "no known wire format" in reasons[0]


@pytest.mark.parametrize("backend", ["postgres", "sqlite"])
def test_gaps_export_and_reprocess_commands(backend, pg_dsn, tmp_path):
    if backend == "postgres":
        target = pg_dsn
        store = PostgresStore(pg_dsn)
    else:
        from collector.store import SqliteStore

        target = str(tmp_path / "collector.sqlite")
        store = SqliteStore(target)
    records = _fixes(0, 20) + _fixes(25, 5, t0=1_772_440_225.0) + _fixes(40, 2, t0=1_772_440_240.0)
    records.append(Record(utc=1_772_440_230.5, mono=0.0, seq=31,
                          data=Event(type="geofence_enter", lat=52.0, lon=4.3, attrs={"zone": "depot"})))
    late, _ = encode_batch("truck-2", _fixes(100, 3), 2)
    try:
        store.store([Incoming("truck-2", records, False, 0.0)], [
            # As an older collector that knew no v2 would have kept it; reprocess recovers it.
            DeadLetter("telematics/truck-2/telemetry", "application/vnd.telematics.batch.v2", "unknown content type",
                       late, 0.0),
            DeadLetter("telematics/truck-2/telemetry", None, "no known wire format", b"garbage", 0.0),
        ])
    finally:
        store.close()

    out = _cli("gaps", "--db", target, "--json")
    assert out.returncode == 0, out.stderr
    assert [json.loads(line) for line in out.stdout.splitlines()] == [
        {"device": "truck-2", "first": 20, "last": 24, "missing": 5},
        {"device": "truck-2", "first": 30, "last": 30, "missing": 1},
        {"device": "truck-2", "first": 32, "last": 39, "missing": 8},
    ]

    window = ["--db", target, "--device", "truck-2", "--from", "2026-03-02T08:30:05Z", "--to", str(1_772_440_227.0)]
    geojson = json.loads(_cli("export", *window, "--format", "geojson").stdout)
    line = geojson["features"][0]
    assert line["geometry"]["type"] == "LineString" and len(line["geometry"]["coordinates"]) == 17
    assert line["geometry"]["coordinates"][0] == [4.3 + 5e-4, 52.0 + 5e-4, 1.5]  # [lon, lat, alt], RFC 7946
    assert line["properties"]["times"][0] == "2026-03-02T08:30:05.000Z"
    gpx = ET.fromstring(_cli("export", *window, "--format", "gpx").stdout)
    points = gpx.findall(".//{http://www.topografix.com/GPX/1/1}trkpt")
    assert len(points) == 17 and points[-1].get("lat") == repr(52.0 + 1e-4)
    rows = list(csv.DictReader(io.StringIO(_cli("export", *window, "--format", "csv").stdout)))
    assert [int(r["seq"]) for r in rows] == list(range(5, 20)) + [25, 26]
    assert rows[0]["speed_mps"] == "10.0" and rows[0]["hdop"] == ""
    bad = _cli("export", "--db", target, "--device", "x", "--from", "yesterday", "--to", "1", "--format", "csv")
    assert bad.returncode == 2 and "ISO 8601" in bad.stderr

    summary = json.loads(_cli("summary", "--db", target, "--json").stdout)
    assert summary["records"] == 28 and summary["by_kind"] == {"event": 1, "fix": 27}
    assert summary["events"] == {"geofence_enter": 1} and summary["trips"] == 0
    assert summary["last_position"] == {"lat": records[-2].data.lat, "lon": records[-2].data.lon}

    out = _cli("reprocess", "--db", target)
    assert out.returncode == 0, out.stderr
    assert "1 dead letters decoded (3 records, 3 new), 1 still undecodable" in out.stdout
    out = _cli("gaps", "--db", target, "--device", "truck-2")
    assert "seq 42..99 missing (58)" in out.stdout and "4 gaps, 72 records missing, on 1 devices" in out.stdout


def test_commands_on_a_missing_database_say_so_in_one_line(tmp_path):
    for args in (["gaps"], ["reprocess"], ["export", "--device", "d", "--from", "0", "--to", "1", "--format", "csv"]):
        out = _cli(*args, "--db", str(tmp_path / "none.sqlite"))
        assert out.returncode == 2 and out.stderr.strip().endswith("no such database"), out.stderr


def test_fuzzed_payloads_never_stop_the_collector(pg_dsn, mosquitto):
    """Random bytes, truncated and bit-flipped batches, wrong versions, a 5 MB payload, a spoofed device:
    each is a dead letter (or, where a flip happens to keep it valid, a stored batch); the collector
    goes on and stores the good batch sent last."""
    import random
    import zlib

    from agent.wire import columnar
    from collector.service import Collector

    rng = random.Random(6)
    good_v2, ct_v2 = encode_batch("truck-5", _fixes(0, 60), 2)
    good_v1, ct_v1 = encode_batch("truck-5", _fixes(0, 60), 1)
    payloads: list[tuple[str, bytes, str | None]] = []
    for _ in range(40):
        payloads.append(("truck-5", rng.randbytes(rng.randint(0, 300)), rng.choice([None, ct_v1, ct_v2])))
    for good, ct in ((good_v2, ct_v2), (good_v1, ct_v1)):
        for _ in range(20):
            payloads.append(("truck-5", good[: rng.randint(0, len(good) - 1)], rng.choice([None, ct])))
            flipped = bytearray(good)
            flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
            payloads.append(("truck-5", bytes(flipped), ct))
    payloads.append(("truck-5", b"\x03" + good_v2[1:], None))  # a version nobody knows yet
    payloads.append(("truck-5", columnar.PREFIX + zlib.compress(b"\x00" * 100, 9, -15), ct_v2))
    payloads.append(("truck-5", rng.randbytes(5 * 1024 * 1024), ct_v2))  # over the collector's size limit
    payloads.append(("truck-6", good_v2, ct_v2))  # truck-5's batch on truck-6's topic

    client = _device_client(mosquitto.port, "fuzzer", lambda m: None)
    collector = Collector("127.0.0.1", mosquitto.port, "telematics", store=PostgresStore(pg_dsn), client_id="col-f").start()
    try:
        for device, payload, content_type in payloads + [("truck-7", encode_batch("truck-7", _fixes(500, 60), 2)[0], ct_v2)]:
            props = Properties(PacketTypes.PUBLISH)
            if content_type:
                props.ContentType = content_type
            client.publish(f"telematics/{device}/telemetry", payload, qos=1, properties=props).wait_for_publish(10)
        wait_until(lambda: collector.stats()["dead_letters"] + collector.stats()["batches"] == len(payloads) + 1,
                   timeout=30, message="every payload handled")
        stats = collector.stats()
    finally:
        collector.stop()
        client.loop_stop()
        client.disconnect()
    assert stats["store_errors"] == 0 and stats["dead_letters"] >= len(payloads) - 10
    assert _rows(pg_dsn, "SELECT count(*) FROM records WHERE device = 'truck-7'") == [(60,)]
    assert _rows(pg_dsn, "SELECT count(*) FROM records WHERE device = 'truck-6'") == [(0,)]
    assert _rows(pg_dsn, "SELECT count(*) FROM dead_letters") == [(stats["dead_letters"],)]
