"""Fence sets over MQTT without sending them again on every reconnect: a small retained manifest.

Below ``P = {topic_prefix}/{device_id}`` (docs/geofences.md, "Fence sets over MQTT"):

- ``P/geofences/manifest`` (retained, from the fence server): ``{"version": "v42", "sha256":
  "<hex of the set's bytes>", "size": N}``. The broker hands it over at every (re)subscription;
  it costs about 120 bytes.
- ``P/geofences/get`` (from the device): ``{"version": ..., "sha256": ...}``, sent only when the
  manifest differs (version or hash) from the set in force and from the last one dealt with.
- ``P/geofences/set`` (not retained, from the fence server): the GeoJSON bytes. Their size and
  SHA-256 are checked against the manifest before the set goes to remote management
  (``RemoteManager.submit_fences``), which validates, applies, confirms or rolls back, and answers
  on ``P/response`` with the id ``geofences:{version}``, exactly like a ``config`` request.

The last manifest dealt with (its set applied or refused) is kept in
``{data_dir}/geofences-sync.json``, so a set that was refused
(invalid, or not matching its manifest twice) is not fetched again, on reconnect or after a
restart, until the manifest changes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from pathlib import Path
from typing import Any, Callable

from agent.clock import Clock
from agent.ops.remote import Link
from agent.state_file import StateFile

log = logging.getLogger(__name__)

MANIFEST_TOPIC = "geofences/manifest"
GET_TOPIC = "geofences/get"
SET_TOPIC = "geofences/set"
SYNC_STATE = "geofences-sync"  # {data_dir}/geofences-sync.json
# Largest set accepted: the whole set is held in memory while it is checked and indexed; the
# 100,000 fences of bench/bench_geofence.py are 49 MB of GeoJSON.
MAX_SET_BYTES = 64 * 1024 * 1024
MAX_VERSION_CHARS = 128
# A get that was not answered (no fence server running) is sent again this often; it is ~100 bytes.
FETCH_RETRY_S = 60.0
# A set whose bytes do not match the manifest is asked for once more (it may have been answering an
# older request just as the manifest changed), then refused until the manifest changes.
MAX_MISMATCHES = 2
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def make_manifest(data: bytes, version: str) -> dict[str, Any]:
    """The manifest describing ``data`` as set ``version``."""
    return {"version": version, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def parse_manifest(payload: bytes) -> dict[str, Any]:
    """A manifest's ``version``, ``sha256`` and ``size``; ValueError says what is wrong.

    Other keys are ignored, so a later server may add some without breaking older devices.
    """
    doc = json.loads(payload)
    if not isinstance(doc, dict):
        raise ValueError("the manifest must be a JSON object")
    version, sha256, size = doc.get("version"), doc.get("sha256"), doc.get("size")
    if not isinstance(version, str) or not 0 < len(version) <= MAX_VERSION_CHARS:
        raise ValueError(f"version must be a string of 1 to {MAX_VERSION_CHARS} characters, got {version!r}")
    if not isinstance(sha256, str) or not _SHA256_HEX.fullmatch(sha256):
        raise ValueError("sha256 must be 64 lower-case hex digits")
    if type(size) is not int or not 0 < size <= MAX_SET_BYTES:
        raise ValueError(f"size must be an integer from 1 to {MAX_SET_BYTES}, got {size!r}")
    return {"version": version, "sha256": sha256, "size": size}


def check_set(manifest: dict[str, Any], data: bytes) -> None:
    """Raise ValueError unless ``data`` has the manifest's size and SHA-256."""
    if len(data) != manifest["size"]:
        raise ValueError(f"the set has {len(data)} bytes, its manifest says {manifest['size']}")
    digest = hashlib.sha256(data).hexdigest()
    if digest != manifest["sha256"]:
        raise ValueError(f"the set's sha256 is {digest}, its manifest says {manifest['sha256']}")


def request_id(version: str) -> str:
    """The id of the response to a set fetched through the manifest."""
    return f"geofences:{version}"


def _key(entry: dict[str, Any] | None) -> tuple[Any, Any] | None:
    return (entry.get("version"), entry.get("sha256")) if entry else None


