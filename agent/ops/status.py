"""What ops see on the device: a StatusBoard the components report into, written to status.json.

Components either push (``board.update("gps", fix=True, satellites=9)``, ``board.count("counters",
"rejected")``) or are polled when the file is written (``board.provide("buffer", buffer_stats)``).
Every ``status.interval_s`` the board writes ``{data_dir}/status.json`` atomically, so
``telematics-agent status`` never reads half a file, and adds what the agent does not know by
itself: version, uptime, and the Pi firmware's power and throttling flags.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any, Callable

from agent import __version__
from agent.clock import Clock
from agent.state_file import StateFile

log = logging.getLogger(__name__)

STATUS_NAME = "status"  # {data_dir}/status.json
# The Raspberry Pi firmware's get_throttled word (what `vcgencmd get_throttled` prints), exposed by
# the raspberrypi-hwmon / firmware driver as hex text.
THROTTLED_PATH = "/sys/devices/platform/soc/soc:firmware/get_throttled"
# Bits of get_throttled (Raspberry Pi documentation, "vcgencmd get_throttled").
THROTTLE_BITS = {
    0: "under_voltage",
    1: "arm_frequency_capped",
    2: "throttled",
    3: "soft_temperature_limit",
    16: "under_voltage_occurred",
    17: "arm_frequency_capped_occurred",
    18: "throttling_occurred",
    19: "soft_temperature_limit_occurred",
}


def read_power_flags(path: str | Path = THROTTLED_PATH) -> dict[str, Any] | None:
    """The firmware's under-voltage / throttling flags, or None where the file does not exist (not a Pi)."""
    try:
        text = Path(path).read_text().strip()
        word = int(text, 16)
    except (OSError, ValueError):
        return None
    flags = {name: bool(word >> bit & 1) for bit, name in THROTTLE_BITS.items()}
    return {"get_throttled": f"0x{word:x}", **flags}


# Counters turned into rates for the status: (section, counter) -> rate key, in every per-bus
# object of the section, e.g. can.can0.frames -> can.can0.frames_per_s.
RATES = {("can", "frames"): "frames_per_s"}
# Rates are measured over at least this long (LEDs and the status command also take snapshots).
RATE_MIN_INTERVAL_S = 1.0


class StatusBoard:
    """Thread-safe collection of status sections, periodically written to ``{data_dir}/status.json``."""

    def __init__(
        self,
        data_dir: str | Path,
        clock: Clock,
        *,
        device_id: str,
        interval_s: float = 5.0,
        throttled_path: str | Path = THROTTLED_PATH,
    ) -> None:
        self._file = StateFile(data_dir, STATUS_NAME)
        self.path = self._file.path
        self.clock = clock
        self.interval_s = interval_s
        self.throttled_path = throttled_path
        self._lock = threading.Lock()
        self._sections: dict[str, dict[str, Any]] = {}
        self._providers: dict[str, Callable[[], dict[str, Any]]] = {}
        self._started_mono = clock.monotonic()
        self._started_utc = clock.wall()
        self._device_id = device_id
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._rate_base: dict[tuple[str, str, str], tuple[float, float]] = {}
        self._rates: dict[tuple[str, str, str], float] = {}

    def update(self, section: str, **values: Any) -> None:
        """Set ``values`` in ``section`` (created when new); values must be JSON-serialisable."""
        with self._lock:
            self._sections.setdefault(section, {}).update(values)

    def count(self, section: str, key: str, n: int = 1) -> None:
        """Add ``n`` to the counter ``section.key``."""
        with self._lock:
            target = self._sections.setdefault(section, {})
            target[key] = target.get(key, 0) + n

    def provide(self, section: str, provider: Callable[[], dict[str, Any]]) -> None:
        """Call ``provider()`` at every snapshot; its dict is merged into ``section``."""
        with self._lock:
            self._providers[section] = provider

    def snapshot(self, state: str = "running") -> dict[str, Any]:
        """The whole status as a JSON-ready dict; ``state`` is "running" or "stopped" (the last write)."""
        with self._lock:
            sections = {name: dict(values) for name, values in self._sections.items()}
            providers = list(self._providers.items())
        for name, provider in providers:
            try:
                sections.setdefault(name, {}).update(provider())
            except Exception as exc:  # a broken provider must not take the status file down
                sections.setdefault(name, {})["error"] = f"{type(exc).__name__}: {exc}"
        power = read_power_flags(self.throttled_path)
        if power is not None:
            sections.setdefault("power", {}).update(power)
        self._add_rates(sections)
        return {
            "state": state,
            "device_id": self._device_id,
            "version": __version__,
            "pid": os.getpid(),
            "updated_utc": self.clock.wall(),
            "started_utc": self._started_utc,
            "uptime_s": round(self.clock.monotonic() - self._started_mono, 3),
            "interval_s": self.interval_s,
            **sections,
        }

    def _add_rates(self, sections: dict[str, Any]) -> None:
        now = self.clock.monotonic()
        with self._lock:
            for (section, counter), rate_key in RATES.items():
                for name, values in (sections.get(section) or {}).items():
                    if not isinstance(values, dict) or not isinstance(values.get(counter), (int, float)):
                        continue
                    key = (section, name, counter)
                    base = self._rate_base.get(key)
                    if base is None or values[counter] < base[1]:  # first sight, or the counter restarted
                        self._rate_base[key] = (now, values[counter])
                    elif now - base[0] >= RATE_MIN_INTERVAL_S:
                        self._rates[key] = round((values[counter] - base[1]) / (now - base[0]), 1)
                        self._rate_base[key] = (now, values[counter])
                    if key in self._rates and rate_key not in values:
                        values[rate_key] = self._rates[key]

    def write(self, state: str = "running") -> None:
        """Write status.json now (temp file and rename: readers see the old or the new file)."""
        self._file.save(self.snapshot(state))

    def run(self, stop: threading.Event) -> None:
        """Write every ``interval_s`` until ``stop`` is set, and once more at the end."""
        failing = False
        while True:
            try:
                self.write()
                if failing:
                    log.info("status file %s writable again", self.path)
                failing = False
            except OSError as exc:
                if not failing:
                    log.warning("cannot write the status file %s: %s", self.path, exc)
                failing = True
            if stop.wait(self.interval_s):
                break
        try:
            self.write("stopped")
        except OSError:
            pass  # already reported above

    def start(self) -> None:
        """Run in a thread of its own; :meth:`close` stops it."""
        self._thread = threading.Thread(target=self.run, args=(self._stop,), name="status", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
