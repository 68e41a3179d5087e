"""An update from command to outcome: the agent's side and the root-only apply step.

The agent (user ``telematics``, read-only /opt) serves the ``update`` command: it checks the
request, downloads the archive into ``{data_dir}/updates/``, verifies it (size, sha256, signature,
every file, version floor) and only then starts ``telematics-agent update apply`` outside its
sandbox: ``systemctl start telematics-update@{version}.service`` (``update.apply_unit``; a polkit
rule lets the agent's user start that unit and nothing else). A refusal is an ``update_refused``
event at once.

The apply step (root) verifies the archive again, installs it side by side, switches ``current``,
restarts the service and watches the new version's health; a version that is not healthy in time,
or crash-loops, is switched back and restarted. It records every stage in
``{data_dir}/update.json``; whichever version runs afterwards turns the outcome into an
``update_applied`` / ``update_rolled_back`` / ``update_refused`` event (attrs ``version``,
``previous``, ``reason``, ``log_tail``), and a version on trial first appends an ``update_trial``
status, so it has a record to commit and have acknowledged.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from agent import __version__
from agent.clock import Clock
from agent.config import Config
from agent.ota import download, health
from agent.ota.install import InstallFailed, Layout, install_version, write_dropin
from agent.ota.release import ReleaseError, load_public_key
from agent.ota.verify import UpdateRefused, check_download, check_version, open_release
from agent.state_file import StateFile
from agent.record import Event, Record, Status

log = logging.getLogger(__name__)

STATE_NAME = "update"  # {data_dir}/update.json, written by the apply step
REPORTED_NAME = "update-reported"  # {data_dir}/update-reported.json, the agent's: outcomes already sent
# Release versions (PEP 440 public versions without epochs or local labels): also systemd instance names.
VERSION_RE = re.compile(r"^[0-9][0-9A-Za-z._-]{0,63}$")
LOG_TAIL_LINES = 20
POLL_S = 2.0


def floor_version(config: Config) -> str:
    """The lowest version accepted: ``update.min_version``, else the running one."""
    return config.update.min_version or __version__


class Updater:
    """The agent's side: the ``update`` command, downloads, verification, and reporting outcomes.

    ``emit(record)`` hands an event to the pipeline; ``link`` publishes and subscribes (MqttLink).
    """

    def __init__(self, config: Config, config_path: str | Path | None, link: Any, emit: Callable[[Record], None],
                 clock: Clock) -> None:
        self.config = config
        self.config_path = config_path
        self.link = link
        self.emit = emit
        self.clock = clock
        self.data_dir = Path(config.device.data_dir)
        self.updates_dir = self.data_dir / "updates"
        self._state = StateFile(self.data_dir, STATE_NAME)
        self._reported = StateFile(self.data_dir, REPORTED_NAME)
        self._reporting = threading.Lock()  # the watcher thread and a start may report at once
        self._chunks: queue.Queue[bytes] = queue.Queue(maxsize=256)
        self._busy = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- start-up and outcomes ----------------------------------------------------------------

    def start(self) -> None:
        """Report a trial or a finished update, then keep looking for outcomes of the apply step."""
        state = self._state.load()
        if state.get("state") == "trial" and state.get("version") == __version__:
            log.info("running version %s on trial (previous %s)", __version__, state.get("previous"))
            self._emit(Status, "update_trial", version=__version__, previous=state.get("previous"))
        self.report_outcome()
        if self.link is not None:
            self.link.subscribe("update/chunk", self._on_chunk)
        self._spawn("update-outcomes", self._watch_outcomes)

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5)

    def _spawn(self, name: str, target: Callable, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _watch_outcomes(self) -> None:
        while not self._stop.wait(POLL_S):
            self.report_outcome()

    def report_outcome(self) -> bool:
        """Emit the apply step's outcome once (its id remembered in update-reported.json)."""
        with self._reporting:
            state = self._state.load()
            outcome_id = state.get("id")
            if state.get("state") != "done" or not outcome_id or self._reported.load().get("id") == outcome_id:
                return False
            outcome = state.get("outcome", "refused")
            attrs = {k: state.get(k) for k in ("version", "previous", "reason", "log_tail")}
            (log.info if outcome == "applied" else log.warning)("update to %s: %s (%s)", attrs["version"], outcome,
                                                                attrs["reason"])
            self._emit(Event, f"update_{outcome}", **attrs)
            self._reported.save({"id": outcome_id})
            return True

    def _emit(self, kind: type, type_: str, **attrs: Any) -> None:
        clean = {k: v for k, v in attrs.items() if v is not None}
        self.emit(Record(utc=self.clock.wall(), mono=self.clock.monotonic(), data=kind(type=type_, attrs=clean)))

    # -- the command --------------------------------------------------------------------------

    def handle(self, args: dict[str, Any]) -> dict[str, Any]:
        """Check an ``update`` request and start it in the background; ValueError says why not."""
        request = parse_request(args)
        try:
            check_version(request["version"], floor_version(self.config))
        except UpdateRefused as exc:
            self._refused(request["version"], exc)
            raise ValueError(f"refused ({exc.reason}): {exc}") from None
        if not self._busy.acquire(blocking=False):
            raise ValueError("an update is already in progress")
        self._spawn(f"update-{request['version']}", self._run, request)
        return {"accepted": True, "version": request["version"]}

    def _run(self, request: dict[str, Any]) -> None:
        try:
            archive = self.fetch(request)
            self.verify(archive, request)
            self.launch_apply(request["version"], archive)
        except UpdateRefused as exc:
            self._refused(request["version"], exc)
        except ReleaseError as exc:  # the device's release key is missing or unusable
            self._refused(request["version"], UpdateRefused("key", str(exc)))
        except (download.DownloadFailed, OSError) as exc:
            self._refused(request["version"], UpdateRefused("download", str(exc)))
        finally:
            self._busy.release()

    def _refused(self, version: str, exc: UpdateRefused) -> None:
        log.warning("update to %s refused (%s): %s", version, exc.reason, exc)
        self._emit(Event, "update_refused", version=version, previous=__version__, reason=f"{exc.reason}: {exc}")

    def fetch(self, request: dict[str, Any]) -> Path:
        """Download the archive into {data_dir}/updates/ (resuming what an earlier attempt left)."""
        self.updates_dir.mkdir(parents=True, exist_ok=True)
        dest = archive_path(self.config, request["version"])
        rate = download.ByteRate(self.config.update.max_bytes_per_s, self._stop)
        log.info("downloading version %s (%d bytes) over %s", request["version"], request["size"],
                 "HTTPS" if "url" in request else "MQTT")
        if "url" in request:
            return download.download_https(request["url"], dest, request["size"], ca_file=self.config.update.ca_file,
                                           rate=rate, stop=self._stop)
        while not self._chunks.empty():  # leftovers of an earlier transfer
            self._chunks.get_nowait()
        return download.download_mqtt(
            dest, request["version"], request["size"], request["chunk_size"],
            request=lambda payload: self.link.publish_message("update/request", payload, qos=1),
            inbox=self._chunks, rate=rate, stop=self._stop, idle_s=self.config.update.chunk_idle_s,
        )

    def _on_chunk(self, payload: bytes) -> None:
        try:
            self._chunks.put_nowait(payload)
        except queue.Full:
            pass  # asked for again when missing

    def verify(self, archive: Path, request: dict[str, Any]) -> None:
        """Everything verify.py checks, plus: the archive's version is the one requested."""
        try:
            check_download(archive, request["size"], request["sha256"])
            release = open_release(archive, load_public_key(self.config.update.public_key), floor_version(self.config))
            if release.version != request["version"]:
                raise UpdateRefused("version", f"the archive holds {release.version}, the command said {request['version']}")
        except (UpdateRefused, ReleaseError):
            archive.unlink(missing_ok=True)  # a bad download is not kept, nor resumed
            raise
        log.info("version %s verified: signature, %d files, size and sha256", release.version,
                 len(release.manifest["files"]))

    def launch_apply(self, version: str, archive: Path) -> None:
        """Start the root-only apply step outside this process: it outlives the agent's restart."""
        unit = self.config.update.apply_unit
        if unit:
            name = f"{unit}@{version}.service"
            log.info("starting the install step %s", name)
            proc = subprocess.run(["systemctl", "start", "--no-block", name], capture_output=True, text=True)
            if proc.returncode != 0:
                raise UpdateRefused("install", f"cannot start {name}: {proc.stderr.strip() or proc.returncode}")
            return
        # No systemd: a child in its own session (it survives the agent's restart by the apply step).
        config = ["--config", str(self.config_path)] if self.config_path else []
        argv = [str(Path(sys.prefix) / "bin" / "telematics-agent"), "update", "apply", *config, str(archive)]
        log.info("starting the install step: %s", " ".join(argv))
        subprocess.Popen(argv, start_new_session=True, stdin=subprocess.DEVNULL)


