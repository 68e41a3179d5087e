"""gpsd as the GPS source (``gps.source: gpsd``), for boxes where gpsd already owns the receiver.

Connects to gpsd's JSON service (``gps.gpsd_host``:``gps.gpsd_port``, TCP 2947), sends
``?WATCH={"enable":true,"json":true}`` and turns its reports into the same records as the serial
source: one ``Fix`` per epoch and the ``gps_lost`` / ``gps_regained`` / ``gps_silent`` events.

gpsd sends a TPV report after every sentence that changed the fix, so one epoch gives several TPVs
with the same ``time``, each more complete than the one before; the last one of an epoch is kept,
merged with the latest SKY report (DOPs and satellite counts). An epoch ends when a TPV with another
time arrives or when gpsd has been quiet for ``gps.epoch_timeout_s``. When gpsd is not running or
goes away the source logs once, counts it, and reconnects every ``gps.reopen_interval_s``.
"""

from __future__ import annotations

import logging
import socket
import threading

import msgspec

from agent.clock import Clock
from agent.config import GpsConfig
from agent.pipeline import Emit
from agent.record import Fix, parse_iso_utc
from agent.sources.gps_health import GpsOutput

log = logging.getLogger(__name__)

WATCH = b'?WATCH={"enable":true,"json":true};\n'
# gpsd's TPV "status" (gps.h STATUS_*) -> the GGA quality digit the Fix carries.
GPSD_STATUS_QUALITY = {1: 1, 2: 2, 3: 4, 4: 5, 5: 6, 6: 6, 7: 7, 8: 8}
MAX_LINE = 64 * 1024  # a SKY report with 100+ satellites is a few kB; anything far longer is not gpsd


def fix_from_tpv(tpv: dict, sky: dict | None) -> tuple[float, Fix] | None:
    """``(utc, Fix)`` from one gpsd TPV report (and the latest SKY); None without a time and position."""
    if "time" not in tpv or "lat" not in tpv or "lon" not in tpv:
        return None
    try:
        utc = parse_iso_utc(tpv["time"])
        lat, lon = float(tpv["lat"]), float(tpv["lon"])
    except (TypeError, ValueError):
        return None
    sky = sky or {}
    mode = tpv.get("mode")
    status = tpv.get("status")
    sats_used = sky.get("uSat")
    if sats_used is None and isinstance(sky.get("satellites"), list):
        sats_used = sum(1 for sat in sky["satellites"] if isinstance(sat, dict) and sat.get("used"))
    return utc, Fix(
        lat=lat, lon=lon,
        alt_m=_num(tpv.get("altMSL", tpv.get("alt"))),
        speed_mps=_num(tpv.get("speed")),
        course_deg=_num(tpv.get("track")),
        quality=0 if mode in (0, 1) else GPSD_STATUS_QUALITY.get(status, 1 if status is None else None),
        hdop=_num(sky.get("hdop")),
        sats_used=sats_used if isinstance(sats_used, int) else None,
        mode=mode if mode in (1, 2, 3) else None,
        geoid_sep_m=_num(tpv.get("geoidSep")),
        pdop=_num(sky.get("pdop")),
        vdop=_num(sky.get("vdop")),
        sats_in_view=sky.get("nSat") if isinstance(sky.get("nSat"), int) else None,
    )


