"""Remote management over MQTT: settings and fence sets on one topic, a few commands on another.

Topics (below ``{topic_prefix}/{device_id}/``), JSON payloads, answers on ``response``:

- ``config``: ``{"id": "c1", "settings": {"gps": {"baud": 38400}}, "geofences": {...GeoJSON...},
  "geofences_version": "v42"}`` (``settings`` and/or ``geofences``). Settings are merged over the
  config file, validated with the same schema (a refusal names the key and the problem), then the
  change is saved and applied at once. If the broker cannot be reached within
  ``remote.rollback_timeout_s`` after applying, the previous settings and fences come back.
- ``command``: ``{"id": "k1", "command": "status" | "flush" | "set_log_level" | "restart" | "update"
  | "renew_certificate", "args": {...}}``. Anything else is refused and logged. ``update`` and
  ``renew_certificate`` are served by agent/ota and agent/certs (docs/ota.md, docs/certificates.md).
- A fence set fetched through the retained manifest (agent/ops/fences_sync.py) comes in through
  ``submit_fences`` and goes the way of a ``config`` request with ``geofences`` (id
  ``geofences:{version}``); its SHA-256 is kept with it, to compare with the next manifest.

The remote state lives in ``{data_dir}/remote.json`` (written atomically: settings, fences and
what they replaced); the config file under /etc stays as the installer wrote it. A change still
"pending" when the agent restarts (the new settings killed it) is given ``MAX_PENDING_STARTS``
starts to reach the broker, then rolled back at load time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
from pathlib import Path
from typing import Any, Callable, Protocol

import msgspec
import yaml

from agent.clock import Clock
from agent.config import Config, ConfigError, load_config, parse_config
from agent.state_file import StateFile, write_atomically

log = logging.getLogger(__name__)

REMOTE_STATE = "remote"  # {data_dir}/remote.json
FENCE_SETS = "fences"  # {data_dir}/fences/{sha256}.geojson: the sets remote.json refers to
COMMANDS = ("status", "flush", "set_log_level", "restart", "update", "renew_certificate")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# Starts allowed with a change that has not yet been confirmed by reaching the broker.
MAX_PENDING_STARTS = 2
# Settings that would make the device someone else, or lose its buffer: only the installer changes them.
LOCKED = (("device", "id"), ("device", "data_dir"))
RESPONSE_RETRY_S = 0.5


class Link(Protocol):
    """What remote management needs of the MQTT link (agent.publish.mqtt_link.MqttLink has it)."""

    def publish_message(self, topic_suffix: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool: ...

    def subscribe(self, topic_suffix: str, callback: Callable[[bytes], None]) -> None: ...


class RemoteError(ValueError):
    """A request that cannot be applied; the message is the reason sent back."""


def config_version(config: Config) -> str:
    """A short digest of the effective settings, shown by ``status`` and in responses."""
    return hashlib.sha256(msgspec.json.encode(config)).hexdigest()[:12]


def merge(base: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    """``change`` deep-merged over ``base`` (mappings merged key by key; anything else replaced)."""
    out = dict(base)
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _raw_file(path: Path) -> dict[str, Any]:
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return raw


def validate_settings(file_raw: dict[str, Any], settings: Any) -> Config:
    """The config that ``settings`` over the file's would give; RemoteError says why not."""
    if not isinstance(settings, dict):
        raise RemoteError("settings must be an object of config sections")
    for section, key in LOCKED:
        if isinstance(settings.get(section), dict) and key in settings[section]:
            raise RemoteError(f"{section}.{key} cannot be changed remotely")
    try:
        return parse_config(yaml.safe_dump(merge(file_raw, settings)), source="settings")
    except ConfigError as exc:
        raise RemoteError(str(exc)) from exc


