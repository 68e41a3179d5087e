"""Remote management against a real Mosquitto: a plain paho client stands in for the agent's link,
another plays ops. Valid change applies; invalid is refused with a reason; a change that cuts the
broker link is rolled back; only allowlisted commands run."""

from __future__ import annotations

import json
import logging
import queue
import threading
import uuid

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given
from hypothesis import strategies as st
from conftest import free_port, wait_until
from paho.mqtt.enums import CallbackAPIVersion

from agent.clock import SystemClock
from agent.config import load_config
from agent.ops.remote import (
    COMMANDS,
    MAX_PENDING_STARTS,
    RemoteError,
    RemoteManager,
    RemoteStore,
    config_version,
    load_effective_config,
    merge,
)
from agent.processors.geofence import GeofenceProcessor, GeofenceSet

DEVICE = "truck-7"
FENCES = {
    "type": "FeatureCollection",
    "features": [{"type": "Feature", "id": "depot", "properties": {"name": "Depot", "type": "depot"},
                  "geometry": {"type": "Polygon", "coordinates": [[[13.0, 52.0], [13.01, 52.0], [13.01, 52.01],
                                                                   [13.0, 52.01], [13.0, 52.0]]]}}],
}


class PahoLink:
    """The agent link's interface (publish_message / subscribe) on a plain paho client."""

    def __init__(self, port: int) -> None:
        self.connected = threading.Event()
        self.subs: dict[str, object] = {}
        self.client: mqtt.Client | None = None
        self.connect(port)

    def connect(self, port: int) -> None:
        """(Re)connect to ``port``, as the real link would after new mqtt settings."""
        self.close()
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{DEVICE}-{uuid.uuid4().hex[:6]}")
        client.reconnect_delay_set(0.1, 0.3)
        client.on_connect = self._on_connect
        client.on_disconnect = lambda *a: self.connected.clear()
        client.on_message = lambda c, u, m: self.subs[m.topic](m.payload) if m.topic in self.subs else None
        client.connect_async("127.0.0.1", port)
        client.loop_start()
        self.client = client

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            return
        for topic in self.subs:
            client.subscribe(topic, qos=1)
        self.connected.set()

    def publish_message(self, topic_suffix, payload, qos=1, retain=False) -> bool:
        if not self.connected.is_set():
            return False
        return self.client.publish(f"telematics/{DEVICE}/{topic_suffix}", payload, qos=qos, retain=retain).rc == 0

    def subscribe(self, topic_suffix, callback) -> None:
        topic = f"telematics/{DEVICE}/{topic_suffix}"
        self.subs[topic] = callback
        if self.connected.is_set():
            self.client.subscribe(topic, qos=1)

    def close(self) -> None:
        if self.client is not None:
            self.connected.clear()
            self.client.disconnect()
            self.client.loop_stop()
            self.client = None


class Ops:
    """The operator's side: publishes requests, collects responses."""

    def __init__(self, port: int) -> None:
        self.responses: queue.Queue[dict] = queue.Queue()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="ops")
        self.client.on_message = lambda c, u, m: self.responses.put(json.loads(m.payload))
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(f"telematics/{DEVICE}/response", qos=1)
        self.client.loop_start()

    def send(self, topic: str, request: dict | bytes, timeout: float = 10.0) -> dict:
        """Publish ``request`` and return the response with its id (others, e.g. late warm-ups, are skipped)."""
        payload = request if isinstance(request, bytes) else json.dumps(request).encode()
        wanted = None if isinstance(request, bytes) else request.get("id")
        self.client.publish(f"telematics/{DEVICE}/{topic}", payload, qos=1).wait_for_publish(5)
        while True:
            response = self.responses.get(timeout=timeout)
            if response.get("id") == wanted:
                return response

    def wait_until_served(self) -> None:
        """Subscriptions on both sides are asynchronous: ping until a response comes back."""
        for attempt in range(50):
            try:
                self.send("command", {"id": f"warm-up-{attempt}", "command": "status"}, timeout=0.2)
                return
            except queue.Empty:
                continue
        raise AssertionError("remote management never answered")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Agentish:
    """What the composition root gives RemoteManager: apply, link state, flush, restart, status."""

    def __init__(self, link: PahoLink, fences: GeofenceProcessor) -> None:
        self.link = link
        self.fences = fences
        self.applied: list = []
        self.flushes: list[float] = []
        self.restarts = 0

    def apply(self, config) -> bool:
        """In this process: reconnect the link with the new settings (True: in effect now)."""
        self.applied.append(config)
        self.link.connect(config.mqtt.port)
        return True

    def flush(self, timeout: float) -> bool:
        self.flushes.append(timeout)
        return True

    def restart(self) -> None:
        self.restarts += 1


