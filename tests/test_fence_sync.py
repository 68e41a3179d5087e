"""Fence sets through a retained manifest, against a real Mosquitto: the agent's own MQTT link,
remote management and geofence processor on one side, the collector's FencePublisher on the other,
and a spy counting what crosses the set and get topics."""

from __future__ import annotations

import hashlib
import json
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from conftest import wait_until
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from agent.buffer.store import DurableBuffer
from agent.clock import SystemClock
from agent.ops.fences_sync import (
    MAX_SET_BYTES,
    FenceSync,
    check_set,
    make_manifest,
    parse_manifest,
)
from agent.ops.remote import RemoteManager, RemoteStore, load_effective_config
from agent.processors.geofence import GeofenceProcessor, GeofenceSet
from agent.publish.mqtt_link import MqttLink
from collector.fences import FencePublisher

DEVICE = "truck-7"


def fence_set(*ids: str) -> bytes:
    """A GeoJSON set of small square depots, one per id."""
    features = [{"type": "Feature", "id": fid, "properties": {"type": "depot"},
                 "geometry": {"type": "Polygon", "coordinates": [[[13.0 + i / 10, 52.0], [13.01 + i / 10, 52.0],
                                                                  [13.01 + i / 10, 52.01], [13.0 + i / 10, 52.01],
                                                                  [13.0 + i / 10, 52.0]]]}}
                for i, fid in enumerate(ids)]
    return json.dumps({"type": "FeatureCollection", "features": features}).encode()


class Spy:
    """Counts messages and bytes on every device's fence topics; collects responses."""

    def __init__(self, port: int) -> None:
        self.messages: list[tuple[str, int]] = []
        self.responses: queue.Queue[dict] = queue.Queue()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="spy")
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_connect = lambda c, *a: c.subscribe([("telematics/+/geofences/set", 1),
                                                            ("telematics/+/geofences/get", 1),
                                                            ("telematics/+/response", 1)])
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        wait_until(self.subscribed.is_set, message="the spy's subscription")

    def _on_message(self, client, userdata, message) -> None:
        if message.topic.endswith("/response"):
            self.responses.put(json.loads(message.payload))
        else:
            self.messages.append((message.topic.rsplit("/", 1)[1], len(message.payload)))

    def count(self, kind: str) -> int:
        return sum(1 for k, _ in self.messages if k == kind)

    def set_bytes(self) -> int:
        return sum(n for k, n in self.messages if k == "set")

    def response(self, wanted_id: str, timeout: float = 10.0) -> dict:
        while True:
            response = self.responses.get(timeout=timeout)
            if response.get("id") == wanted_id:
                return response

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class Device:
    """The agent's parts that take part: durable buffer, MqttLink, geofences, remote management, sync."""

    def __init__(self, config_path, data_dir) -> None:
        config = load_effective_config(config_path)
        clock = SystemClock()
        self.buffer = DurableBuffer(data_dir, config.buffer, clock)
        self.buffer.open()
        self.buffer.start()
        self.link = MqttLink(config.mqtt, DEVICE, self.buffer, clock)
        store = RemoteStore(data_dir)
        saved = store.fences
        initial = GeofenceSet.from_geojson(store.geojson(saved)) if saved else None
        self.fences = GeofenceProcessor(config.edge.geofences, data_dir, initial, (saved or {}).get("version"))
        self.remote = RemoteManager(
            config_path, config, self.link, clock, apply=lambda c: True, link_up=lambda: self.link.stats()["connected"],
            status=dict, flush=lambda timeout: True, restart=lambda: None,
            parse_fences=GeofenceSet.from_geojson, replace_fences=self.fences.replace,
        )
        self.sync = FenceSync(self.link, data_dir, clock, active=lambda: self.remote.store.fences,
                              submit=self.remote.submit_fences, retry_s=1.0)
        self.stop_event = threading.Event()
        self.link_stop = threading.Event()
        self.threads = [threading.Thread(target=self.link.run, args=(self.link_stop,), daemon=True),
                        threading.Thread(target=self.remote.run, args=(self.stop_event,), daemon=True),
                        threading.Thread(target=self.sync.run, args=(self.stop_event,), daemon=True)]
        for thread in self.threads:
            thread.start()
        wait_until(lambda: self.link.stats()["connected"], message="the device's link")

    def ids(self) -> list[str]:
        return sorted(self.fences.set.by_id)

    def close(self) -> None:
        self.stop_event.set()
        self.link_stop.set()
        for thread in self.threads:
            thread.join(10)
        self.buffer.close()


