"""The MQTT link with a real Mosquitto and the real collector: exactly once through outages."""

from __future__ import annotations

import json
import logging
import threading
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from conftest import MosquittoBroker, free_port, wait_until
from transport_helpers import Device, SilentProxy, assert_exactly_once_in_order, count

LOG = "agent.publish.mqtt_link"


@pytest.fixture
def device(data_dir, mosquitto):
    dev = Device(data_dir, mosquitto.port)
    yield dev
    dev.stop()


def wait_stored(collector, n: int, timeout: float = 20.0) -> None:
    wait_until(lambda: count(collector.db_path) >= n, timeout, message=f"{n} records in the collector")


def wait_empty(device: Device, timeout: float = 20.0) -> None:
    wait_until(lambda: device.buffer.stats()["depth"] == 0 and device.buffer.stats()["pending"] == 0, timeout,
               message="the device's buffer to be confirmed empty")


def test_every_record_arrives_exactly_once_and_leaves_the_buffer_on_ack(device, collector_sqlite):
    device.start()
    for _ in range(20):
        device.drive(50)
        time.sleep(0.02)
    wait_stored(collector_sqlite, len(device.appended))
    wait_empty(device)
    assert_exactly_once_in_order(collector_sqlite.db_path, device.appended)
    stats = device.link.stats()
    assert stats["connected"] and stats["protocol"] == "5" and stats["published_records"] >= len(device.appended)
    assert collector_sqlite.stats()["dead_letters"] == 0


def test_broker_restart_then_collector_restart_mid_stream_loses_and_doubles_nothing(device, mosquitto, collector_sqlite):
    device.start()
    stop = threading.Event()

    def produce():
        while not stop.is_set():
            device.drive(20)
            time.sleep(0.02)

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        wait_stored(collector_sqlite, 200)
        mosquitto.stop()  # no persistence: what it held is gone; the device has not deleted it
        time.sleep(1.0)
        mosquitto.start()
        wait_until(lambda: device.link.stats()["connected"] and collector_sqlite.stats()["connected"], 15,
                   message="device and collector back on the broker")
        before = count(collector_sqlite.db_path)
        wait_stored(collector_sqlite, before + 200)
        collector_sqlite.stop()
        time.sleep(1.0)
        collector_sqlite.start()
        wait_stored(collector_sqlite, count(collector_sqlite.db_path) + 200)
    finally:
        stop.set()
        producer.join()
    wait_stored(collector_sqlite, len(device.appended), timeout=30)
    wait_empty(device, timeout=30)
    assert_exactly_once_in_order(collector_sqlite.db_path, device.appended)
    assert device.link.stats()["connects"] >= 2


def test_records_buffered_while_the_broker_is_absent_arrive_when_it_comes(data_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO, LOG)
    broker = MosquittoBroker(tmp_path)
    device = Device(data_dir, broker.port).start()
    try:
        device.drive(300)
        wait_until(lambda: "Connection refused" in caplog.text, 5, message="a log line about the refused connection")
        time.sleep(1.5)  # several retries
        refused = [r for r in caplog.records if "Connection refused" in r.getMessage()]
        assert len(refused) == 1, "one line per state change, not one per retry"
        assert not [r for r in caplog.records if r.exc_info], "no traceback"
        assert device.buffer.stats()["depth"] == len(device.appended), "everything stays buffered"
        broker.start()
        from collector.service import Collector

        with Collector("127.0.0.1", broker.port, "telematics", tmp_path / "c.sqlite") as collector:
            wait_stored(collector, len(device.appended))
            wait_empty(device)
            assert_exactly_once_in_order(collector.db_path, device.appended)
        assert any("connected to" in r.getMessage() for r in caplog.records)
    finally:
        device.stop()
        broker.stop()


def test_a_broker_refusing_the_client_gives_one_clear_line_and_the_device_keeps_buffering(data_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO, LOG)
    broker = MosquittoBroker(tmp_path, extra_conf="allow_anonymous false\n")
    broker.start()
    device = Device(data_dir, broker.port, username="truck-1", password="s3cret-pass").start()
    try:
        device.drive(100)
        wait_until(lambda: "Not authorized" in caplog.text, 5, message="the refusal in the log")
        assert "s3cret-pass" not in caplog.text, "secrets never appear in logs"
        time.sleep(1.0)
        lines = [r.getMessage() for r in caplog.records if "Not authorized" in r.getMessage()]
        assert lines == [f"broker 127.0.0.1:{broker.port} unavailable: the broker refused the connection: Not authorized;"
                         " buffering, retrying with backoff"]
        wait_until(lambda: device.buffer.stats()["committed_seq"] == len(device.appended), 5, message="commit")
        assert device.buffer.stats()["depth"] == len(device.appended)
    finally:
        device.stop()
        broker.stop()