def start_manager(config_path, link: PahoLink, agent: Agentish, apply=None):
    """A RemoteManager on the effective config, running in a thread; returns (manager, stop, thread)."""
    config = load_effective_config(config_path)
    manager = RemoteManager(
        config_path, config, link, SystemClock(), apply=apply or agent.apply, link_up=link.connected.is_set,
        status=lambda: {"device_id": DEVICE, "gps": {"fix": True}}, flush=agent.flush, restart=agent.restart,
        parse_fences=GeofenceSet.from_geojson, replace_fences=agent.fences.replace,
    )
    stop = threading.Event()
    thread = threading.Thread(target=manager.run, args=(stop,), daemon=True)
    thread.start()
    return manager, stop, thread


def write_config(tmp_path, data_dir, port: int):
    config_path = tmp_path / "agent.yaml"
    config_path.write_text(
        f"device:\n  id: {DEVICE}\n  data_dir: {data_dir}\nmqtt:\n  port: {port}\n"
        "remote:\n  rollback_timeout_s: 1.5\n"
    )
    return config_path


@pytest.fixture
def setup(tmp_path, mosquitto, data_dir):
    config_path = write_config(tmp_path, data_dir, mosquitto.port)
    link = PahoLink(mosquitto.port)
    agent = Agentish(link, GeofenceProcessor(load_config(config_path).edge.geofences, data_dir))
    manager, stop, thread = start_manager(config_path, link, agent)
    wait_until(link.connected.is_set, message="the link")
    ops = Ops(mosquitto.port)
    ops.wait_until_served()
    yield config_path, manager, agent, ops
    stop.set()
    thread.join(10)
    ops.close()
    link.close()


def test_a_valid_change_applies(setup):
    config_path, manager, agent, ops = setup
    response = ops.send("config", {"id": "c1", "settings": {"gps": {"baud": 38400}, "power": {"run_on_s": 30}}})
    assert response["ok"] is True and response["id"] == "c1", response
    assert [c.gps.baud for c in agent.applied] == [38400]
    assert response["config_version"] == config_version(agent.applied[0]) == manager.version
    # Saved: the next start has it too, and the file under /etc is untouched.
    reloaded = load_effective_config(config_path)
    assert (reloaded.gps.baud, reloaded.power.run_on_s) == (38400, 30)
    assert load_config(config_path).gps.baud == 9600
    assert RemoteStore(manager.config.device.data_dir).state["status"] == "confirmed"
    # A second change keeps the first.
    assert ops.send("config", {"id": "c2", "settings": {"gps": {"port": "/dev/ttyUSB0"}}})["ok"]
    assert (load_effective_config(config_path).gps.baud, load_effective_config(config_path).gps.port) == (38400, "/dev/ttyUSB0")


@pytest.mark.parametrize(
    "request_, reason",
    [
        ({"id": "x", "settings": {"gps": {"baud": "fast"}}}, "settings: gps.baud: expected int, got str"),
        ({"id": "x", "settings": {"gps": {"bud": 4800}}}, "gps.bud: unknown key"),
        ({"id": "x", "settings": {"mqtt": {"port": 0}}}, "mqtt.port: expected int >= 1"),
        ({"id": "x", "settings": {"device": {"id": "someone-else"}}}, "device.id cannot be changed remotely"),
        ({"id": "x", "settings": {}, "extra": 1}, "unknown keys in the request: ['extra']"),
        ({"id": "x"}, "nothing to change"),
        ({"id": "x", "geofences": {"type": "Nonsense"}}, "geofences: "),
    ],
)
def test_an_invalid_change_is_refused_with_a_reason(setup, request_, reason):
    config_path, manager, agent, ops = setup
    before = manager.version
    response = ops.send("config", request_)
    assert response["ok"] is False and response["id"] == "x"
    assert reason in response["error"], response["error"]
    assert agent.applied == [] and manager.version == before
    assert load_effective_config(config_path).gps.baud == 9600


def test_not_json_is_refused(setup):
    _, _, agent, ops = setup
    response = ops.send("config", b"{not json")
    assert response["ok"] is False and response["error"].startswith("not valid JSON")