@pytest.fixture
def world(tmp_path, mosquitto, data_dir):
    """(config_path, publisher, spy, start_device): the broker, the fence publisher and a spy running."""
    config_path = tmp_path / "agent.yaml"
    config_path.write_text(f"device:\n  id: {DEVICE}\n  data_dir: {data_dir}\nmqtt:\n  port: {mosquitto.port}\n"
                           "  reconnect_min_s: 0.2\n  reconnect_max_s: 1\n")
    publisher = FencePublisher("127.0.0.1", mosquitto.port, "telematics", tmp_path / "fences").start()
    wait_until(publisher.connected.is_set, message="the publisher")
    spy = Spy(mosquitto.port)
    devices: list[Device] = []

    def start_device() -> Device:
        devices.append(Device(config_path, data_dir))
        return devices[-1]

    yield config_path, publisher, spy, start_device
    for device in devices:
        device.close()
    spy.close()
    publisher.stop()


def test_a_set_arrives_through_the_manifest_and_is_not_fetched_again_on_reconnect(world, mosquitto, data_dir):
    _, publisher, spy, start_device = world
    data = fence_set("depot", "customer")
    publisher.assign(data, "v1", [DEVICE])
    device = start_device()
    assert spy.response("geofences:v1") == {"id": "geofences:v1", "ok": True, "config_version": device.remote.version,
                                            "geofences_version": "v1"}
    assert device.fences.version == "v1" and device.ids() == ["customer", "depot"]
    assert (spy.count("get"), spy.count("set"), spy.set_bytes()) == (1, 1, len(data))
    assert RemoteStore(data_dir).fences["sha256"] == hashlib.sha256(data).hexdigest()

    # The broker restarts (and forgets retained messages: no persistence); everyone reconnects, the
    # publisher announces the same manifest again, the device compares it and fetches nothing.
    connects = device.link.stats()["connects"]
    manifests = device.sync.counts["manifests"]
    mosquitto.restart()
    wait_until(lambda: device.link.stats()["connects"] > connects, 20, message="the device reconnected")
    wait_until(lambda: device.sync.counts["manifests"] > manifests, 20, message="the manifest after the restart")
    assert device.sync.counts["gets"] == 1 and device.sync.counts["sets"] == 1
    assert publisher.counts["sets"] == 1 and device.fences.version == "v1"


def test_a_new_version_is_fetched_and_applied_and_survives_a_restart(world, data_dir):
    _, publisher, spy, start_device = world
    publisher.assign(fence_set("depot"), "v1", [DEVICE])
    device = start_device()
    assert spy.response("geofences:v1")["ok"] is True
    new = fence_set("depot", "customer-b", "customer-c")
    publisher.assign(new, "v2", [DEVICE])
    assert spy.response("geofences:v2")["geofences_version"] == "v2"
    assert device.fences.version == "v2" and device.ids() == ["customer-b", "customer-c", "depot"]
    assert spy.count("set") == 2 and spy.set_bytes() == len(fence_set("depot")) + len(new)

    # An agent restart: the set comes back from remote.json, the retained manifest matches it.
    device.close()
    device = start_device()
    assert device.fences.version == "v2" and len(device.ids()) == 3
    wait_until(lambda: device.sync.counts["manifests"] == 1, message="the retained manifest")
    assert device.sync.counts["gets"] == 0 and spy.count("set") == 2