class FenceSync:
    """Follows the retained manifest and fetches a set only when it changed.

    ``active()`` is the fence entry in force (RemoteStore.fences: ``version`` and ``sha256``);
    ``submit(version, sha256, data, done)`` hands a checked set to remote management, which calls
    ``done()`` once the set was applied or refused. Callbacks run in
    the link's thread; ``run(stop)`` subscribes and re-sends an unanswered get every ``retry_s``.
    """

    def __init__(self, link: Link, data_dir: str | Path, clock: Clock, *,
                 active: Callable[[], dict[str, Any] | None],
                 submit: Callable[[str, str, bytes, Callable[[], None]], None],
                 retry_s: float = FETCH_RETRY_S) -> None:
        self.link = link
        self.clock = clock
        self._active = active
        self._submit = submit
        self.retry_s = retry_s
        self._state = StateFile(data_dir, SYNC_STATE)
        self.fetched: dict[str, Any] | None = self._state.load().get("fetched")
        self._lock = threading.Lock()
        self._wanted: dict[str, Any] | None = None
        self._applying: dict[str, Any] | None = None  # handed to remote management, outcome not yet known
        self._asked_at = 0.0
        self._mismatches = 0
        self.counts = {"manifests": 0, "gets": 0, "sets": 0, "set_bytes": 0, "refused": 0}

    def run(self, stop: threading.Event) -> None:
        """Subscribe, then ask again for a set that did not come, until ``stop``."""
        self.link.subscribe(MANIFEST_TOPIC, self.on_manifest)
        self.link.subscribe(SET_TOPIC, self.on_set)
        while not stop.wait(1.0):
            with self._lock:
                wanted = self._wanted if self.clock.monotonic() - self._asked_at >= self.retry_s else None
                if wanted is not None:
                    self._asked_at = self.clock.monotonic()
            if wanted is not None:
                self._ask(wanted)

    def on_manifest(self, payload: bytes) -> None:
        """A (retained) manifest: fetch the set it describes unless it is in force or was fetched."""
        if not payload:  # the retained manifest was cleared: nothing to fetch, the set in force stays
            return
        try:
            manifest = parse_manifest(payload)
        except ValueError as exc:
            log.warning("ignoring a malformed geofence manifest: %s", exc)
            return
        key = _key(manifest)
        with self._lock:
            now = self.clock.monotonic()
            fetch = key not in (_key(self._active()), _key(self.fetched), _key(self._applying))
            # The same manifest twice (a retained message delivered once per SUBSCRIBE, or again after
            # a reconnect) is asked for once; an unanswered get is sent again by run() after retry_s.
            asking = fetch and (_key(self._wanted) != key or now - self._asked_at >= self.retry_s)
            if fetch and _key(self._wanted) != key:
                self._mismatches = 0
            self._wanted = manifest if fetch else None
            if asking:
                self._asked_at = now
        if asking:
            log.info("geofence manifest %s (%d bytes) differs from the set in force: fetching it",
                     manifest["version"], manifest["size"])
            self._ask(manifest)
        self.counts["manifests"] += 1  # counted once acted on: whoever waits for it sees the outcome

    def _ask(self, manifest: dict[str, Any]) -> None:
        payload = json.dumps({"version": manifest["version"], "sha256": manifest["sha256"]}).encode()
        if self.link.publish_message(GET_TOPIC, payload, qos=1):
            self.counts["gets"] += 1
        else:  # the link is down: ask as soon as the manifest comes again, or at run()'s next turn
            with self._lock:
                self._asked_at = float("-inf")

    def on_set(self, data: bytes) -> None:
        """The set asked for: checked against its manifest, then handed to remote management."""
        self.counts["sets"] += 1
        self.counts["set_bytes"] += len(data)
        with self._lock:
            manifest = self._wanted
        if manifest is None:
            log.warning("ignoring a geofence set that was not asked for (%d bytes)", len(data))
            return
        try:
            check_set(manifest, data)
        except ValueError as exc:
            with self._lock:
                self._mismatches += 1
                again = self._mismatches < MAX_MISMATCHES
                if again:
                    self._asked_at = self.clock.monotonic()
            if again:
                self._ask(manifest)
                return
            self._done(manifest)
            self.counts["refused"] += 1
            log.warning("geofence set %s refused: %s; the set in force stays", manifest["version"], exc)
            response = {"id": request_id(manifest["version"]), "ok": False, "error": f"geofences: {exc}"}
            self.link.publish_message("response", json.dumps(response).encode(), qos=1)
            return
        with self._lock:
            if _key(self._wanted) == _key(manifest):
                self._wanted, self._mismatches = None, 0
            self._applying = manifest
        log.info("geofence set %s fetched (%d bytes): applying", manifest["version"], len(data))
        self._submit(manifest["version"], manifest["sha256"], data, lambda: self._done(manifest))

    def _done(self, manifest: dict[str, Any]) -> None:
        """Remember ``manifest`` as dealt with (applied or refused): it is not asked for again."""
        with self._lock:
            if _key(self._wanted) == _key(manifest):
                self._wanted, self._mismatches = None, 0
            if _key(self._applying) == _key(manifest):
                self._applying = None
            self.fetched = manifest
            self._state.save({"fetched": manifest})