def test_collector_down_longer_than_the_broker_queue_holds_loses_nothing(data_dir, tmp_path):
    """Mosquitto queues at most 5 messages here for the absent collector; the rest is re-sent on timeout."""
    broker = MosquittoBroker(tmp_path, extra_conf="max_queued_messages 5\n")
    broker.start()
    from collector.service import Collector

    collector = Collector("127.0.0.1", broker.port, "telematics", tmp_path / "c.sqlite").start()
    device = Device(data_dir, broker.port, ack_timeout_s=2.0, batch_max_records=20).start()
    try:
        device.drive(100)
        wait_stored(collector, 100)
        collector.stop()
        device.drive(1000)
        time.sleep(1.0)
        collector.start()
        wait_stored(collector, len(device.appended), timeout=30)
        wait_empty(device)
        assert_exactly_once_in_order(collector.db_path, device.appended)
    finally:
        device.stop()
        collector.stop()
        broker.stop()


def test_live_data_goes_first_and_the_backlog_drains_behind_it_at_the_rate_cap(data_dir, mosquitto, collector_sqlite):
    backlog = Device(data_dir, mosquitto.port)
    backlog.buffer.open()
    backlog.drive(1500, events_every=0)
    backlog.buffer.close()
    device = Device(data_dir, mosquitto.port, backlog_max_records_per_s=500.0, batch_max_records=50).start()
    try:
        device._i = 1500
        wait_until(lambda: device.link.stats()["connected"], 10, message="connected")
        started = time.monotonic()
        for _ in range(10):
            device.drive(10, events_every=0)
            time.sleep(0.1)
        total = 1500 + len(device.appended)
        wait_stored(collector_sqlite, total)
        elapsed = time.monotonic() - started
        # 1,000 beyond the first burst of 500 at 500/s: 2 s from the first take, which is a little before `started`.
        assert elapsed >= 1.8, "the backlog was held to its rate"
        import sqlite3

        with sqlite3.connect(collector_sqlite.db_path) as conn:
            rows = conn.execute("SELECT seq, backlog, received_utc FROM records ORDER BY seq").fetchall()
        old = [r for r in rows if r[0] <= 1500]
        new = [r for r in rows if r[0] > 1500]
        assert all(r[1] == 1 for r in old) and all(r[1] == 0 for r in new), "the backend can tell backlog from live"
        assert max(r[2] for r in new) < max(r[2] for r in old), "live records did not wait for the backlog"
        assert [r[0] for r in rows] == list(range(1, total + 1))
    finally:
        device.stop()


def test_an_hour_long_outage_arrives_after_the_broker_returns_live_first_then_the_backlog(data_dir, mosquitto, collector_sqlite):
    """An hour of 1 Hz fixes (3,600 records, time compressed) is buffered while the broker is away."""
    device = Device(data_dir, mosquitto.port, backlog_max_records_per_s=1000.0).start()
    try:
        device.drive(50, events_every=0)
        wait_stored(collector_sqlite, 50)
        mosquitto.stop()
        for _ in range(36):
            device.drive(100, events_every=600)
            time.sleep(0.01)
        outage_last = device.appended[-1].seq
        mosquitto.start()
        wait_until(lambda: device.link.stats()["connected"], 15, message="the device back on the broker")
        for _ in range(10):
            device.drive(10, events_every=0)
            time.sleep(0.1)
        wait_stored(collector_sqlite, len(device.appended), timeout=30)
        wait_empty(device)
        assert_exactly_once_in_order(collector_sqlite.db_path, device.appended)
        import sqlite3

        with sqlite3.connect(collector_sqlite.db_path) as conn:
            rows = conn.execute("SELECT seq, kind, backlog, received_utc FROM records WHERE seq > 50").fetchall()
        backlog = [r for r in rows if r[0] <= outage_last and r[1] == "fix"]
        live = [r for r in rows if r[0] > outage_last]
        assert len(backlog) == 3600 and all(r[2] == 1 for r in backlog) and all(r[2] == 0 for r in live)
        assert max(r[3] for r in live) < max(r[3] for r in backlog), "live data did not wait for the hour of backlog"
    finally:
        device.stop()


def test_status_birth_message_will_and_clean_offline(data_dir, mosquitto):
    proxy = SilentProxy(mosquitto.port)
    seen: list[dict] = []
    watcher = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    watcher.on_message = lambda c, u, m: seen.append(json.loads(m.payload))
    watcher.connect("127.0.0.1", mosquitto.port)
    watcher.subscribe("telematics/truck-1/status", qos=1)
    watcher.loop_start()
    device = Device(data_dir, proxy.port, keepalive_s=5)
    try:
        device.start()
        wait_until(lambda: seen and seen[-1]["state"] == "online", 10, message="the birth message")
        birth = seen[-1]
        assert birth["version"] and birth["device"] == "truck-1" and birth["buffer_depth"] == 0
        proxy.cut()  # the broker sees the connection die without a DISCONNECT: the will goes out
        wait_until(lambda: any(s["state"] == "offline" and s["reason"] == "connection_lost" for s in seen), 10,
                   message="the last will")
        wait_until(lambda: seen[-1]["state"] == "online", 10, message="a new birth after reconnecting")
        device.stop()
        wait_until(lambda: seen[-1] == {**seen[-1], "state": "offline", "reason": "shutdown"}, 5, message="clean offline")
    finally:
        watcher.loop_stop()
        watcher.disconnect()
        proxy.close()


