"""GpsdSource: against a real gpsd reading a pty, and against gpsd's own recorded JSON reports."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import tty
from pathlib import Path

import pytest

from agent.config import GpsConfig
from agent.decode.nmea import decode_file
from agent.record import Fix, Record, iso_utc
from agent.sources.gpsd import GpsdSource, fix_from_tpv
from conftest import free_port, wait_for_port, wait_until

GPSD = shutil.which("gpsd") or "/usr/sbin/gpsd"


def need_gpsd() -> None:
    if not os.path.exists(GPSD):
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but gpsd is not installed: apt-get install gpsd")
        pytest.skip("gpsd is not installed (apt-get install gpsd)")


class Gpsd:
    """A real gpsd on a free port, reading a pty the test writes NMEA into; stopped by PID."""

    def __init__(self, port: int | None = None) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        self.path = os.ttyname(self.slave)
        self.port = port or free_port()
        self.proc = subprocess.Popen(
            [GPSD, "-N", "-n", "-S", str(self.port), self.path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for_port(self.port)

    def write(self, data: bytes) -> None:
        os.write(self.master, data)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            self.proc.wait(5)
        for fd in (self.master, self.slave):
            try:
                os.close(fd)
            except OSError:
                pass


class Running:
    def __init__(self, config: GpsConfig) -> None:
        from agent.clock import SystemClock

        self.records: list[Record] = []
        self.source = GpsdSource(config, SystemClock())
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.source.run, args=(self.records.append, self.stop), daemon=True)
        self.thread.start()

    def fixes(self) -> list[Record]:
        return [r for r in list(self.records) if isinstance(r.data, Fix)]

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        assert not self.thread.is_alive()


def config(port: int, **overrides) -> GpsConfig:
    values = dict(source="gpsd", gpsd_port=port, epoch_timeout_s=0.1, reopen_interval_s=0.1, silent_timeout_s=1.0)
    values.update(overrides)
    return GpsConfig(**values)


def epochs_of(capture: Path) -> list[bytes]:
    """The capture's sentences grouped by RMC (each u-blox epoch starts with one)."""
    lines = [line.rstrip(b"\r\n") + b"\r\n" for line in capture.read_bytes().splitlines() if line.startswith(b"$")]
    groups: list[bytes] = []
    for line in lines:
        if line.startswith(b"$GNRMC") or not groups:
            groups.append(b"")
        groups[-1] += line
    return groups


@pytest.fixture
def running():
    started: list[Running] = []

    def start(cfg: GpsConfig) -> Running:
        run = Running(cfg)
        started.append(run)
        return run

    yield start
    for run in started:
        run.close()


def test_real_gpsd_gives_the_same_fixes_as_our_own_decoder(corpus, running):
    need_gpsd()
    capture = corpus / "nmea" / "ublox-8.log"
    gpsd = Gpsd()
    try:
        run = running(config(gpsd.port))
        wait_until(lambda: run.source.stats["connected"], message="connected to gpsd")
        time.sleep(0.3)  # gpsd opens the device once a client watches
        for group in epochs_of(capture)[:20]:
            gpsd.write(group)
            time.sleep(0.3)  # a quiet line between epochs, as a 1 Hz receiver has
        # gpsd spends the first epochs identifying the receiver; it reports the rest.
        wait_until(lambda: len(run.fixes()) >= 10 and iso_utc(run.fixes()[-1].utc).endswith("00:10:00.000Z"),
                   message="fixes through gpsd up to the last epoch")
    finally:
        gpsd.stop()
    ours = {iso_utc(u): f for u, f in decode_file(capture)}
    got = run.fixes()
    # One fix per epoch (not one per TPV report), every epoch from gpsd's first report to the last.
    assert [round(b.utc - a.utc, 3) for a, b in zip(got, got[1:])] == [1.0] * (len(got) - 1)
    for record in got:
        fix = ours[iso_utc(record.utc)]
        assert abs(record.data.lat - fix.lat) <= 1e-6 and abs(record.data.lon - fix.lon) <= 1e-6
        assert record.data.alt_m == pytest.approx(fix.alt_m, abs=0.01)
        # gpsd counts used satellites from GSA, the GGA field may differ: only the DOP must agree.
        assert record.data.mode == 3 and record.data.sats_used > 4 and record.data.hdop == fix.hdop


