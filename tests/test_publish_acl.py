"""firmware_config/mosquitto-acl.example on a real Mosquitto: a device uses only its own topics."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from conftest import MosquittoBroker, wait_until

ACL = Path(__file__).resolve().parent.parent / "firmware_config" / "mosquitto-acl.example"


@pytest.fixture
def acl_broker(tmp_path):
    passwd = tmp_path / "passwd"
    exe = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    for user in ("truck-1", "truck-2", "collector", "fences"):
        subprocess.run([exe, "-b", *(["-c"] if user == "truck-1" else []), str(passwd), user, f"pw-{user}"], check=True)
    acl = tmp_path / "acl"
    shutil.copy(ACL, acl)
    broker = MosquittoBroker(
        tmp_path,
        # The fixture's broker starts with allow_anonymous true; later lines win. "user root" because
        # Mosquitto started as root otherwise drops to a user that cannot read pytest's 0700 dirs.
        extra_conf=f"user root\nallow_anonymous false\npassword_file {passwd}\nacl_file {acl}\n",
    )
    broker.start()
    yield broker
    broker.stop()


class Client:
    def __init__(self, port: int, user: str) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.puback: dict[int, int] = {}
        self.suback: list[int] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=user, protocol=mqtt.MQTTv5)
        self.client.username_pw_set(user, f"pw-{user}")
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload))
        self.client.on_publish = lambda c, u, mid, rc, p: self.puback.__setitem__(mid, rc.value)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.suback.extend(rc.value for rc in rcs)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        wait_until(self.client.is_connected, 5, message=f"{user} connected")

    def publish(self, topic: str) -> int:
        mid = self.client.publish(topic, b"x", qos=1).mid
        wait_until(lambda: mid in self.puback, 5, message=f"PUBACK for {topic}")
        return self.puback[mid]

    def subscribe(self, topic: str) -> int:
        before = len(self.suback)
        self.client.subscribe(topic, qos=1)
        wait_until(lambda: len(self.suback) > before, 5, message=f"SUBACK for {topic}")
        return self.suback[-1]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


NOT_AUTHORIZED = 0x87  # MQTT 5.0 reason code "Not authorized"


def test_a_device_writes_and_reads_only_its_own_topics(acl_broker):
    collector = Client(acl_broker.port, "collector")
    truck1 = Client(acl_broker.port, "truck-1")
    truck2 = Client(acl_broker.port, "truck-2")
    try:
        assert collector.subscribe("telematics/+/telemetry") == 1
        assert truck1.subscribe("telematics/truck-1/ack") == 1
        assert truck1.subscribe("telematics/truck-1/command") == 1
        # Mosquitto grants the subscription but delivers nothing the ACL does not let it read.
        truck1.subscribe("telematics/truck-2/ack")
        assert truck1.publish("telematics/truck-1/telemetry") == 0
        assert truck1.publish("telematics/truck-2/telemetry") == NOT_AUTHORIZED
        assert truck1.publish("telematics/truck-2/ack") == NOT_AUTHORIZED
        assert truck2.publish("telematics/truck-1/command") == NOT_AUTHORIZED
        assert collector.publish("telematics/truck-1/ack") == 0
        assert collector.publish("telematics/truck-2/ack") == 0
        wait_until(lambda: ("telematics/truck-1/ack", b"x") in truck1.messages, 5, message="the collector's ack")
        time.sleep(0.3)
        assert [t for t, _ in truck1.messages] == ["telematics/truck-1/ack"], "truck-1 never reads truck-2's acks"
        topics = [t for t, _ in collector.messages]
        assert topics == ["telematics/truck-1/telemetry"], "the spoofed telemetry never reached the collector"
    finally:
        for c in (collector, truck1, truck2):
            c.close()


def test_fence_sets_reach_only_their_device(acl_broker):
    """The fence publisher writes manifests and sets; a device asks only for its own, reads only its own."""
    fences = Client(acl_broker.port, "fences")
    truck1 = Client(acl_broker.port, "truck-1")
    truck2 = Client(acl_broker.port, "truck-2")
    try:
        assert fences.subscribe("telematics/+/geofences/get") == 1
        assert truck1.subscribe("telematics/truck-1/geofences/manifest") == 1
        assert truck1.subscribe("telematics/truck-1/geofences/set") == 1
        truck1.subscribe("telematics/truck-2/geofences/set")  # granted, but nothing is delivered
        assert fences.publish("telematics/truck-1/geofences/manifest") == 0
        assert fences.publish("telematics/truck-2/geofences/set") == 0
        assert fences.publish("telematics/truck-1/geofences/set") == 0
        assert truck1.publish("telematics/truck-1/geofences/get") == 0
        assert truck1.publish("telematics/truck-2/geofences/get") == NOT_AUTHORIZED
        assert truck2.publish("telematics/truck-1/geofences/manifest") == NOT_AUTHORIZED
        assert truck2.publish("telematics/truck-1/geofences/set") == NOT_AUTHORIZED
        assert fences.publish("telematics/truck-1/command") == NOT_AUTHORIZED
        wait_until(lambda: len(truck1.messages) == 2 and fences.messages, 5, message="the exchange delivered")
        time.sleep(0.3)
        assert [t for t, _ in truck1.messages] == ["telematics/truck-1/geofences/manifest", "telematics/truck-1/geofences/set"]
        assert [t for t, _ in fences.messages] == ["telematics/truck-1/geofences/get"]
    finally:
        for c in (fences, truck1, truck2):
            c.close()