def test_a_fleet_wide_set_reaches_devices_without_their_own(world, mosquitto):
    _, publisher, spy, start_device = world
    device = start_device()
    publisher.assign(fence_set("everyone"), "fleet-1", None)
    assert spy.response("geofences:fleet-1")["ok"] is True
    assert device.ids() == ["everyone"]
    # Its own set wins over the fleet's.
    publisher.assign(fence_set("mine"), "own-1", [DEVICE])
    assert spy.response("geofences:own-1")["ok"] is True
    assert device.ids() == ["mine"] and publisher.manifest_for("truck-99")["version"] == "fleet-1"


class RogueServer:
    """Publishes a manifest and answers gets with whatever bytes it is given (no validation)."""

    def __init__(self, port: int, manifest: dict, data: bytes) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="rogue")
        self.client.on_message = lambda c, u, m: c.publish(f"telematics/{DEVICE}/geofences/set", data, qos=1)
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(f"telematics/{DEVICE}/geofences/get", qos=1)
        self.client.loop_start()
        self.client.publish(f"telematics/{DEVICE}/geofences/manifest", json.dumps(manifest), qos=1,
                            retain=True).wait_for_publish(5)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.mark.parametrize("case", ["hash_mismatch", "invalid_set", "not_json"])
def test_a_bad_set_is_refused_and_the_old_one_stays(world, mosquitto, data_dir, case):
    _, publisher, spy, start_device = world
    publisher.assign(fence_set("depot"), "v1", [DEVICE])
    device = start_device()
    assert spy.response("geofences:v1")["ok"] is True
    publisher.stop()  # the rogue answers from now on
    if case == "hash_mismatch":
        served = fence_set("depot", "evil")
        manifest = {**make_manifest(fence_set("depot", "other"), "v2"), "size": len(served)}
        reason = "the set's sha256 is"
    elif case == "invalid_set":
        served = json.dumps({"type": "FeatureCollection", "features": [{"type": "Feature", "id": "x",
                                                                        "properties": {"type": "nonsense"}}]}).encode()
        manifest, reason = make_manifest(served, "v2"), "geofences: "
    else:
        served = b"{not json"
        manifest, reason = make_manifest(served, "v2"), "geofences: not valid JSON"
    rogue = RogueServer(mosquitto.port, manifest, served)
    try:
        response = spy.response("geofences:v2")
        assert response["ok"] is False and reason in response["error"], response
        assert device.fences.version == "v1" and device.ids() == ["depot"]
        assert RemoteStore(data_dir).fences["version"] == "v1"
        # A mismatching set is asked for once more (it may have crossed a new manifest), then refused.
        assert device.sync.counts["sets"] == 1 + (2 if case == "hash_mismatch" else 1)
        # Not fetched again on reconnect, nor after a restart, while the manifest stays the same.
        sets = spy.count("set")
        device.close()
        device = start_device()
        wait_until(lambda: device.sync.counts["manifests"] == 1, message="the retained manifest")
        assert device.sync.counts["gets"] == 0 and spy.count("set") == sets
        assert device.fences.version == "v1"
    finally:
        rogue.close()


def test_an_unanswered_get_is_sent_again_until_a_server_answers(world, mosquitto, tmp_path):
    _, publisher, spy, start_device = world
    data = fence_set("late")
    publisher.assign(data, "v1", [DEVICE])
    wait_until(lambda: publisher.counts["manifests"] == 1, message="the manifest")
    publisher.stop()  # the retained manifest stays; nobody answers gets
    device = start_device()
    wait_until(lambda: spy.count("get") >= 2, message="the get sent again")
    assert device.fences.version is None and spy.count("set") == 0
    server = FencePublisher("127.0.0.1", mosquitto.port, "telematics", tmp_path / "fences").start()
    try:  # a restarted server serves what its state directory holds
        assert spy.response("geofences:v1", timeout=15)["ok"] is True
        assert device.ids() == ["late"] and spy.count("set") == 1
    finally:
        server.stop()