class RemoteStore:
    """``{data_dir}/remote.json``: the remote settings and fence set, and what they replaced.

    A fence set's GeoJSON is kept in a file of its own, ``{data_dir}/fences/{sha256}.geojson``,
    written once; remote.json refers to it by ``file``, so the state changes of a request (pending,
    confirmed, answered) rewrite a few hundred bytes, not a set of 100,000 fences each time.
    """

    def __init__(self, data_dir: str | Path) -> None:
        self._file = StateFile(data_dir, REMOTE_STATE)
        self._sets = Path(data_dir) / FENCE_SETS
        self.state: dict[str, Any] = self._file.load()

    @property
    def settings(self) -> dict[str, Any]:
        return self.state.get("settings") or {}

    @property
    def fences(self) -> dict[str, Any] | None:
        """The fence set in force, ``{"version", "sha256", "file"}``, or None when none was received;
        its GeoJSON is :meth:`geojson`."""
        return self.state.get("fences")

    @property
    def previous_fences(self) -> dict[str, Any] | None:
        """The fence set a pending change replaced (what a roll-back restores)."""
        return (self.state.get("previous") or {}).get("fences")

    @property
    def pending(self) -> bool:
        return self.state.get("status") == "pending"

    def geojson(self, entry: dict[str, Any]) -> bytes:
        """The GeoJSON of a fence entry: from its file, or held in the entry (a new request, or a
        remote.json written before sets had files of their own). RemoteError when it cannot be read."""
        if "geojson" in entry:
            return json.dumps(entry["geojson"], separators=(",", ":")).encode()
        try:
            return (self._sets / f"{entry['file']}.geojson").read_bytes()
        except (OSError, KeyError) as exc:
            raise RemoteError(f"geofences {entry.get('version')!r}: the stored set cannot be read: {exc}") from exc

    def save(self, state: dict[str, Any]) -> None:
        state = {**state, "fences": self._filed(state.get("fences"))}
        if state.get("previous"):
            state["previous"] = {**state["previous"], "fences": self._filed(state["previous"].get("fences"))}
        self._file.save(state)
        self.state = state
        self._prune()

    def _filed(self, entry: dict[str, Any] | None) -> dict[str, Any] | None:
        """``entry`` with its GeoJSON moved into its set file (written only if it is not there yet)."""
        if not entry or "geojson" not in entry:
            return entry
        data = self.geojson(entry)
        name = hashlib.sha256(data).hexdigest()
        path = self._sets / f"{name}.geojson"
        if not path.exists():
            write_atomically(path, data)
        return {**{k: v for k, v in entry.items() if k != "geojson"}, "file": name}

    def _prune(self) -> None:
        """Delete set files neither the set in force nor the one it replaced refers to."""
        keep = {f"{e['file']}.geojson" for e in (self.fences, self.previous_fences) if e and "file" in e}
        try:
            stale = [p for p in self._sets.iterdir() if p.name not in keep]
        except FileNotFoundError:
            return
        for path in stale:
            path.unlink(missing_ok=True)

    def stage(self, request_id: str | None, settings: dict[str, Any], fences: dict[str, Any] | None) -> dict[str, Any]:
        """Save the new state as pending, keeping the current one to roll back to; returns the old state."""
        previous = {k: self.state.get(k) for k in ("settings", "fences")}
        self.save({"status": "pending", "request_id": request_id, "settings": settings, "fences": fences,
                   "previous": previous, "starts": 0})
        return previous

    def confirm(self, response: dict[str, Any]) -> None:
        """The change reached the broker; ``response`` is the answer still to be sent."""
        self.save({**self.state, "status": "confirmed", "previous": None, "response": response, "responded": False})

    def roll_back(self, reason: str) -> None:
        """Back to the previous settings and fences; the answer saying so is kept until it is sent."""
        previous = self.state.get("previous") or {}
        request_id = self.state.get("request_id")
        response = {"id": request_id, "ok": False, "rolled_back": True, "error": reason}
        self.save({"status": "rolled_back", "request_id": request_id, "reason": reason,
                   "settings": previous.get("settings"), "fences": previous.get("fences"), "previous": None,
                   "response": response, "responded": False})

    @property
    def unanswered(self) -> dict[str, Any] | None:
        """The outcome of the last change if it was never sent (e.g. applying it restarted the agent)."""
        return self.state.get("response") if self.state.get("responded") is False else None

    def answered(self) -> None:
        self.save({**self.state, "responded": True})


