"""The composition root: the only module that knows every concrete class.

It builds the durable buffer, the MQTT link, the sources, the processors and the operations side
(status file, systemd notify and watchdog, LEDs, power, remote management) from a :class:`Config`,
starts one thread per source plus the pipeline and publisher threads, and shuts them down in the
order that loses nothing: sources first, then the pipeline drains into the buffer, the buffer
commits, and the link closes last.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable

from agent import __version__
from agent.clock import Clock, SystemClock
from agent.config import Config
from agent.pipeline import Pipeline, Processor, Source
from agent.record import Record

log = logging.getLogger(__name__)

# Source kinds by config name -> "module:Class"; imported only when configured, so a box without
# CAN never imports python-can.
SOURCE_FACTORIES: dict[str, str] = {
    "gps:serial": "agent.sources.gps_serial:GpsSerialSource",
    "gps:gpsd": "agent.sources.gpsd:GpsdSource",
}

# The pipeline loop turns at least every 0.1 s; a loop stuck this long is hung.
PIPELINE_HUNG_S = 10.0


class StartupError(Exception):
    """The agent cannot start with this configuration (e.g. the data directory is not writable)."""


def _load(path: str) -> Callable:
    module_name, _, attr = path.partition(":")
    return getattr(importlib.import_module(module_name), attr)


class Agent:
    """The running daemon: sources -> processors -> durable buffer -> MQTT link.

    ``config_path`` is the file the config came from (remote management writes its changes beside
    it); ``restart`` is what the ``restart`` remote command calls (the run command ends the process
    so systemd starts it again).
    """

    def __init__(
        self,
        config: Config,
        clock: Clock | None = None,
        *,
        config_path: str | Path | None = None,
        restart: Callable[[], None] | None = None,
        pin_factory=None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.clock = clock or SystemClock()
        self.data_dir = Path(config.device.data_dir)
        self.pin_factory = pin_factory
        self._restart = restart or (lambda: None)
        self.threads: list[threading.Thread] = []
        self._source_stop = threading.Event()
        self._pipeline_stop = threading.Event()
        self._link_stop = threading.Event()
        self._ops_stop = threading.Event()
        self.buffer = None
        self.link = None
        self.board = None
        self.edge = None
        self.fix_filter = None
        self.remote = None
        self.fence_sync = None
        self.updater = None
        self.renewer = None
        self.pipeline: Pipeline | None = None
        self.sources: list[Source] = []
        self._pinger = None
        self._notifier = None
        self.recorder = None
        self.last_time = None

    # -- building -----------------------------------------------------------------------------

    def build_sources(self) -> list[Source]:
        """The configured sources, constructed but not started (devices open in their run())."""
        sources: list[Source] = []
        if self.config.gps.enabled:
            factory = _load(SOURCE_FACTORIES[f"gps:{self.config.gps.source}"])
            sources.append(factory(self.config.gps, self.clock))
        if self.config.can is not None:
            from agent.sources.can_bus import CanSource

            sources.extend(CanSource(self.config.can, self.clock, bus) for bus in self.config.can.buses)
        return sources

    def build_processors(self, fence_set=None, fence_version: str | None = None) -> list[Processor]:
        """The processors, in the order records pass through them: the fix filter first (a bad fix
        must not reach the geofences), then the edge chain, whose last step thins positions."""
        from agent.processors.edge import EdgeChain
        from agent.processors.fix_filter import FixFilter
        from agent.sources.gps_serial import floor_utc

        floor = floor_utc(self.config.gps.rollover_floor)

        def trusted_wall() -> float | None:
            now = self.clock.wall()
            return now if now >= floor else None  # a Pi without RTC boots in 1970 or at fake-hwclock's time

        self.fix_filter = FixFilter(self.config.gps.filter, trusted_wall)
        self.edge = EdgeChain(self.config.edge, self.data_dir, fence_set, fence_version)
        return [self.fix_filter, *self.edge.processors]

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Open the buffer and start every thread."""
        from agent.buffer.store import BufferError, DurableBuffer
        from agent.certs.renew import effective_mqtt  # a renewed client certificate, when there is one
        from agent.ops.notify import Heartbeat, Notifier, WatchdogPinger, watchdog_interval
        from agent.ops.status import StatusBoard
        from agent.publish.mqtt_link import MqttLink
        from agent.sources.gps_serial import floor_utc

        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StartupError(f"cannot create the data directory {self.data_dir}: {exc.strerror}") from exc
        clock_behind = self._restore_clock()
        self.board = StatusBoard(self.data_dir, self.clock, device_id=self.config.device.id,
                                 interval_s=self.config.status.interval_s)
        self.buffer = DurableBuffer(self.data_dir, self.config.buffer, self.clock)
        try:
            self.buffer.open()
        except BufferError as exc:  # locked by another agent, or an I/O error: say so in one line
            raise StartupError(str(exc)) from exc
        self.buffer.start()
        config_version = self._config_version()
        floor = floor_utc(self.config.gps.rollover_floor)
        self.link = MqttLink(effective_mqtt(self.config), self.config.device.id, self.buffer, self.clock,
                             config_hash=config_version, clock_plausible=lambda: self.clock.wall() >= floor)
        heartbeat = Heartbeat(PIPELINE_HUNG_S)
        try:
            processors = self.build_processors(*self._remote_fences())
        except ValueError as exc:  # GeofenceError and friends: a clear message, not a traceback
            raise StartupError(str(exc)) from exc
        self.pipeline = Pipeline(processors, self.buffer, on_turn=heartbeat.beat)
        self.sources = self.build_sources()
        self._start_recorder()
        self._provide_status(config_version)
        log.info(
            "telematics-agent %s starting: device %s, data %s, broker %s:%d",
            __version__, self.config.device.id, self.data_dir, self.config.mqtt.host, self.config.mqtt.port,
        )
        self._spawn("link", self.link.run, self._link_stop)
        self._spawn("pipeline", self.pipeline.run, self._pipeline_stop)
        if clock_behind is not None:
            self.pipeline.emit(clock_behind)
        self._start_clock_keeper()
        for source in self.sources:
            self._spawn(f"source-{source.name}", source.run, self.pipeline.emit, self._source_stop)
        self._start_device_io()
        self._start_updater()
        self._start_renewer()
        self._start_remote()
        self.board.start()
        self._notifier = Notifier()
        self._notifier.ready(f"running: device {self.config.device.id}")
        interval = watchdog_interval()
        if interval:  # after READY: systemd counts watchdog pings only from a started service
            self._pinger = WatchdogPinger(self._notifier, interval, heartbeat.healthy)
            self._pinger.start()

    def _restore_clock(self) -> Record | None:
        """Before anything reads the clock: set a clock behind the last known time forward
        (agent/ops/last_time.py); the status record saying so, or None."""
        from agent.ops.last_time import LastKnownTime

        self.last_time = LastKnownTime(self.data_dir, self.clock)
        return self.last_time.restore(self.config.gps.set_clock)

    def _start_clock_keeper(self) -> None:
        """Remember, hourly and at stop, a time GPS confirmed (only a GPS source can confirm it)."""
        gps = next((s for s in self.sources if s.name == "gps"), None)
        if gps is not None:
            self._spawn("clock-keeper", self.last_time.run, lambda: gps.stats.get("clock_ok") is True, self._ops_stop)

    def _start_recorder(self) -> None:
        """Raw NMEA and CAN to rotating files for a technician (``record:``, off by default)."""
        if not self.config.record.enabled:
            return
        from agent.ops.recorder import Recorder

        self.recorder = Recorder(self.config.record, self.clock.wall)
        try:
            self.recorder.open()
        except OSError as exc:
            raise StartupError(f"cannot create the recording directory {self.config.record.dir}: {exc.strerror}") from exc
        for source in self.sources:
            if hasattr(source, "on_raw"):
                source.on_raw = self.recorder.nmea
            if hasattr(source, "on_frame"):
                source.on_frame = self.recorder.can

    def _config_version(self) -> str:
        from agent.ops.remote import config_version

        return config_version(self.config)

    def _remote_fences(self) -> tuple[Any, str | None]:
        """A fence set received over MQTT earlier (and its version) overrides the configured file."""
        from agent.ops.remote import RemoteError, RemoteStore
        from agent.processors.geofence import GeofenceSet

        store = RemoteStore(self.data_dir)
        fences = store.fences
        if fences is None:
            return None, None
        try:
            data = store.geojson(fences)
        except RemoteError as exc:
            log.error("%s; using the configured fences until a set arrives again", exc)
            return None, None
        return GeofenceSet.from_geojson(data), fences.get("version")

    def _provide_status(self, config_version: str) -> None:
        board = self.board
        board.update("config", version=config_version, path=str(self.config_path) if self.config_path else None)
        board.provide("buffer", self.buffer.stats)
        board.provide("broker", self.link.stats)
        board.provide("counters", self._counters)
        board.provide("geofences", lambda: {"version": self.edge.geofences.version,
                                            "count": len(self.edge.geofences.set)})
        for source in self.sources:
            if source.name == "gps":
                board.provide("gps", lambda s=source: _gps_status(s))
                board.provide("clock", lambda s=source: {"offset_s": s.stats.get("clock_offset_s"),
                                                         "ok": s.stats.get("clock_ok"), "source": "gps"})
            elif source.name.startswith("can:"):
                board.provide("can", self._can_status)

    def _counters(self) -> dict[str, Any]:
        counters: dict[str, Any] = {"pipeline_dropped": self.pipeline.dropped}
        counters.update({f"fix_rejected_{k}": v for k, v in self.fix_filter.counters.items() if k != "accepted" and v})
        return counters

    def _can_status(self) -> dict[str, Any]:
        return {s.name.partition(":")[2]: s.stats() for s in self.sources if s.name.startswith("can:")}

    def _start_device_io(self) -> None:
        """Ignition, power hold and shutdown, LEDs: only what the config says is wired."""
        gpio = self.config.gpio
        power = None
        if gpio.ignition_pin is not None:
            from agent.ops.power import PowerManager
            from agent.sources.ignition import IgnitionSource

            ignition = IgnitionSource(gpio, self.clock, pin_factory=self.pin_factory)
            power = PowerManager(self.config.power, self.clock, self.flush, pin_factory=self.pin_factory)
            ignition.add_listener(power.on_ignition)
            ignition.add_listener(lambda on: self.board.update("ignition", on=on, since_utc=self.clock.wall()))
            self.board.provide("power_state", lambda: {"state": power.state})
            self._spawn("source-ignition", ignition.run, self.pipeline.emit, self._source_stop)
            self._spawn("power", power.run, self.pipeline.emit, self._ops_stop)
        if any(pin is not None for pin in (gpio.led_gps_pin, gpio.led_link_pin, gpio.led_backlog_pin)):
            from agent.ops.leds import StatusLeds

            leds = StatusLeds(gpio, self.board, pin_factory=self.pin_factory)
            self._spawn("leds", leds.run, self._ops_stop)

    def _start_updater(self) -> None:
        """Over-the-air updates (agent/ota): reports a trial or an outcome first, then serves ``update``."""
        if not self.config.update.enabled:
            return
        from agent.ota.update import Updater

        self.updater = Updater(self.config, self.config_path, self.link, self.pipeline.emit, self.clock)
        self.updater.start()

    def _start_renewer(self) -> None:
        """Client certificate renewal (agent/certs), when the link uses a client certificate."""
        tls = self.config.mqtt.tls
        if not self.config.certificates.enabled or tls is None or tls.cert_file is None:
            return
        from agent.certs.renew import CertRenewer

        self.renewer = CertRenewer(self.config, self.link, self.pipeline.emit, self.clock)
        self.renewer.start()

    def _start_remote(self) -> None:
        if not self.config.remote.enabled or self.config_path is None:
            return
        from agent.ops.remote import RemoteManager
        from agent.processors.geofence import GeofenceSet

        self.remote = RemoteManager(
            self.config_path, self.config, self.link, self.clock,
            apply=self._apply_config,
            link_up=lambda: bool(self.link.stats().get("connected")),
            status=lambda: self.board.snapshot(),
            flush=self.flush,
            restart=self._restart,
            parse_fences=GeofenceSet.from_geojson,
            replace_fences=self._replace_fences,
            update=self.updater.handle if self.updater is not None else None,
            renew_certificate=self.renewer.handle if self.renewer is not None else None,
        )
        self._spawn("remote", self.remote.run, self._ops_stop)
        # Fence sets announced by a retained manifest, fetched only when it changed (docs/geofences.md).
        from agent.ops.fences_sync import FenceSync

        self.fence_sync = FenceSync(self.link, self.data_dir, self.clock, active=lambda: self.remote.store.fences,
                                    submit=self.remote.submit_fences)
        self._spawn("fences-sync", self.fence_sync.run, self._ops_stop)

    def _apply_config(self, config: Config) -> None:
        """A validated remote change takes effect by a restart of the agent with the merged config
        (every stage is rebuilt from it; the buffer on disk carries over)."""
        log.info("remote config %s accepted: restarting to apply it", self._config_version())
        self._restart()

    def _replace_fences(self, fence_set, version: str | None) -> None:
        self.edge.geofences.replace(fence_set, version)

    def flush(self, timeout_s: float) -> bool:
        """Commit what is pending and wait until the collector confirmed everything; True if it did."""
        self.buffer.flush()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.buffer.stats().get("depth", 0) == 0:
                return True
            if self._ops_stop.wait(0.1):  # the agent is stopping: its own stop order flushes
                return False
        return False

    def _spawn(self, name: str, target: Callable, *args) -> None:
        thread = threading.Thread(target=self._guard, args=(name, target, *args), name=name, daemon=True)
        self.threads.append(thread)
        thread.start()

    @staticmethod
    def _guard(name: str, target: Callable, *args) -> None:
        try:
            target(*args)
        except Exception:  # a bug in one stage must be loud, not silent
            log.exception("thread %s died", name)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop in the order that loses nothing: sources, pipeline, buffer commit, link."""
        if self._notifier is not None:
            self._notifier.stopping()
        self._ops_stop.set()
        for worker in (self.updater, self.renewer):  # they emit into the pipeline: stop before it
            if worker is not None:
                worker.close()
        self._source_stop.set()
        self._join(lambda t: t.name.startswith("source-"), timeout)
        if self.recorder is not None:
            self.recorder.close()
        self._pipeline_stop.set()
        self._join(lambda t: t.name == "pipeline", timeout)
        if self.buffer is not None:
            if self.edge is not None:
                # The position the adaptive reporter held back is the truck's last known place.
                self.buffer.append(self.edge.reporter.flush())
            self.buffer.flush()
        self._link_stop.set()
        self._join(lambda t: t.name == "link", timeout)
        self._join(lambda t: True, timeout)
        if self._pinger is not None:
            self._pinger.close()
        if self.board is not None:
            self.board.close()
        if self.buffer is not None:
            self.buffer.close()
        log.info("telematics-agent stopped")

    def _join(self, which: Callable[[threading.Thread], bool], timeout: float) -> None:
        for thread in self.threads:
            if which(thread) and thread.is_alive():
                thread.join(timeout)
                if thread.is_alive():
                    log.warning("thread %s did not stop within %.0f s", thread.name, timeout)

    def run_until(self, stop: threading.Event) -> None:
        """Start, wait for ``stop``, then shut down cleanly."""
        try:
            self.start()
            # A timed wait: a signal handled while the main thread sleeps on a lock without timeout
            # may never wake it (CPython runs handlers in the main thread between bytecodes).
            while not stop.wait(1.0):
                pass
        finally:
            self.stop()


def _gps_status(source) -> dict[str, Any]:
    stats = dict(source.stats)
    stats.pop("decoder", None)
    stats["fix"] = stats.get("state") not in ("lost", "silent", "unknown", None)
    return stats
