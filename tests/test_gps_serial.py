"""GpsSerialSource through real pseudo-terminals: fixes, unplug and replug, a missing port, 10 Hz,
no checksums, a clock step, and the gps_lost / gps_regained / gps_silent events."""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time

import pytest

from agent.config import GpsConfig
from agent.decode.nmea import NmeaDecoder, checksum
from agent.record import Event, Fix, Record, Status, iso_utc
from agent.sources.gps_health import GpsHealth
from agent.sources.gps_serial import GpsSerialSource
from conftest import PtyGps, wait_until


def sentence(body: str, with_checksum: bool = True) -> bytes:
    return (f"${body}*{checksum(body.encode()):02X}\r\n" if with_checksum else f"${body}\r\n").encode()


def epoch(second: float, valid: bool = True, date: str = "100117", checksums: bool = True, lat: str = "4404.13387") -> bytes:
    """RMC + GGA + GSA of one receiver epoch at ``second`` seconds after 12:00:00."""
    whole, frac = divmod(round(second * 100), 100)
    t = f"12{whole // 60:02d}{whole % 60:02d}.{frac:02d}"
    status, quality, mode = ("A", 1, 3) if valid else ("V", 0, 1)
    return b"".join(
        sentence(body, checksums)
        for body in (
            f"GPRMC,{t},{status},{lat},N,12118.85628,W,10.0,90.0,{date},,,{'A' if valid else 'N'}",
            f"GPGGA,{t},{lat},N,12118.85628,W,{quality},09,0.9,1144.8,M,-21.4,M,,",
            f"GPGSA,A,{mode},02,05,12,15,18,24,25,29,31,,,,1.6,0.9,1.3",
        )
    )