def test_a_silent_link_is_noticed_within_twice_the_keepalive_and_nothing_is_lost(data_dir, mosquitto, collector_sqlite, caplog):
    caplog.set_level(logging.INFO, LOG)
    proxy = SilentProxy(mosquitto.port)
    device = Device(data_dir, proxy.port, keepalive_s=5, ack_timeout_s=20.0).start()
    try:
        device.drive(100)
        wait_stored(collector_sqlite, len(device.appended))
        proxy.pause()
        paused_at = time.monotonic()
        device.drive(100)
        wait_until(lambda: not device.link.stats()["connected"], 12, interval=0.1, message="the link to notice")
        noticed = time.monotonic() - paused_at
        assert noticed <= 2 * 5 + 0.5
        assert "silent link" in caplog.text
        proxy.resume()
        wait_stored(collector_sqlite, len(device.appended), timeout=30)
        wait_empty(device)
        assert_exactly_once_in_order(collector_sqlite.db_path, device.appended)
    finally:
        device.stop()
        proxy.close()


def test_broker_ack_mode_frees_records_on_puback(data_dir, mosquitto):
    device = Device(data_dir, mosquitto.port, ack="broker").start()
    try:
        device.drive(200)
        wait_empty(device, 10)
    finally:
        device.stop()


@pytest.mark.parametrize("protocol, wire_version", [("3.1.1", 1), ("3.1.1", 2), ("5", 2)])
def test_every_wire_version_arrives_with_or_without_a_content_type(data_dir, mosquitto, collector_sqlite, protocol, wire_version):
    device = Device(data_dir, mosquitto.port, protocol=protocol, wire_version=wire_version).start()
    try:
        device.drive(120)
        wait_stored(collector_sqlite, len(device.appended))
        assert device.link.stats()["protocol"] == protocol
        assert_exactly_once_in_order(collector_sqlite.db_path, device.appended)
    finally:
        device.stop()


def test_publish_message_and_subscribe_for_other_modules(data_dir, mosquitto):
    device = Device(data_dir, mosquitto.port).start()
    got: list[bytes] = []
    answers: list[bytes] = []
    try:
        device.link.subscribe("command", got.append)
        assert not Device(data_dir / "x", free_port()).link.publish_message("response", b"x"), "False while down"
        wait_until(lambda: device.link.stats()["connected"], 10, message="connected")
        other = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        other.on_message = lambda c, u, m: answers.append(m.payload)
        other.connect("127.0.0.1", mosquitto.port)
        other.subscribe("telematics/truck-1/response", qos=1)
        other.loop_start()
        time.sleep(0.3)
        other.publish("telematics/truck-1/command", b'{"cmd":"ping"}', qos=1)
        wait_until(lambda: got == [b'{"cmd":"ping"}'], 5, message="the command")
        assert device.link.publish_message("response", b'{"ok":true}')
        wait_until(lambda: answers == [b'{"ok":true}'], 5, message="the response")
        other.loop_stop()
        other.disconnect()
    finally:
        device.stop()


class V311OnlyBroker:
    """A front to Mosquitto that answers an MQTT 5 CONNECT as a 3.1.1-only broker does (CONNACK return
    code 1, "unacceptable protocol version", then close: MQTT 3.1.1 section 3.1.2.2) and forwards 3.1.1."""

    def __init__(self, target_port: int) -> None:
        import socket

        self.target_port = target_port
        self.refused_v5 = 0
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(8)
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket

        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            first = client.recv(4096)
            # CONNECT: 0x10, the remaining length (a 1-4 byte varint), 00 04 "MQTT", the protocol level.
            at = 1
            while at < len(first) and first[at] & 0x80:
                at += 1
            level = first[at + 7] if len(first) > at + 7 else None
            if first[:1] == b"\x10" and level == 5:
                self.refused_v5 += 1
                client.sendall(b"\x20\x02\x00\x01")
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            upstream.sendall(first)
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src, dst) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.close()
            except OSError:
                pass

    def close(self) -> None:
        self._listener.close()


def test_auto_protocol_falls_back_to_311_for_a_broker_without_mqtt5(data_dir, mosquitto, collector_sqlite, caplog):
    caplog.set_level(logging.INFO, LOG)
    front = V311OnlyBroker(mosquitto.port)
    device = Device(data_dir, front.port).start()
    try:
        device.drive(120)
        wait_stored(collector_sqlite, len(device.appended))
        assert front.refused_v5 == 1, "one MQTT 5 attempt, then 3.1.1"
        assert device.link.stats()["protocol"] == "3.1.1"
        assert "trying MQTT 3.1.1 next" in caplog.text
        assert_exactly_once_in_order(collector_sqlite.db_path, device.appended)
    finally:
        device.stop()
        front.close()