def test_gpsd_restart_reconnects_and_missing_gpsd_is_one_log_line(running, caplog):
    need_gpsd()
    caplog.set_level(logging.INFO, logger="agent.sources.gpsd")
    port = free_port()
    run = running(config(port))
    wait_until(lambda: run.source.stats["connect_failures"] >= 3, message="retries while gpsd is not running")
    gpsd = Gpsd(port)
    try:
        wait_until(lambda: run.source.stats["connected"], message="connected once gpsd is up")
        gpsd.stop()
        wait_until(lambda: not run.source.stats["connected"], message="connection lost")
        gpsd = Gpsd(port)
        wait_until(lambda: run.source.stats["reconnect_count"] == 1, message="reconnected")
        run.close()
    finally:
        gpsd.stop()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert sum("cannot reach gpsd" in w for w in warnings) == 1
    assert sum("closed the connection" in w or "lost" in w for w in warnings) == 1
    assert all(r.exc_info is None for r in caplog.records)


class RecordedGpsd:
    """A TCP server that answers a WATCH with gpsd's own recorded reports (a .chk file), epoch by epoch."""

    def __init__(self, reports: list[str]) -> None:
        self.reports = reports
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.watch = b""
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        with conn:
            conn.sendall(b'{"class":"VERSION","release":"3.22","proto_major":3,"proto_minor":14}\n')
            self.watch = conn.recv(1024)
            last_time = None
            for line in self.reports:
                report = json.loads(line)
                if report.get("class") == "TPV" and report.get("time") not in (None, last_time):
                    last_time = report["time"]
                    time.sleep(0.12)  # a quiet spell between epochs
                conn.sendall(line.encode() + b"\n")
            time.sleep(0.5)

    def close(self) -> None:
        self.server.close()


def test_recorded_gpsd_reports_collapse_to_the_last_tpv_of_each_epoch(corpus, running):
    chk = corpus / "nmea" / "chk" / "ublox-neo-m9n-nmea.log.chk"
    reports = [line for line in chk.read_text().splitlines() if line.startswith('{"class":"TPV"') or line.startswith('{"class":"SKY"')]
    server = RecordedGpsd(reports[:200])
    try:
        run = running(config(server.port))
        tpvs = [json.loads(r) for r in reports[:200] if '"TPV"' in r]
        times = sorted({t["time"] for t in tpvs if "time" in t and t.get("mode") in (2, 3)})
        wait_until(lambda: len(run.fixes()) == len(times), message="one fix per gpsd epoch")
    finally:
        server.close()
    assert server.watch.startswith(b'?WATCH={"enable":true,"json":true}')
    got = run.fixes()
    assert [iso_utc(r.utc) for r in got] == times
    last = {t["time"]: t for t in tpvs if "time" in t}
    for record in got:
        tpv = last[iso_utc(record.utc)]
        assert (record.data.lat, record.data.lon, record.data.alt_m) == (tpv["lat"], tpv["lon"], tpv["altMSL"])
        assert record.data.speed_mps == tpv["speed"] and record.data.mode == tpv["mode"]


def test_fix_from_tpv_maps_gpsd_fields():
    tpv = {"class": "TPV", "mode": 3, "status": 2, "time": "2017-01-10T00:09:41.000Z", "lat": 44.1, "lon": -121.3,
           "altMSL": 1144.8, "speed": 0.5, "track": 12.5, "geoidSep": -21.4}
    sky = {"class": "SKY", "hdop": 1.01, "pdop": 1.71, "vdop": 1.38, "nSat": 16, "uSat": 8}
    utc, fix = fix_from_tpv(tpv, sky)
    assert iso_utc(utc) == "2017-01-10T00:09:41.000Z"
    assert (fix.quality, fix.mode, fix.hdop, fix.pdop, fix.vdop, fix.sats_used, fix.sats_in_view) == (2, 3, 1.01, 1.71, 1.38, 8, 16)
    assert (fix.alt_m, fix.speed_mps, fix.course_deg, fix.geoid_sep_m) == (1144.8, 0.5, 12.5, -21.4)
    assert fix_from_tpv({"class": "TPV", "mode": 1}, None) is None
    assert fix_from_tpv({**tpv, "time": "not a time"}, None) is None
    assert fix_from_tpv({**tpv, "mode": 1}, None)[1].quality == 0