def test_the_publisher_refuses_an_invalid_set(tmp_path):
    publisher = FencePublisher("127.0.0.1", 1, "telematics", tmp_path)
    with pytest.raises(ValueError, match="unknown type|type"):
        publisher.assign(json.dumps({"type": "FeatureCollection", "features": [
            {"type": "Feature", "id": "x", "properties": {"type": "castle"},
             "geometry": {"type": "Point", "coordinates": [4.0, 52.0]}}]}).encode(), "v1", ["d"])
    assert publisher.manifest_for("d") is None and not (tmp_path / "sets").exists()


# -- the manifest format (hypothesis) -------------------------------------------------------------

versions = st.text(min_size=1, max_size=128)


@given(data=st.binary(min_size=1, max_size=2000), version=versions)
def test_a_made_manifest_parses_back_and_checks_its_set(data, version):
    manifest = make_manifest(data, version)
    assert parse_manifest(json.dumps(manifest).encode()) == manifest
    check_set(manifest, data)
    with pytest.raises(ValueError, match="bytes"):
        check_set(manifest, data + b" ")
    flipped = bytes([data[0] ^ 1]) + data[1:]
    with pytest.raises(ValueError, match="sha256"):
        check_set(manifest, flipped)


@given(payload=st.binary(max_size=200))
def test_any_bytes_parse_to_a_valid_manifest_or_a_value_error(payload):
    try:
        manifest = parse_manifest(payload)
    except ValueError:
        return
    assert set(manifest) == {"version", "sha256", "size"} and 0 < manifest["size"] <= MAX_SET_BYTES


@given(doc=st.fixed_dictionaries({}, optional={
    "version": st.one_of(versions, st.integers(), st.none(), st.just("")),
    "sha256": st.one_of(st.text(alphabet="0123456789abcdefABCDEF", min_size=63, max_size=65), st.none()),
    "size": st.one_of(st.integers(min_value=-2, max_value=MAX_SET_BYTES + 2), st.booleans(), st.floats()),
    "url": st.text(max_size=5)}))
def test_a_manifest_is_accepted_exactly_when_its_fields_are_valid(doc):
    version, sha256, size = doc.get("version"), doc.get("sha256"), doc.get("size")
    valid = (isinstance(version, str) and 0 < len(version) <= 128
             and isinstance(sha256, str) and len(sha256) == 64 and sha256 == sha256.lower()
             and type(size) is int and 0 < size <= MAX_SET_BYTES)
    if valid:
        assert parse_manifest(json.dumps(doc).encode()) == {"version": version, "sha256": sha256, "size": size}
    else:
        with pytest.raises(ValueError):
            parse_manifest(json.dumps(doc).encode())


# -- the command -----------------------------------------------------------------------------------

COLLECTOR = Path(sys.executable).parent / "telematics-collector"