def _geojson(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError as exc:
        raise RemoteError(f"geofences: not valid JSON: {exc}") from exc


def load_effective_config(path: str | Path) -> Config:
    """The config file with the remote settings merged over it (the agent starts with this).

    A change still pending after ``MAX_PENDING_STARTS`` starts is rolled back here: it kept the
    agent from reaching the broker (or from running at all).
    """
    path = Path(path)
    base = load_config(path)
    store = RemoteStore(base.device.data_dir)
    if store.pending:
        starts = int(store.state.get("starts", 0)) + 1
        if starts > MAX_PENDING_STARTS:
            log.warning("remote change %s never reached the broker in %d starts: rolling back",
                        store.state.get("request_id"), MAX_PENDING_STARTS)
            store.roll_back(f"the broker was not reachable in {MAX_PENDING_STARTS} starts after applying: rolled back")
        else:
            store.save({**store.state, "starts": starts})
    if not store.settings:
        return base
    try:
        return validate_settings(_raw_file(path), store.settings)
    except RemoteError as exc:
        # The file changed under the remote settings so that they no longer fit: the file wins.
        log.error("ignoring the remote settings in %s: %s", store._file.path, exc)
        return base


class RemoteManager:
    """Serves the config and command topics; ``run(stop)`` in its own thread (it waits for the link).

    ``apply(config)`` puts a new Config into effect: it returns True once the config is in effect
    in this process (e.g. the link reconnected with new mqtt settings); anything else means it asked
    for a restart, and the next start (which loads the saved change) confirms or rolls it back and
    sends the answer. ``link_up()`` says whether the broker is
    connected; ``parse_fences(bytes)`` validates a GeoJSON fence set (GeofenceSet.from_geojson) and
    ``replace_fences(set, version)`` swaps it in. ``flush(timeout) -> bool``, ``restart()`` and
    ``status() -> dict`` serve the commands of the same names.
    """

    def __init__(
        self,
        config_path: str | Path,
        config: Config,
        link: Link,
        clock: Clock,
        *,
        apply: Callable[[Config], bool | None],
        link_up: Callable[[], bool],
        status: Callable[[], dict[str, Any]],
        flush: Callable[[float], bool],
        restart: Callable[[], None],
        parse_fences: Callable[[bytes], Any] | None = None,
        replace_fences: Callable[[Any, str | None], None] | None = None,
        update: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        renew_certificate: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        self.config_path = Path(config_path)
        self.config = config
        self.link = link
        self.clock = clock
        self.store = RemoteStore(config.device.data_dir)
        self._apply = apply
        self._link_up = link_up
        self._status = status
        self._flush = flush
        self._restart = restart
        self._parse_fences = parse_fences
        self._replace_fences = replace_fences
        # Long-running commands: the handler checks the request, starts the work and returns at once.
        self._handlers = {"update": update, "renew_certificate": renew_certificate}
        # (topic, payload): a config or command message, or ("fences", (version, sha256, data, done)).
        self._inbox: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=64)
        self._restarting = False  # a change takes effect at the next start: serve nothing more

    @property
    def version(self) -> str:
        return config_version(self.config)

    def start_listening(self) -> None:
        """Subscribe to the config and command topics (paho's thread only queues; ``run`` works)."""
        self.link.subscribe("config", lambda payload: self._enqueue("config", payload))
        self.link.subscribe("command", lambda payload: self._enqueue("command", payload))

    def submit_fences(self, version: str, sha256: str, data: bytes, done: Callable[[], None]) -> None:
        """Apply a fetched fence set (bytes already checked against their manifest) in ``run``'s thread;
        ``done()`` once it was applied, refused or rolled back (not when the agent stops first)."""
        self._enqueue("fences", (version, sha256, data, done))

    def _enqueue(self, topic: str, payload: Any) -> None:
        try:
            self._inbox.put_nowait((topic, payload))
        except queue.Full:
            log.warning("remote management busy: dropped a %s message", topic)

    def run(self, stop: threading.Event) -> None:
        """Confirm a change left pending by the last run, then serve requests until ``stop``."""
        self.start_listening()
        if self.store.unanswered is not None:
            self._send_outcome(self.store.unanswered, stop)
        if self.store.pending:
            log.info("remote change %s is pending: waiting for the broker", self.store.state.get("request_id"))
            self._confirm_or_roll_back(self.store.state.get("request_id"), stop)
        while not (stop.is_set() or self._restarting):
            try:
                topic, payload = self._inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            request_id = sha256 = done = None
            try:
                if topic == "fences":
                    version, sha256, data, done = payload
                    request_id = f"geofences:{version}"
                    request = {"id": request_id, "geofences": _geojson(data), "geofences_version": version}
                else:
                    request = json.loads(payload)
                if not isinstance(request, dict):
                    raise RemoteError("the request must be a JSON object")
                request_id = request.get("id")
                if topic == "command":
                    self.command(request)
                else:
                    self.change(request, stop, sha256)
            except ValueError as exc:  # RemoteError, and JSON that does not parse
                reason = str(exc) if isinstance(exc, RemoteError) else f"not valid JSON: {exc}"
                log.warning("remote %s %s refused: %s", topic, request_id or "(no id)", reason)
                self.respond({"id": request_id, "ok": False, "error": reason})
            if done is not None and not (stop.is_set() or self._restarting):
                done()

    # -- settings and fences --------------------------------------------------------------------

    def change(self, request: dict[str, Any], stop: threading.Event, sha256: str | None = None) -> None:
        """Validate, save and apply one config request; confirm it or roll it back.

        ``sha256``: of the fence set's bytes as its manifest announced them (kept with the set)."""
        request_id = request.get("id")
        unknown = set(request) - {"id", "settings", "geofences", "geofences_version"}
        if unknown:
            raise RemoteError(f"unknown keys in the request: {sorted(unknown)}")
        if "settings" not in request and "geofences" not in request:
            raise RemoteError("nothing to change: give settings and/or geofences")
        settings = self.store.settings
        new_config = self.config
        if "settings" in request:
            settings = merge(settings, request["settings"]) if isinstance(request["settings"], dict) else request["settings"]
            new_config = validate_settings(self._file_raw(), settings)
        fences = self.store.fences
        fence_set = None
        if "geofences" in request:
            if self._parse_fences is None:
                raise RemoteError("this agent has no geofence processor")
            fences = {"geojson": request["geofences"], "version": request.get("geofences_version")}
            if sha256 is not None:
                fences["sha256"] = sha256
            fence_set = self._parse(fences)
        self.store.stage(request_id, settings, fences)
        log.info("remote change %s: applying (config %s)", request_id, config_version(new_config))
        if self._put_into_effect(new_config, fence_set, fences):
            self._confirm_or_roll_back(request_id, stop)

    def _parse(self, fences: dict[str, Any]) -> Any:
        try:
            return self._parse_fences(self.store.geojson(fences))
        except ValueError as exc:
            raise RemoteError(f"geofences: {exc}") from exc

    def _file_raw(self) -> dict[str, Any]:
        try:
            return _raw_file(self.config_path)
        except (OSError, yaml.YAMLError, ConfigError) as exc:
            raise RemoteError(f"cannot read the config file {self.config_path}: {exc}") from exc

    def _put_into_effect(self, config: Config, fence_set: Any, fences: dict[str, Any] | None) -> bool:
        """True when the change is in effect now; False when it waits for the restart apply() asked for."""
        if fence_set is not None:
            self._replace_fences(fence_set, (fences or {}).get("version"))
        if config is self.config:
            return True
        if self._apply(config) is not True:
            log.info("remote change %s takes effect at the restart", self.store.state.get("request_id"))
            self._restarting = True
            return False
        self.config = config
        return True

    def _wait_for_link(self, stop: threading.Event) -> bool:
        deadline = self.clock.monotonic() + self.config.remote.rollback_timeout_s
        while not stop.is_set() and self.clock.monotonic() < deadline:
            if self._link_up():
                return True
            stop.wait(0.1)
        # Stopping (applying may restart the agent): the next start confirms or rolls back.
        return not stop.is_set() and self._link_up()

    def _confirm_or_roll_back(self, request_id: str | None, stop: threading.Event) -> None:
        timeout = self.config.remote.rollback_timeout_s
        if self._wait_for_link(stop):
            self.store.confirm({"id": request_id, "ok": True, "config_version": self.version,
                                "geofences_version": (self.store.fences or {}).get("version")})
            log.info("remote change %s confirmed: broker reachable", request_id)
            self._send_outcome(self.store.unanswered, stop)
            return
        if stop.is_set():
            return  # still pending: the next start decides
        reason = f"the broker was not reachable within {timeout:g} s after applying: rolled back"
        log.warning("remote change %s: %s", request_id, reason)
        previous = self.store.state.get("previous") or {}
        old_fences = self.store.previous_fences
        self.store.roll_back(reason)
        old_config = validate_settings(self._file_raw(), previous.get("settings") or {})
        fence_set = None
        if self._replace_fences is not None and self._parse_fences is not None:
            fence_set = self._parse(old_fences) if old_fences else self._parse({"geojson": {"type": "FeatureCollection", "features": []}})
        if self._put_into_effect(old_config, fence_set, old_fences):
            self._send_outcome({**self.store.unanswered, "config_version": self.version}, stop)

    def _send_outcome(self, response: dict[str, Any], stop: threading.Event) -> None:
        """Answer a config change once the link is up; remembered in remote.json until sent."""
        if self._wait_for_link(stop) and self.respond(response):
            self.store.answered()

    # -- commands ---------------------------------------------------------------------------------

    def command(self, request: dict[str, Any]) -> None:
        """Run one allowlisted command and answer it."""
        request_id, name, args = request.get("id"), request.get("command"), request.get("args") or {}
        if name not in COMMANDS:
            raise RemoteError(f"command {name!r} is not allowed (allowed: {', '.join(COMMANDS)})")
        if not isinstance(args, dict):
            raise RemoteError("args must be an object")
        log.info("remote command %s (%s)", name, request_id)
        if name == "status":
            self.respond({"id": request_id, "ok": True, "result": self._status()})
        elif name == "flush":
            timeout = float(args.get("timeout_s", self.config.power.flush_timeout_s))
            self.respond({"id": request_id, "ok": True, "result": {"flushed": self._flush(timeout)}})
        elif name == "set_log_level":
            level = str(args.get("level", "")).upper()
            if level not in LOG_LEVELS:
                raise RemoteError(f"level must be one of {', '.join(LOG_LEVELS)}")
            logging.getLogger().setLevel(level)
            log.warning("log level set to %s remotely (until restart)", level)
            self.respond({"id": request_id, "ok": True, "result": {"level": level}})
        elif name in self._handlers:
            handler = self._handlers[name]
            if handler is None:
                raise RemoteError(f"{name} is not available on this agent")
            try:
                result = handler(args)
            except ValueError as exc:
                raise RemoteError(str(exc)) from exc
            self.respond({"id": request_id, "ok": True, "result": result})
        else:  # restart: answer first, the restart takes the link down
            self.respond({"id": request_id, "ok": True, "result": {"restarting": True}})
            self._restart()

    def respond(self, response: dict[str, Any]) -> bool:
        """Publish on ``response``; retried briefly while the link is down (then logged and dropped)."""
        payload = json.dumps(response, separators=(",", ":"), default=str).encode()
        for _ in range(int(10 / RESPONSE_RETRY_S)):
            if self.link.publish_message("response", payload, qos=1):
                return True
            threading.Event().wait(RESPONSE_RETRY_S)
        log.warning("could not send the response to %s: broker not reachable", response.get("id"))
        return False