def _num(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class GpsdSource:
    """Fixes from gpsd's JSON reports. ``stats`` is read by the status output."""

    name = "gps"

    def __init__(self, config: GpsConfig, clock: Clock) -> None:
        self.config = config
        self.clock = clock
        self.server = f"{config.gpsd_host}:{config.gpsd_port}"
        self.stats: dict[str, object] = {
            "server": self.server, "connected": False, "reports": 0, "bad_reports": 0, "reconnect_count": 0,
            "connect_failures": 0,
        }
        self.output = GpsOutput(config, clock, self.stats, f"gpsd {self.server}")
        self._decoder = msgspec.json.Decoder()
        self._pending: tuple[str, dict] | None = None  # (time, latest TPV) of the epoch being assembled
        self._no_fix = False  # TPVs without a fix arrived since the last quiet spell
        self._sky: dict | None = None

    def run(self, emit: Emit, stop: threading.Event) -> None:
        """Read gpsd until ``stop`` is set; reconnect whenever it fails."""
        failing = False
        connected_before = False
        while not stop.is_set():
            try:
                sock = socket.create_connection(
                    (self.config.gpsd_host, self.config.gpsd_port), timeout=self.config.reopen_interval_s
                )
            except OSError as exc:
                self.stats["connect_failures"] = int(self.stats["connect_failures"]) + 1
                if not failing:
                    log.warning("gps: cannot reach gpsd at %s: %s; retrying every %.1f s", self.server,
                                exc.strerror or exc, self.config.reopen_interval_s)
                    failing = True
                self.output.tick(emit)
                stop.wait(self.config.reopen_interval_s)
                continue
            failing = False
            if connected_before:
                self.stats["reconnect_count"] = int(self.stats["reconnect_count"]) + 1
            connected_before = True
            self.stats["connected"] = True
            log.info("gps: connected to gpsd at %s", self.server)
            try:
                sock.sendall(WATCH)
                self._read(sock, emit, stop)
                if not stop.is_set():
                    log.warning("gps: gpsd at %s closed the connection; reconnecting every %.1f s", self.server,
                                self.config.reopen_interval_s)
                    failing = True
            except OSError as exc:
                log.warning("gps: gpsd at %s lost: %s; reconnecting every %.1f s", self.server, exc.strerror or exc,
                            self.config.reopen_interval_s)
                failing = True
            finally:
                self.stats["connected"] = False
                sock.close()
            self._end_epoch(emit)
            if not stop.is_set():
                self.output.tick(emit)
                stop.wait(self.config.reopen_interval_s)

    def _read(self, sock: socket.socket, emit: Emit, stop: threading.Event) -> None:
        sock.settimeout(self.config.epoch_timeout_s)
        buf = b""
        while not stop.is_set():
            try:
                data = sock.recv(65536)
            except socket.timeout:
                self._end_epoch(emit)  # gpsd is quiet: the epoch's reports are all in
                self.output.tick(emit)
                continue
            if not data:
                return
            self.output.data()
            buf += data
            *lines, buf = buf.split(b"\n")
            if len(buf) > MAX_LINE:
                buf = b""
                self.stats["bad_reports"] = int(self.stats["bad_reports"]) + 1
            for line in lines:
                self._report(line, emit)
            self.output.tick(emit)

    def _report(self, line: bytes, emit: Emit) -> None:
        line = line.strip()
        if not line:
            return
        try:
            report = self._decoder.decode(line)
        except msgspec.DecodeError:
            self.stats["bad_reports"] = int(self.stats["bad_reports"]) + 1
            return
        if not isinstance(report, dict):
            self.stats["bad_reports"] = int(self.stats["bad_reports"]) + 1
            return
        self.stats["reports"] = int(self.stats["reports"]) + 1
        kind = report.get("class")
        if kind == "SKY":
            self._sky = report
        elif kind == "TPV":
            time = report.get("time")
            has_fix = isinstance(time, str) and report.get("mode") in (2, 3) and "lat" in report and "lon" in report
            if not has_fix:
                self._no_fix = True
                return
            if self._pending is not None and self._pending[0] != time:
                self._end_epoch(emit)
            self._pending = (time, report)

    def _end_epoch(self, emit: Emit) -> None:
        pending, self._pending = self._pending, None
        no_fix, self._no_fix = self._no_fix, False
        decoded = fix_from_tpv(pending[1], self._sky) if pending is not None else None
        if decoded is not None:
            self.output.fix(*decoded, emit)
        elif no_fix:
            self.output.no_fix(emit)