def test_the_publish_command_serves_a_device_until_sigterm(world, mosquitto, tmp_path):
    _, publisher, spy, start_device = world
    publisher.stop()  # the command's own publisher serves instead
    geojson = tmp_path / "fences.geojson"
    geojson.write_bytes(fence_set("depot", "customer"))
    proc = subprocess.Popen(
        [COLLECTOR, "fences", "publish", "--dir", str(tmp_path / "cli-state"), "--file", str(geojson), "--version",
         "cli-1", "--device", DEVICE, "--port", str(mosquitto.port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
        assert first.startswith(f"{geojson}: version cli-1, {len(geojson.read_bytes())} bytes, sha256 ")
        device = start_device()
        assert spy.response("geofences:cli-1")["ok"] is True
        assert device.ids() == ["customer", "depot"]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0


@pytest.mark.parametrize("args, message", [
    (["publish", "--file", "{bad}", "--version", "v1", "--device", "d"], "castle"),
    (["publish", "--file", "{missing}", "--version", "v1", "--all"], "cannot read"),
    (["publish", "--file", "{bad}", "--version", "v1"], "publish needs --file, --version and --device"),
    (["publish", "--file", "{good}", "--version", "v" * 129, "--all"], "version must be a string of 1 to 128"),
    (["publish", "--file", "{good}", "--version", "v1", "--device", "truck/+"], "cannot be part of a topic"),
])
def test_the_command_refuses_in_one_line(tmp_path, args, message):
    bad = tmp_path / "bad.geojson"
    bad.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "id": "x", "properties": {"type": "castle"},
         "geometry": {"type": "Point", "coordinates": [4, 52]}}]}))
    good = tmp_path / "good.geojson"
    good.write_bytes(fence_set("depot"))
    args = [a.format(bad=bad, good=good, missing=tmp_path / "missing.geojson") for a in args]
    out = subprocess.run([COLLECTOR, "fences", *args, "--dir", str(tmp_path / "state"), "--port", "1"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr


def test_the_whole_agent_takes_its_set_from_the_manifest_once(tmp_path, mosquitto, data_dir):
    """agent.app.Agent as the daemon runs it: fetched at the first start, kept across a restart."""
    from agent.app import Agent
    from agent.config import load_config

    config_path = tmp_path / "agent.yaml"
    config_path.write_text(f"device:\n  id: {DEVICE}\n  data_dir: {data_dir}\ngps:\n  enabled: false\n"
                           f"mqtt:\n  port: {mosquitto.port}\n  reconnect_min_s: 0.2\n  reconnect_max_s: 1\n")
    publisher = FencePublisher("127.0.0.1", mosquitto.port, "telematics", tmp_path / "fences").start()
    publisher.assign(fence_set("depot"), "agent-v1", [DEVICE])
    agent = Agent(load_config(config_path), config_path=config_path)
    try:
        agent.start()
        wait_until(lambda: agent.edge.geofences.version == "agent-v1", 15, message="the set applied")
        agent.stop()
        agent = Agent(load_config(config_path), config_path=config_path)
        agent.start()
        assert agent.edge.geofences.version == "agent-v1"  # from remote.json, before any message
        wait_until(lambda: agent.fence_sync.counts["manifests"] == 1, 15, message="the retained manifest")
        assert agent.fence_sync.counts["gets"] == 0 and publisher.counts["sets"] == 1
    finally:
        agent.stop()
        publisher.stop()


class RecordingLink:
    """Stands in for MqttLink in one unit test: counts gets; ``up`` says whether a publish goes out."""

    def __init__(self) -> None:
        self.up = True
        self.gets = 0

    def publish_message(self, topic_suffix: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        self.gets += self.up and topic_suffix == "geofences/get"
        return self.up


def test_a_manifest_delivered_twice_is_asked_for_once_and_again_after_a_lost_get(tmp_path):
    """A retained manifest arrives once per SUBSCRIBE and again after each reconnect: one get each time
    it is needed, none for a duplicate while the first get is still unanswered."""
    link = RecordingLink()
    sync = FenceSync(link, tmp_path, SystemClock(), active=lambda: None, submit=lambda *a: None)
    manifest = json.dumps(make_manifest(fence_set("depot"), "v1")).encode()
    sync.on_manifest(manifest)
    sync.on_manifest(manifest)
    assert link.gets == 1 and sync.counts["manifests"] == 2
    link.up = False
    sync._asked_at -= sync.retry_s  # the get went unanswered for retry_s, and the link is down now
    sync.on_manifest(manifest)
    assert link.gets == 1
    link.up = True  # reconnected: the retained manifest comes again and is asked for at once
    sync.on_manifest(manifest)
    assert link.gets == 2