def test_a_change_that_cuts_the_broker_link_is_rolled_back(setup, mosquitto):
    config_path, manager, agent, ops = setup
    dead_port = free_port()
    response = ops.send("config", {"id": "cut", "settings": {"mqtt": {"port": dead_port}}}, timeout=20)
    assert response["ok"] is False and response["rolled_back"] is True, response
    assert "not reachable within 1.5 s" in response["error"]
    assert [c.mqtt.port for c in agent.applied] == [dead_port, mosquitto.port]
    assert manager.config.mqtt.port == mosquitto.port
    assert load_effective_config(config_path).mqtt.port == mosquitto.port
    assert RemoteStore(manager.config.device.data_dir).state["status"] == "rolled_back"
    # Still managed afterwards.
    assert ops.send("command", {"id": "s", "command": "status"})["ok"] is True


def test_a_fence_set_goes_the_same_way(setup):
    config_path, manager, agent, ops = setup
    response = ops.send("config", {"id": "f1", "geofences": FENCES, "geofences_version": "depot-v1"})
    assert response == {"id": "f1", "ok": True, "config_version": manager.version, "geofences_version": "depot-v1"}
    assert agent.fences.version == "depot-v1" and len(agent.fences.set) == 1
    assert agent.applied == []  # settings unchanged: nothing restarted
    assert RemoteStore(manager.config.device.data_dir).fences["version"] == "depot-v1"


def test_allowlisted_commands(setup):
    _, _, agent, ops = setup
    assert ops.send("command", {"id": "1", "command": "status"})["result"] == {"device_id": DEVICE, "gps": {"fix": True}}
    assert ops.send("command", {"id": "2", "command": "flush", "args": {"timeout_s": 5}})["result"] == {"flushed": True}
    assert agent.flushes == [5.0]
    root = logging.getLogger()
    level = root.level
    try:
        assert ops.send("command", {"id": "3", "command": "set_log_level", "args": {"level": "debug"}})["ok"]
        assert root.level == logging.DEBUG
        refused = ops.send("command", {"id": "4", "command": "set_log_level", "args": {"level": "LOUD"}})
        assert refused["ok"] is False and "level must be one of" in refused["error"]
    finally:
        root.setLevel(level)
    assert ops.send("command", {"id": "5", "command": "restart"})["result"] == {"restarting": True}
    wait_until(lambda: agent.restarts == 1, message="the restart")


def test_commands_outside_the_allowlist_are_refused_and_logged(setup, caplog):
    _, _, agent, ops = setup
    with caplog.at_level(logging.WARNING, logger="agent.ops.remote"):
        response = ops.send("command", {"id": "evil", "command": "shell", "args": {"cmd": "rm -rf /"}})
    assert response["ok"] is False
    assert response["error"] == f"command 'shell' is not allowed (allowed: {', '.join(COMMANDS)})"
    assert {"status", "flush", "set_log_level", "restart"} <= set(COMMANDS) and "shell" not in COMMANDS
    assert any("remote command evil refused" in r.getMessage() for r in caplog.records)
    assert agent.restarts == 0 and agent.flushes == []


def test_a_change_pending_across_restarts_is_rolled_back_at_load(tmp_path, data_dir):
    """The new settings killed the agent before it could confirm them: later starts go back."""
    config_path = tmp_path / "agent.yaml"
    config_path.write_text(f"device:\n  id: {DEVICE}\n  data_dir: {data_dir}\n")
    store = RemoteStore(data_dir)
    store.save({"status": "confirmed", "settings": {"gps": {"baud": 19200}}, "fences": None})
    store.stage("bad", {"gps": {"baud": 4800}}, None)
    for _ in range(MAX_PENDING_STARTS):
        assert load_effective_config(config_path).gps.baud == 4800  # given its chance
    assert load_effective_config(config_path).gps.baud == 19200
    assert RemoteStore(data_dir).state["status"] == "rolled_back"


