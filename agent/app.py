"""The composition root: the only module that knows every concrete class.

It builds the durable buffer, the MQTT link, the sources and the processors from a :class:`Config`,
starts one thread per source plus the pipeline and publisher threads, and shuts them down in the
order that loses nothing: sources first, then the pipeline drains into the buffer, the buffer
commits, and the link closes last.
"""

from __future__ import annotations

import importlib
import logging
import threading
from pathlib import Path
from typing import Callable

from agent import __version__
from agent.clock import Clock, SystemClock
from agent.config import Config
from agent.pipeline import Pipeline, Processor, Source

log = logging.getLogger(__name__)

# Source kinds by config name -> "module:Class"; imported only when configured, so a box without
# CAN never imports python-can.
SOURCE_FACTORIES: dict[str, str] = {
    "gps:serial": "agent.sources.gps_serial:GpsSerialSource",
    "gps:gpsd": "agent.sources.gpsd:GpsdSource",
}


class StartupError(Exception):
    """The agent cannot start with this configuration (e.g. the data directory is not writable)."""


def _load(path: str) -> Callable:
    module_name, _, attr = path.partition(":")
    return getattr(importlib.import_module(module_name), attr)


class Agent:
    """The running daemon: sources -> processors -> durable buffer -> MQTT link."""

    def __init__(self, config: Config, clock: Clock | None = None) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        self.data_dir = Path(config.device.data_dir)
        self.threads: list[threading.Thread] = []
        self._source_stop = threading.Event()
        self._pipeline_stop = threading.Event()
        self._link_stop = threading.Event()
        self.buffer = None
        self.link = None
        self.pipeline: Pipeline | None = None
        self.sources: list[Source] = []

    def build_sources(self) -> list[Source]:
        """The configured sources, constructed but not started (devices open in their run())."""
        sources: list[Source] = []
        if self.config.gps.enabled:
            factory = _load(SOURCE_FACTORIES[f"gps:{self.config.gps.source}"])
            sources.append(factory(self.config.gps, self.clock))
        return sources

    def build_processors(self) -> list[Processor]:
        """The processors, in the order records pass through them."""
        return []

    def start(self) -> None:
        """Open the buffer and start every thread."""
        from agent.buffer.store import DurableBuffer
        from agent.publish.mqtt_link import MqttLink

        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StartupError(f"cannot create the data directory {self.data_dir}: {exc.strerror}") from exc
        self.buffer = DurableBuffer(self.data_dir, self.config.buffer, self.clock)
        self.buffer.open()
        self.buffer.start()
        self.link = MqttLink(self.config.mqtt, self.config.device.id, self.buffer, self.clock)
        self.pipeline = Pipeline(self.build_processors(), self.buffer)
        self.sources = self.build_sources()
        log.info(
            "telematics-agent %s starting: device %s, data %s, broker %s:%d",
            __version__, self.config.device.id, self.data_dir, self.config.mqtt.host, self.config.mqtt.port,
        )
        self._spawn("link", self.link.run, self._link_stop)
        self._spawn("pipeline", self.pipeline.run, self._pipeline_stop)
        for source in self.sources:
            self._spawn(f"source-{source.name}", source.run, self.pipeline.emit, self._source_stop)

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
        self._source_stop.set()
        self._join(lambda t: t.name.startswith("source-"), timeout)
        self._pipeline_stop.set()
        self._join(lambda t: t.name == "pipeline", timeout)
        if self.buffer is not None:
            self.buffer.flush()
        self._link_stop.set()
        self._join(lambda t: t.name == "link", timeout)
        if self.buffer is not None:
            self.buffer.close()
        log.info("telematics-agent stopped")

    def _join(self, which: Callable[[threading.Thread], bool], timeout: float) -> None:
        for thread in self.threads:
            if which(thread):
                thread.join(timeout)
                if thread.is_alive():
                    log.warning("thread %s did not stop within %.0f s", thread.name, timeout)

    def run_until(self, stop: threading.Event) -> None:
        """Start, wait for ``stop``, then shut down cleanly."""
        self.start()
        try:
            stop.wait()
        finally:
            self.stop()