def archive_path(config: Config, version: str) -> Path:
    """Where the download of ``version`` goes, and where the apply step finds it."""
    return Path(config.device.data_dir) / "updates" / f"telematics-agent-{version}.tar"


def parse_request(args: dict[str, Any]) -> dict[str, Any]:
    """The update command's args, checked: version, size, sha256 and url, or mqtt.chunk_size."""
    version, size, sha256 = args.get("version"), args.get("size"), args.get("sha256")
    if not isinstance(version, str) or not VERSION_RE.match(version):
        raise ValueError("version: expected a version string like 1.4.0")
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ValueError("size: expected the archive's size in bytes")
    if not isinstance(sha256, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise ValueError("sha256: expected 64 hex digits")
    request: dict[str, Any] = {"version": version, "size": size, "sha256": sha256.lower()}
    url, mqtt = args.get("url"), args.get("mqtt")
    if (url is None) == (mqtt is None):
        raise ValueError("give exactly one of url (https://...) and mqtt ({\"chunk_size\": N})")
    if url is not None:
        if not isinstance(url, str) or not url.startswith("https://"):
            raise ValueError("url: expected an https:// URL")
        request["url"] = url
    else:
        chunk_size = mqtt.get("chunk_size") if isinstance(mqtt, dict) else None
        # 256 MB is MQTT's largest message (MQTT 5.0 section 1.5.5); far smaller chunks are sensible.
        if not isinstance(chunk_size, int) or not 1024 <= chunk_size <= 16 * 1024 * 1024:
            raise ValueError("mqtt.chunk_size: expected bytes per chunk, 1024 to 16777216")
        request["chunk_size"] = chunk_size
    return request


# -- the apply step (root) --------------------------------------------------------------------


def apply_update(archive: Path, config: Config, config_path: str, layout: Layout,
                 service: health.ServiceManager) -> dict[str, Any]:
    """Verify, install, switch, restart, watch; roll back when unhealthy. Returns the final state.

    The archive is deleted at the end, whatever the outcome (a refused or failed release is not retried).
    """
    try:
        return _apply(archive, config, config_path, layout, service)
    finally:
        archive.unlink(missing_ok=True)


def _apply(archive: Path, config: Config, config_path: str, layout: Layout, service: health.ServiceManager) -> dict[str, Any]:
    upd = config.update
    state_file = StateFile(config.device.data_dir, STATE_NAME)
    started = time.time()
    running = _version_of(layout)
    base = {"id": f"{archive.name}@{started:.3f}", "started_utc": started, "previous": running}

    def save(**fields: Any) -> dict[str, Any]:
        state = {**base, **fields}
        state_file.save(state)
        return state

    try:
        release = open_release(archive, load_public_key(upd.public_key), upd.min_version or running)
    except (UpdateRefused, ReleaseError) as exc:
        reason = f"{getattr(exc, 'reason', 'key')}: {exc}"
        log.error("update refused: %s", reason)
        return save(state="done", outcome="refused", version=None, reason=reason)
    version = release.version
    save(state="installing", version=version)
    try:
        link = install_version(release, layout, upd.python)
    except (InstallFailed, OSError) as exc:
        log.error("update to %s not installed: %s", version, exc)
        return save(state="done", outcome="refused", version=version, reason=f"install: {exc}")
    previous_link = layout.current_link()
    if write_dropin(layout, upd.service, config_path):
        service.reload()
    switched = time.time()
    # pid: a trial whose watcher is gone (power cut, crash) is rolled back at the next start (recover()).
    save(state="trial", version=version, previous_link=previous_link, switched_utc=switched, pid=os.getpid())
    layout.switch(link)
    service.restart()
    verdict = health.await_health(service, Path(config.device.data_dir) / "status.json", version,
                                  upd.health_timeout_s, upd.max_restarts)
    if verdict.healthy:
        removed = layout.prune({link, previous_link}, upd.keep_versions)
        log.info("update to %s applied%s", version, f"; removed {', '.join(removed)}" if removed else "")
        return save(state="done", outcome="applied", version=version, reason=verdict.reason)
    tail = service.log_tail(switched, LOG_TAIL_LINES)
    log.error("update to %s failed (%s): rolling back to %s", version, verdict.reason, base["previous"])
    # The outcome is saved before the restart so the version that comes back reports it at start.
    state = save(state="done", outcome="rolled_back", version=version, reason=verdict.reason,
                 log_tail="\n".join(tail))
    layout.switch(previous_link)
    service.restart()
    return state


def recover(config: Config, layout: Layout) -> dict[str, Any] | None:
    """Before the agent starts (its unit's ExecStartPre, as root): a trial nobody is watching any
    more (the box lost power or the apply step died during the health check) is rolled back.
    Returns the new state, or None when there was nothing to do."""
    state_file = StateFile(config.device.data_dir, STATE_NAME)
    state = state_file.load()
    if state.get("state") != "trial" or _alive(state.get("pid")):
        return None
    previous_link = state.get("previous_link") or "."
    log.error("the trial of version %s was interrupted: switching back to %s", state.get("version"), previous_link)
    layout.switch(previous_link)
    state = {**state, "state": "done", "outcome": "rolled_back",
             "reason": "interrupted: the box or the install step stopped during the health check"}
    state_file.save(state)
    return state


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, another user's
    return True


def _version_of(layout: Layout) -> str:
    """The version ``current`` runs: the directory name, or (the factory install) what it reports."""
    link = layout.current_link()
    # The factory install: this very process runs from it (the apply step is the running version's).
    return link.split("/", 1)[1] if link.startswith("versions/") else __version__