def test_a_change_applied_by_restarting_is_answered_by_the_next_start(tmp_path, mosquitto, data_dir):
    """The composition root may apply settings by restarting the agent: the next start confirms and answers."""
    config_path = write_config(tmp_path, data_dir, mosquitto.port)
    link = PahoLink(mosquitto.port)
    agent = Agentish(link, GeofenceProcessor(load_config(config_path).edge.geofences, data_dir))
    holder = {}
    _, stop, thread = start_manager(config_path, link, agent, apply=lambda config: holder["stop"].set())
    holder["stop"] = stop
    ops = Ops(mosquitto.port)
    try:
        ops.wait_until_served()
        ops.client.publish(f"telematics/{DEVICE}/config", json.dumps({"id": "r1", "settings": {"gps": {"baud": 4800}}}), qos=1)
        thread.join(10)
        assert not thread.is_alive() and RemoteStore(data_dir).pending
        # The next start runs with the change and answers the request it came from.
        _, stop2, thread2 = start_manager(config_path, link, agent)
        response = ops.responses.get(timeout=10)
        while response.get("id") != "r1":  # late warm-up answers
            response = ops.responses.get(timeout=10)
        assert response["ok"] is True
        assert load_effective_config(config_path).gps.baud == 4800
        assert RemoteStore(data_dir).state["status"] == "confirmed" and RemoteStore(data_dir).unanswered is None
        stop2.set()
        thread2.join(10)
    finally:
        ops.close()
        link.close()


def test_with_the_agents_own_mqtt_link(tmp_path, mosquitto, data_dir):
    """The same requests through agent.publish.mqtt_link.MqttLink (with its durable buffer) instead of paho."""
    from agent.buffer.store import DurableBuffer
    from agent.publish.mqtt_link import MqttLink

    config_path = write_config(tmp_path, data_dir, mosquitto.port)
    config = load_effective_config(config_path)
    clock = SystemClock()
    buffer = DurableBuffer(data_dir, config.buffer, clock)
    buffer.open()
    buffer.start()
    link = MqttLink(config.mqtt, DEVICE, buffer, clock)
    link_stop = threading.Event()
    link_thread = threading.Thread(target=link.run, args=(link_stop,), daemon=True)
    link_thread.start()
    applied = []
    manager = RemoteManager(
        config_path, config, link, clock, apply=lambda c: applied.append(c) or True, link_up=lambda: link.stats()["connected"],
        status=lambda: {"broker": link.stats()}, flush=lambda timeout: True, restart=lambda: None,
    )
    stop = threading.Event()
    thread = threading.Thread(target=manager.run, args=(stop,), daemon=True)
    thread.start()
    ops = Ops(mosquitto.port)
    try:
        ops.wait_until_served()
        response = ops.send("config", {"id": "m1", "settings": {"gps": {"baud": 115200}}})
        assert response["ok"] is True and [c.gps.baud for c in applied] == [115200]
        status = ops.send("command", {"id": "m2", "command": "status"})
        assert status["result"]["broker"]["connected"] is True
        refused = ops.send("command", {"id": "m3", "command": "reboot"})
        assert refused["ok"] is False and "not allowed" in refused["error"]
    finally:
        stop.set()
        thread.join(10)
        link_stop.set()
        link_thread.join(10)
        buffer.close()
        ops.close()


keys = st.sampled_from(["gps", "mqtt", "port", "baud", "tls", "a"])
trees = st.recursive(st.one_of(st.integers(), st.text(max_size=3), st.none()),
                     lambda children: st.dictionaries(keys, children, max_size=4), max_leaves=12)
configs = st.dictionaries(keys, trees, max_size=4)


@given(base=configs, change=configs)
def test_merge_properties(base, change):
    merged = merge(base, change)
    assert merge(base, {}) == base and merge({}, change) == change
    assert merge(merged, change) == merged  # applying the same change twice changes nothing more
    for key, value in change.items():
        if not (isinstance(value, dict) and isinstance(base.get(key), dict)):
            assert merged[key] == value
    for key in set(base) - set(change):
        assert merged[key] == base[key]


def test_a_link_cutting_change_applied_by_restarts_is_rolled_back_and_answered(tmp_path, mosquitto, data_dir):
    """The composition root applies by restarting: change -> restart -> no broker -> roll back -> restart -> answer."""
    config_path = write_config(tmp_path, data_dir, mosquitto.port)
    dead_port = free_port()
    ops = Ops(mosquitto.port)
    links = []

    def start():
        """One start of the agent: the effective config, a link to its broker, a manager."""
        config = load_effective_config(config_path)
        link = PahoLink(config.mqtt.port)
        links.append(link)
        agent = Agentish(link, GeofenceProcessor(config.edge.geofences, data_dir))
        holder = {}
        manager, stop, thread = start_manager(config_path, link, agent, apply=lambda c: holder["stop"].set())
        holder["stop"] = stop
        return config, stop, thread

    try:
        _, stop1, thread1 = start()
        ops.wait_until_served()
        ops.client.publish(f"telematics/{DEVICE}/config", json.dumps({"id": "cut2", "settings": {"mqtt": {"port": dead_port}}}), qos=1)
        thread1.join(10)
        assert not thread1.is_alive() and RemoteStore(data_dir).pending
        config2, stop2, thread2 = start()  # runs with the new port: the broker is not there
        assert config2.mqtt.port == dead_port
        thread2.join(10)  # after rollback_timeout_s it rolls back, which again means a restart
        assert not thread2.is_alive()
        assert RemoteStore(data_dir).state["status"] == "rolled_back" and RemoteStore(data_dir).unanswered
        config3, stop3, thread3 = start()
        assert config3.mqtt.port == mosquitto.port
        response = ops.responses.get(timeout=10)
        while response.get("id") != "cut2":  # late warm-up answers
            response = ops.responses.get(timeout=10)
        assert response["ok"] is False and response["rolled_back"] is True
        assert "not reachable within 1.5 s" in response["error"]
        wait_until(lambda: RemoteStore(data_dir).unanswered is None, message="the answer marked as sent")
        stop3.set()
        thread3.join(10)
    finally:
        ops.close()
        for link in links:
            link.close()


