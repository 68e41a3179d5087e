"""The backend's side of fence sets over MQTT: retained manifests, and the sets on request.

An assignment gives a device (or, with ``devices=None``, every device without one of its own) a
fence set and a version. For each device the publisher keeps a retained manifest on
``{prefix}/{device}/geofences/manifest`` (agent/ops/fences_sync.py has the format) and answers
``{prefix}/{device}/geofences/get`` with the set's bytes on ``{prefix}/{device}/geofences/set``,
only when the request names the set currently assigned. Devices are discovered from their
retained ``status`` messages, so a fleet-wide set reaches devices that come online later too.

State, in ``state_dir``: ``assignments.json`` (``{"devices": {id: manifest}, "all": manifest}``)
and ``sets/{sha256}.geojson``, so a restarted publisher serves the same sets and publishes the
same manifests again (a broker without persistence forgets retained messages when it restarts).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from pathlib import Path
from typing import Any, Sequence

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from collector.broker_auth import apply_credentials
from agent.config import TlsConfig
from agent.ops.fences_sync import GET_TOPIC, MANIFEST_TOPIC, SET_TOPIC, make_manifest, parse_manifest
from agent.processors.geofence import GeofenceSet
from agent.state_file import StateFile

log = logging.getLogger(__name__)


class FencePublisher:
    """Publishes fence manifests and serves fence sets over MQTT from ``state_dir``."""

    def __init__(self, host: str, port: int, topic_prefix: str, state_dir: str | Path, *,
                 tls: TlsConfig | None = None, username: str | None = None, password: str | None = None) -> None:
        self.host, self.port, self.prefix = host, port, topic_prefix
        self.dir = Path(state_dir)
        self._tls, self._username, self._password = tls, username, password
        self._state = StateFile(self.dir, "assignments")
        saved = self._state.load()
        self.assignments: dict[str, Any] = {"devices": saved.get("devices") or {}, "all": saved.get("all")}
        self._lock = threading.Lock()
        self._announced: dict[str, tuple[str, str]] = {}  # device -> the manifest published on this connection
        self.seen: set[str] = set()  # devices whose status the broker holds
        self._client: mqtt.Client | None = None
        self.connected = threading.Event()
        self.counts = {"manifests": 0, "sets": 0, "set_bytes": 0, "refused": 0}

    # -- assignments ----------------------------------------------------------------------------

    def assign(self, data: bytes, version: str, devices: Sequence[str] | None) -> dict[str, Any]:
        """Give ``devices`` (None: every device without its own set) the set ``data`` as ``version``.

        The set and its manifest are validated as the device would (ValueError, e.g. GeofenceError,
        says why not); the manifest is published at once when connected. Returns the manifest.
        """
        for device in devices or ():
            if not device or any(c in device for c in "+#/"):
                raise ValueError(f"device id {device!r} cannot be part of a topic")
        manifest = make_manifest(data, version)
        parse_manifest(json.dumps(manifest).encode())  # what devices would refuse is not published
        GeofenceSet.from_geojson(data)
        path = self._set_path(manifest["sha256"])
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        with self._lock:
            if devices is None:
                self.assignments["all"] = manifest
            else:
                for device in devices:
                    self.assignments["devices"][device] = manifest
            self._state.save(self.assignments)
            targets = sorted(self.seen) if devices is None else list(devices)
        log.info("fence set %s (%d bytes, sha256 %s) assigned to %s", version, manifest["size"],
                 manifest["sha256"][:12], "every device" if devices is None else ", ".join(devices))
        for device in targets:
            self._announce(device)
        return manifest

    def manifest_for(self, device: str) -> dict[str, Any] | None:
        """The manifest of the set assigned to ``device``: its own, else the fleet's, else None."""
        with self._lock:
            return self.assignments["devices"].get(device) or self.assignments["all"]

    def _set_path(self, sha256: str) -> Path:
        return self.dir / "sets" / f"{sha256}.geojson"

    # -- MQTT -----------------------------------------------------------------------------------

    def start(self) -> "FencePublisher":
        """Connect (paho's thread reconnects by itself) and publish every assigned device's manifest."""
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"telematics-fences-{uuid.uuid4().hex[:8]}")
        client.on_connect = self._on_connect
        client.on_disconnect = lambda *_: self.connected.clear()
        client.on_message = self._on_message
        client.reconnect_delay_set(1, 30)
        apply_credentials(client, self._tls, self._username, self._password)
        client.connect(self.host, self.port, keepalive=30)
        client.loop_start()
        self._client = client
        return self

    def stop(self) -> None:
        if self._client is not None:
            self._client.loop_stop()
            self._client.disconnect()
            self._client = None

    def _topic(self, device: str, suffix: str) -> str:
        return f"{self.prefix}/{device}/{suffix}"

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("the broker refused the fence publisher: %s", reason_code)
            return
        with self._lock:
            self._announced.clear()
            devices = list(self.assignments["devices"])
        client.subscribe(f"{self.prefix}/+/{GET_TOPIC}", qos=1)
        # Retained birth and will messages name every device the broker knows of.
        client.subscribe(f"{self.prefix}/+/status", qos=1)
        self.connected.set()
        for device in devices:
            self._announce(device)

    def _announce(self, device: str) -> None:
        """Publish ``device``'s manifest (retained) unless it already was on this connection."""
        manifest = self.manifest_for(device)
        client = self._client
        if manifest is None or client is None or not self.connected.is_set():
            return
        with self._lock:
            if self._announced.get(device) == (manifest["version"], manifest["sha256"]):
                return
            self._announced[device] = (manifest["version"], manifest["sha256"])
        client.publish(self._topic(device, MANIFEST_TOPIC), json.dumps(manifest).encode(), qos=1, retain=True)
        self.counts["manifests"] += 1

    def _on_message(self, client, userdata, message) -> None:
        device, _, suffix = message.topic[len(self.prefix) + 1:].partition("/")
        if suffix == "status":
            with self._lock:
                self.seen.add(device)
            self._announce(device)
        elif suffix == GET_TOPIC:
            self._serve(client, device, bytes(message.payload))

    def _serve(self, client: mqtt.Client, device: str, payload: bytes) -> None:
        manifest = self.manifest_for(device)
        try:
            request = json.loads(payload)
            if not isinstance(request, dict):
                raise ValueError("not a JSON object")
            if manifest is None:
                raise ValueError("no fence set is assigned to it")
            if request.get("sha256") != manifest["sha256"] or request.get("version") != manifest["version"]:
                raise ValueError(f"it asked for {request.get('version')!r}, "
                                 f"the set assigned is {manifest['version']!r}")
            data = self._set_path(manifest["sha256"]).read_bytes()
        except (OSError, ValueError) as exc:
            self.counts["refused"] += 1
            log.warning("fence set request of %s not served: %s", device, exc)
            with self._lock:
                self._announced.pop(device, None)
            self._announce(device)  # the current manifest again, should the device have missed it
            return
        client.publish(self._topic(device, SET_TOPIC), data, qos=1)
        self.counts["sets"] += 1
        self.counts["set_bytes"] += len(data)
        log.info("fence set %s sent to %s (%d bytes)", manifest["version"], device, len(data))