class StepClock:
    """An injected clock whose wall time the test can step (a Pi's clock being set mid-run)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def wall(self) -> float:
        return time.time() + self.offset

    def monotonic(self) -> float:
        return time.monotonic()


class Running:
    """A GpsSerialSource on its own thread, collecting what it emits."""

    def __init__(self, config: GpsConfig, clock=None) -> None:
        self.records: list[Record] = []
        self.source = GpsSerialSource(config, clock or StepClock())
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.source.run, args=(self.records.append, self.stop), daemon=True)
        self.thread.start()

    def fixes(self) -> list[Record]:
        return [r for r in list(self.records) if isinstance(r.data, Fix)]

    def events(self) -> list[str]:
        return [r.data.type for r in list(self.records) if isinstance(r.data, Event)]

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        assert not self.thread.is_alive()


@pytest.fixture
def link(tmp_path):
    """A stable device name (like /dev/gps0 from a udev rule) pointing at a pty."""
    return tmp_path / "gps0"


def point(link, gps: PtyGps) -> None:
    tmp = link.with_suffix(".new")
    os.symlink(gps.path, tmp)
    os.replace(tmp, link)


def config(link, **overrides) -> GpsConfig:
    # The test receiver's dates are in 2017: below the default rollover floor.
    values = dict(port=str(link), baud=115200, epoch_timeout_s=0.1, reopen_interval_s=0.1, silent_timeout_s=1.0,
                  rollover_floor=dt.date(2010, 1, 1))
    values.update(overrides)
    return GpsConfig(**values)


@pytest.fixture
def running():
    started: list[Running] = []

    def start(cfg: GpsConfig, clock=None) -> Running:
        run = Running(cfg, clock)
        started.append(run)
        return run

    yield start
    for run in started:
        run.close()


def test_fixes_from_a_pty_with_gps_time_and_stats(pty_gps, link, running):
    point(link, pty_gps)
    run = running(config(link))
    wait_until(lambda: run.source.stats["port_open"], message="port open")
    pty_gps.write(epoch(0) + epoch(1) + epoch(2))
    # The third epoch has no successor: the quiet line (epoch_timeout_s) completes it.
    fixes = wait_until(lambda: len(run.fixes()) == 3 and run.fixes(), message="3 fixes")
    assert [iso_utc(r.utc) for r in fixes] == [f"2017-01-10T12:00:0{i}.000Z" for i in range(3)]
    assert fixes[0].data.lat == pytest.approx(44.068897833, abs=1e-9) and fixes[0].data.sats_used == 9
    assert fixes[0].mono <= fixes[2].mono <= time.monotonic()
    stats = run.source.stats
    assert stats["fixes"] == 3 and stats["last_fix_utc"] == fixes[2].utc and stats["decoder"]["sentences"] == 9


def test_unplug_and_replug_mid_stream(link, running, caplog):
    caplog.set_level(logging.INFO, logger="agent.sources.gps_serial")
    first = PtyGps()
    point(link, first)
    run = running(config(link))
    try:
        wait_until(lambda: run.source.stats["port_open"], message="port open")
        first.write(epoch(0) + epoch(1))
        wait_until(lambda: len(run.fixes()) == 2, message="fixes before the unplug")
    finally:
        first.close()  # the USB receiver is pulled out
    wait_until(lambda: not run.source.stats["port_open"], message="port closed")
    os.unlink(link)  # udev removes the name
    time.sleep(0.5)  # several reopen attempts while it is gone
    second = PtyGps()
    try:
        point(link, second)  # plugged back in (a new tty behind the same name)
        wait_until(lambda: run.source.stats["port_open"], message="port reopened")
        second.write(epoch(5) + epoch(6))
        wait_until(lambda: len(run.fixes()) == 4, message="fixes after the replug")
    finally:
        second.close()
    assert [iso_utc(r.utc)[11:19] for r in run.fixes()] == ["12:00:00", "12:00:01", "12:00:05", "12:00:06"]
    assert run.source.stats["reopen_count"] == 1
    lines = [r.getMessage() for r in caplog.records]
    # One line per state change: open, lost (however many reopen attempts then failed), open again.
    assert sum("lost" in line for line in lines) == 1
    assert sum("cannot open" in line for line in lines) == 0
    assert sum(" open at " in line for line in lines) == 2
    assert run.source.stats["open_failures"] >= 2


def test_a_missing_port_is_one_log_line_and_the_source_keeps_trying(link, running, caplog):
    caplog.set_level(logging.INFO, logger="agent.sources.gps_serial")
    run = running(config(link, silent_timeout_s=0.3))
    wait_until(lambda: run.source.stats["open_failures"] >= 3, message="retries")
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and str(link) in warnings[0].getMessage() and warnings[0].exc_info is None
    wait_until(lambda: "gps_silent" in run.events(), message="gps_silent while the port is missing")
    gps = PtyGps()
    try:
        point(link, gps)
        wait_until(lambda: run.source.stats["port_open"], message="port opened once it appeared")
        gps.write(epoch(0) + epoch(1))
        wait_until(lambda: len(run.fixes()) == 2, message="fixes")
        wait_until(lambda: "gps_regained" in run.events(), message="gps_regained")
    finally:
        gps.close()


def send_at_10hz(pty_gps, epochs: int) -> None:
    """Write ``epochs`` epochs into the pty, one every 0.1 s as a 10 Hz receiver sends them."""
    began = time.monotonic()
    for i in range(epochs):
        pty_gps.write(epoch(i / 10))
        time.sleep(max(0.0, began + (i + 1) * 0.1 - time.monotonic()))


def test_a_10hz_receiver_at_a_baud_rate_that_carries_it(pty_gps, link, running):
    # 10 epochs/s x 3 sentences x ~70 bytes = 2,100 bytes/s: 38400 baud carries 3,840 bytes/s.
    point(link, pty_gps)
    run = running(config(link, baud=38400, epoch_timeout_s=0.05))
    wait_until(lambda: run.source.stats["port_open"], message="port open")
    send_at_10hz(pty_gps, 20)
    fixes = wait_until(lambda: len(run.fixes()) == 20 and run.fixes(), message="20 fixes")
    assert [round((b.utc - a.utc) * 1000) for a, b in zip(fixes, fixes[1:])] == [100] * 19
    # Fixes arrive as the receiver sends them, not in a burst at the end.
    assert fixes[-1].mono - fixes[0].mono > 1.5


def test_a_10hz_receiver_is_read_about_two_epochs_at_a_time_with_the_same_fixes(pty_gps, link, running):
    # With the default epoch_timeout_s (0.25 s) a 10 Hz receiver's epochs end more often than that,
    # so the source lets bytes gather after each read (COALESCE_S): fewer reads, the same fixes.
    point(link, pty_gps)
    run = running(config(link, baud=460800, epoch_timeout_s=0.25))
    reads: list[bytes] = []
    run.source.on_raw = reads.append
    wait_until(lambda: run.source.stats["port_open"], message="port open")
    send_at_10hz(pty_gps, 30)
    fixes = wait_until(lambda: len(run.fixes()) == 30 and run.fixes(), message="30 fixes")
    assert [round((b.utc - a.utc) * 1000) for a, b in zip(fixes, fixes[1:])] == [100] * 29
    assert [f.data for f in fixes] == [f.data for f in decoded_whole(b"".join(reads))]
    assert len(reads) <= 24  # one read per epoch without coalescing (30); about 15 with it
    assert run.source.stats["decoder"]["sentences"] == 90


def decoded_whole(data: bytes) -> list[Record]:
    """What the decoder makes of ``data`` in one piece (no reads, no timing), as fix records."""
    decoder = NmeaDecoder()
    return [Record(utc=utc, mono=0.0, data=fix) for utc, fix in decoder.feed(data) + decoder.flush()]


def test_a_receiver_without_checksums(pty_gps, link, running):
    point(link, pty_gps)
    strict = running(config(link))
    wait_until(lambda: strict.source.stats["port_open"], message="port open")
    pty_gps.write(epoch(0, checksums=False) + epoch(1, checksums=False))
    wait_until(lambda: strict.source.stats["decoder"]["missing_checksum"] == 6, message="rejections counted")
    assert strict.fixes() == []
    strict.close()
    lenient = running(config(link, allow_missing_checksum=True))
    wait_until(lambda: lenient.source.stats["port_open"], message="port open")
    pty_gps.write(epoch(2, checksums=False) + epoch(3, checksums=False))
    wait_until(lambda: len(lenient.fixes()) == 2, message="fixes without checksums")


def test_a_clock_step_mid_run_does_not_move_gps_time_and_is_reported(pty_gps, link, running):
    clock = StepClock()
    clock.offset = -time.time()  # a Pi booted without RTC: 1970
    point(link, pty_gps)
    run = running(config(link), clock)
    wait_until(lambda: run.source.stats["port_open"], message="port open")
    pty_gps.write(epoch(0) + epoch(1))
    wait_until(lambda: len(run.fixes()) == 2, message="fixes before the step")
    assert run.source.stats["clock_ok"] is False
    # The host clock is set (NTP, or the agent with gps.set_clock) to the receiver's time.
    clock.offset = dt.datetime(2017, 1, 10, 12, 0, 2, tzinfo=dt.timezone.utc).timestamp() - time.time()
    pty_gps.write(epoch(2) + epoch(3))
    fixes = wait_until(lambda: len(run.fixes()) == 4 and run.fixes(), message="fixes after the step")
    assert [iso_utc(r.utc)[11:19] for r in fixes] == ["12:00:00", "12:00:01", "12:00:02", "12:00:03"]
    assert all(b.mono >= a.mono for a, b in zip(fixes, fixes[1:]))
    statuses = wait_until(lambda: [r for r in run.records if isinstance(r.data, Status)][1:] and
                          [r for r in run.records if isinstance(r.data, Status)], message="clock_ok")
    assert [r.data.type for r in statuses] == ["clock_offset", "clock_ok"]
    assert statuses[0].data.attrs["offset_s"] < -1e9 and statuses[0].utc == fixes[0].utc
    assert run.source.stats["clock_ok"] is True and abs(run.source.stats["clock_offset_s"]) < 2.0


def test_gga_only_receiver_is_dated_by_a_trusted_host_clock(pty_gps, link, running):
    point(link, pty_gps)
    run = running(config(link))
    wait_until(lambda: run.source.stats["port_open"], message="port open")
    now = dt.datetime.now(dt.timezone.utc)
    t = now.strftime("%H%M%S.00")
    pty_gps.write(sentence(f"GPGGA,{t},4404.13387,N,12118.85628,W,1,09,0.9,1144.8,M,-21.4,M,,"))
    (fix,) = wait_until(lambda: run.fixes(), message="a fix")
    assert abs(fix.utc - now.replace(microsecond=0).timestamp()) < 1e-6


def test_a_receiver_showing_the_gps_week_rollover_is_moved_forward(pty_gps, link, running):
    point(link, pty_gps)
    run = running(config(link, rollover_floor=dt.date(2025, 1, 1)))
    wait_until(lambda: run.source.stats["port_open"], message="port open")
    pty_gps.write(epoch(0, date="100306"))  # 2006-03-10: an old receiver 1024 weeks behind
    (fix,) = wait_until(lambda: run.fixes(), message="a fix")
    assert iso_utc(fix.utc) == "2025-10-24T12:00:00.000Z"
    assert run.source.stats["decoder"]["rollover"] == 1


def test_gps_lost_regained_and_silent_events_through_a_pty(pty_gps, link, running):
    point(link, pty_gps)
    run = running(config(link, silent_timeout_s=0.5))
    wait_until(lambda: run.source.stats["port_open"], message="port open")
    pty_gps.write(epoch(0) + epoch(1) + epoch(2, valid=False) + epoch(3, valid=False) + epoch(4, valid=False))
    wait_until(lambda: "gps_lost" in run.events(), message="gps_lost")
    pty_gps.write(epoch(5) + epoch(6))
    wait_until(lambda: "gps_regained" in run.events(), message="gps_regained")
    wait_until(lambda: "gps_silent" in run.events(), message="gps_silent after the receiver stops talking")
    assert run.events() == ["gps_lost", "gps_regained", "gps_silent"]
    lost = next(r for r in run.records if isinstance(r.data, Event) and r.data.type == "gps_lost")
    assert lost.data.lat == pytest.approx(44.068897833, abs=1e-9)  # where the fix was last held
    assert lost.utc >= run.fixes()[1].utc  # stamped with GPS time carried forward, not the host clock
    assert run.source.stats["state"] == "silent"


def test_health_state_machine():
    health = GpsHealth(silent_timeout_s=5.0)
    good = Fix(lat=1.0, lon=2.0, quality=1, status="A")
    bad = Fix(lat=1.0, lon=2.0, quality=0, status="V")
    assert health.epoch(100.0, 0.0, good) is None  # the first fix after start is no event
    assert health.epoch(101.0, 1.0, bad) is None  # one bad epoch is noise
    assert health.epoch(102.0, 2.0, None).type == "gps_lost"
    assert health.epoch(103.0, 3.0, None) is None
    regained = health.epoch(104.0, 4.0, good)
    assert regained.type == "gps_regained" and regained.attrs["outage_s"] == 2.0
    health.data(4.0)
    assert health.tick(8.9) is None
    silent = health.tick(9.0)
    assert silent.type == "gps_silent" and silent.attrs["silent_s"] == 5.0
    assert health.tick(20.0) is None  # once per silent spell
    assert health.event_utc(wall=0.0, mono=10.0) == 110.0  # GPS time carried forward


def test_baud_rate_detection_moves_on_while_only_noise_arrives(pty_gps, link, running, caplog):
    import termios

    caplog.set_level(logging.INFO, logger="agent.sources.gps_serial")
    point(link, pty_gps)
    run = running(config(link, baud=9600, baud_detect=True))
    wait_until(lambda: run.source.stats["port_open"], message="port open")
    # What a 38400-baud receiver looks like to a 9600-baud UART: bytes, never a valid sentence.
    noise = bytes((i * 37 + 11) % 256 for i in range(700)).replace(b"$", b"#").replace(b"!", b"#")
    pty_gps.write(noise)
    wait_until(lambda: run.source.stats["baud"] == 19200, message="the next rate")
    # pyserial really reprogrammed the line (the pty keeps the speed it is given).
    assert termios.tcgetattr(pty_gps.slave_fd)[4] == termios.B19200
    pty_gps.write(noise)
    wait_until(lambda: run.source.stats["baud"] == 38400, message="the rate after that")
    pty_gps.write(epoch(0) + epoch(1))
    wait_until(lambda: len(run.fixes()) == 2, message="fixes once a rate works")
    before = run.source.stats["bytes"]
    pty_gps.write(noise * 3)  # line noise after the rate was found does not move it again
    wait_until(lambda: run.source.stats["bytes"] >= before + 3 * 700, message="noise read")
    assert run.source.stats["baud"] == 38400
    assert any("speaks NMEA at 38400 baud" in r.getMessage() for r in caplog.records)


def test_without_detection_the_rate_stays(pty_gps, link, running):
    point(link, pty_gps)
    run = running(config(link, baud=9600))
    wait_until(lambda: run.source.stats["port_open"], message="port open")
    pty_gps.write(bytes(range(256)).replace(b"$", b"#").replace(b"!", b"#") * 4)
    wait_until(lambda: run.source.stats["bytes"] >= 1024, message="noise read")
    assert run.source.stats["baud"] == 9600