def fence_collection(n: int) -> dict:
    """``n`` small square depots as a GeoJSON FeatureCollection."""
    return {"type": "FeatureCollection", "features": [
        {"type": "Feature", "id": f"d{i}", "properties": {"type": "depot"},
         "geometry": {"type": "Polygon", "coordinates": [[[4 + i / 100, 52], [4.001 + i / 100, 52], [4.001 + i / 100, 52.001],
                                                          [4 + i / 100, 52.001], [4 + i / 100, 52]]]}}
        for i in range(n)]}


def test_a_fence_set_is_written_once_to_its_own_file_and_state_changes_stay_small(data_dir):
    """remote.json refers to the set; pending, confirmed and answered rewrite only remote.json, and the
    set a change replaced is deleted once nothing can roll back to it."""
    store = RemoteStore(data_dir)
    store.save({"status": "confirmed", "settings": {}, "fences": {"geojson": fence_collection(500), "version": "v1"}})
    sets = data_dir / "fences"
    (first,) = sets.iterdir()
    assert json.loads(store.geojson(store.fences)) == fence_collection(500)
    store.stage("f2", {}, {"geojson": fence_collection(400), "version": "v2"})
    assert len(list(sets.iterdir())) == 2  # the new set, and the one a roll-back would restore
    second = next(p for p in sets.iterdir() if p != first)
    written = second.stat().st_mtime_ns, second.stat().st_ino
    store.confirm({"id": "f2", "ok": True})
    store.answered()
    assert list(sets.iterdir()) == [second] and (second.stat().st_mtime_ns, second.stat().st_ino) == written
    remote_json = (data_dir / "remote.json").read_bytes()
    assert len(remote_json) < 1000 and b"Polygon" not in remote_json
    assert RemoteStore(data_dir).fences == {"version": "v2", "file": second.stem}


def test_a_rolled_back_set_comes_back_from_its_file(data_dir):
    store = RemoteStore(data_dir)
    store.save({"status": "confirmed", "settings": {}, "fences": {"geojson": fence_collection(3), "version": "v1"}})
    store.stage("f2", {}, {"geojson": fence_collection(5), "version": "v2"})
    store.roll_back("no broker")
    assert store.fences["version"] == "v1"
    assert json.loads(RemoteStore(data_dir).geojson(store.fences)) == fence_collection(3)
    assert len(list((data_dir / "fences").iterdir())) == 1


def test_a_remote_json_holding_its_set_still_loads_and_the_set_moves_to_a_file(data_dir):
    """remote.json as releases before set files wrote it: the GeoJSON inside."""
    (data_dir / "remote.json").write_text(json.dumps(
        {"status": "confirmed", "settings": {}, "fences": {"geojson": fence_collection(2), "version": "old"}}))
    store = RemoteStore(data_dir)
    assert GeofenceSet.from_geojson(store.geojson(store.fences)).fences[0].id == "d0"
    store.answered()
    assert "geojson" not in RemoteStore(data_dir).fences
    assert json.loads(store.geojson(store.fences)) == fence_collection(2)


def test_a_missing_set_file_is_a_clear_error(data_dir):
    store = RemoteStore(data_dir)
    store.save({"status": "confirmed", "settings": {}, "fences": {"geojson": fence_collection(1), "version": "v9"}})
    for path in (data_dir / "fences").iterdir():
        path.unlink()
    with pytest.raises(RemoteError, match="geofences 'v9': the stored set cannot be read"):
        RemoteStore(data_dir).geojson(store.fences)
