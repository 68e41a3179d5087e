"""NMEA replay into a real pty, read back with pyserial: content, dates, pacing, CLI."""

from __future__ import annotations

import datetime as _dt
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import serial
from hypothesis import given
from hypothesis import strategies as st

from sim import nmea_writer
from sim.capture import load_nmea
from sim.replay import NmeaReplay, render_progress

REPO = Path(__file__).resolve().parent.parent


def _epoch(day: _dt.date, hh: int, mm: int, ss: int) -> str:
    """RMC + GGA + GSA of one receiver epoch."""
    t = f"{hh:02d}{mm:02d}{ss:02d}.00"
    return (
        nmea_writer.sentence("GPRMC", t, "A", "5200.69600", "N", "00421.55200", "E", "12.3", "87.5", day.strftime("%d%m%y"), "", "", "A")
        + nmea_writer.sentence("GPGGA", t, "5200.69600", "N", "00421.55200", "E", 1, "09", "0.9", "1.5", "M", "47.0", "M", "", "")
        + nmea_writer.sentence("GPGSA", "A", 3, 2, 5, 12, 15, 18, 24, 25, 29, 31, "", "", "", "1.6", "0.9", "1.3")
    )


def _capture(tmp_path: Path, day: _dt.date, seconds: list[tuple[int, int, int]], name: str = "drive.nmea") -> Path:
    path = tmp_path / name
    text = "# Name: test drive\n" + "".join(_epoch(day, *hms) for hms in seconds)
    path.write_bytes(text.encode("ascii"))
    return path


def _read_until_closed(port: serial.Serial, done: threading.Event) -> bytes:
    data = b""
    while True:
        chunk = port.read(4096)
        data += chunk
        if not chunk and done.is_set():
            return data


def _replay_and_read(replay: NmeaReplay, stop: threading.Event | None = None) -> tuple[bytes, float]:
    """Run ``replay`` on a thread while pyserial reads its pty; the bytes read and the seconds it took."""
    path = replay.open_pty()
    port = serial.Serial(path, 9600, timeout=0.2)
    done = threading.Event()
    began = time.monotonic()

    def work():
        replay.run(stop)
        done.set()

    worker = threading.Thread(target=work)
    worker.start()
    try:
        data = _read_until_closed(port, done)
    finally:
        worker.join(30)
        port.close()
        replay.close()
    return data, time.monotonic() - began


DAY = _dt.date(2021, 6, 30)
TODAY = _dt.date(2026, 11, 28)


def test_dates_move_to_today_with_valid_checksums_and_times_kept(tmp_path):
    path = _capture(tmp_path, DAY, [(10, 0, s) for s in range(4)])
    data, _ = _replay_and_read(NmeaReplay(path, speed=50, today=TODAY))
    lines = data.decode("ascii").splitlines()
    assert len(lines) == 12 and not any(line.startswith("#") for line in lines)
    assert all(nmea_writer.checksum_ok(line) for line in lines)
    rmc = [line for line in lines if line.startswith("$GPRMC")]
    assert [nmea_writer.sentence_date(line) for line in rmc] == [TODAY] * 4
    assert [nmea_writer.time_of_day(line) for line in rmc] == [36000.0, 36001.0, 36002.0, 36003.0]


def test_keep_dates_replays_every_byte_unchanged(tmp_path):
    path = _capture(tmp_path, DAY, [(10, 0, s) for s in range(3)])
    data, _ = _replay_and_read(NmeaReplay(path, speed=50, keep_dates=True))
    assert data == path.read_bytes().split(b"\n", 1)[1]


def test_midnight_rollover_moves_to_today_and_tomorrow(tmp_path):
    path = _capture(tmp_path, DAY, [(23, 59, 58), (23, 59, 59)])
    with path.open("a") as out:
        out.write(_epoch(DAY + _dt.timedelta(days=1), 0, 0, 0) + _epoch(DAY + _dt.timedelta(days=1), 0, 0, 1))
    timeline = load_nmea(path)
    assert sorted({line.offset_s for line in timeline.lines}) == [0.0, 1.0, 2.0, 3.0]
    data, _ = _replay_and_read(NmeaReplay(path, speed=50, today=TODAY))
    dates = [nmea_writer.sentence_date(line) for line in data.decode().splitlines() if "RMC" in line]
    assert dates == [TODAY, TODAY, TODAY + _dt.timedelta(days=1), TODAY + _dt.timedelta(days=1)]


def test_a_step_back_in_time_does_not_rewind_the_schedule(tmp_path):
    path = _capture(tmp_path, DAY, [(10, 0, 5), (10, 0, 6), (10, 0, 4), (10, 0, 5)])
    offsets = [line.offset_s for line in load_nmea(path).lines]
    assert offsets == sorted(offsets) and offsets[-1] == 2.0


def test_pace_follows_the_recorded_times_divided_by_speed(tmp_path):
    path = _capture(tmp_path, DAY, [(10, 0, s) for s in range(0, 9, 2)])  # 8 s of drive
    data, elapsed = _replay_and_read(NmeaReplay(path, speed=8, baud=1_000_000))
    assert data.count(b"$GPRMC") == 5
    assert elapsed >= 8 / 8 * 0.95


def test_pace_never_exceeds_what_the_baud_rate_carries(tmp_path):
    # Every epoch at the same second: only the baud rate can hold the bytes back.
    path = _capture(tmp_path, DAY, [(10, 0, 0)] * 30)
    size = len(path.read_bytes().split(b"\n", 1)[1])
    last_line = len(_epoch(DAY, 10, 0, 0).splitlines(keepends=True)[-1])
    data, elapsed = _replay_and_read(NmeaReplay(path, speed=1000, baud=19200, keep_dates=True))
    assert len(data) == size
    assert elapsed >= (size - last_line) * 10 / 19200 * 0.95


def test_start_and_end_cut_the_drive(tmp_path):
    path = _capture(tmp_path, DAY, [(10, 0, s) for s in range(10)])
    data, _ = _replay_and_read(NmeaReplay(path, speed=50, keep_dates=True, start_s=3, end_s=6))
    times = [nmea_writer.time_of_day(line) for line in data.decode().splitlines() if "RMC" in line]
    assert times == [36003.0, 36004.0, 36005.0, 36006.0]


def test_loop_starts_again_until_stopped(tmp_path):
    path = _capture(tmp_path, DAY, [(10, 0, 0), (10, 0, 1)])
    stop = threading.Event()
    passes = []
    replay = NmeaReplay(path, speed=20, baud=1_000_000, loop=True, keep_dates=True, progress=lambda done, total: passes.append(done))
    threading.Timer(0.5, stop.set).start()
    data, _ = _replay_and_read(replay, stop)
    # One pass: 1 s of drive + 1 s between passes = 0.1 s at speed 20, so 0.5 s holds several.
    assert data.count(b"$GPRMC") >= 6
    assert passes.count(0.0) >= 3


def test_progress_line_shows_done_total_and_left():
    assert render_progress(83, 300, width=10) == "[###.......] 01:23 of 05:00, 03:37 left"
    assert render_progress(4000, 3600, width=4).startswith("[####] 1:06:40 of 1:00:00, 00:00 left")


def _rmc_strategy():
    return st.builds(
        lambda day, secs, speed: nmea_writer.sentence(
            "GNRMC", f"{secs // 3600:02d}{secs // 60 % 60:02d}{secs % 60:02d}.00", "A", "4807.038", "N", "01131.000", "E",
            f"{speed:.1f}", "84.4", day.strftime("%d%m%y"), "003.1", "W", "A",
        ),
        st.dates(_dt.date(2000, 1, 1), _dt.date(2099, 12, 31)),
        st.integers(0, 86399),
        st.floats(0, 200),
    )


@given(_rmc_strategy(), st.integers(-20000, 20000))
def test_shift_date_moves_only_the_date_and_keeps_the_checksum_valid(line, days):
    moved = nmea_writer.shift_date(line, days)
    assert nmea_writer.checksum_ok(moved)
    before, after = line.split(","), moved.split(",")
    assert [f for i, f in enumerate(before) if i != 9][:-1] == [f for i, f in enumerate(after) if i != 9][:-1]
    expected = nmea_writer.sentence_date(line) + _dt.timedelta(days=days)
    if 2000 <= expected.year <= 2099:
        assert nmea_writer.sentence_date(moved) == expected
        assert nmea_writer.shift_date(moved, -days) == line


@given(st.dates(_dt.date(1990, 1, 1), _dt.date(2200, 12, 31)), st.integers(-3000, 3000))
def test_shift_date_of_zda_keeps_four_digit_years(day, days):
    line = nmea_writer.sentence("GPZDA", "201530.00", f"{day.day:02d}", f"{day.month:02d}", f"{day.year:04d}", "00", "00")
    moved = nmea_writer.shift_date(line, days)
    assert nmea_writer.checksum_ok(moved)
    assert nmea_writer.sentence_date(moved) == day + _dt.timedelta(days=days)
    assert nmea_writer.time_of_day(moved) == 72930.0


@given(_rmc_strategy(), st.integers(1, 1000), st.integers(0, 255))
def test_a_corrupt_sentence_is_replayed_as_it_was(line, days, flip):
    body_end = line.index("*")
    position = 1 + flip % (body_end - 1)
    corrupt = line[:position] + chr(ord(line[position]) ^ 0x01) + line[position + 1 :]
    assert nmea_writer.shift_date(corrupt, days) == corrupt
    assert nmea_writer.time_of_day(corrupt) is None


def test_a_sentence_without_checksum_keeps_having_none():
    line = "$GPRMC,120000,A,4807.038,N,01131.000,E,0.0,0.0,300621,,\r\n"
    assert nmea_writer.shift_date(line, 1) == "$GPRMC,120000,A,4807.038,N,01131.000,E,0.0,0.0,010721,,\r\n"


def _cli(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", "import sys; from sim.cli import main; sys.exit(main())", "replay", *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs
    )


def test_cli_prints_the_pty_first_links_it_and_exits_0_after_the_reader_drained(tmp_path):
    path = _capture(tmp_path, DAY, [(10, 0, s) for s in range(3)])
    link = tmp_path / "gps0"
    proc = _cli("--nmea", str(path), "--speed", "10", "--link", str(link), "--progress")
    first = proc.stdout.readline()
    assert first.startswith("pty: /dev/pts/")
    pty_path = first.split(": ", 1)[1].strip()
    assert link.resolve() == Path(pty_path)
    time.sleep(0.5)  # an agent that takes its time to open the port
    port = serial.Serial(str(link), 9600, timeout=0.2)
    data = b""
    try:
        while True:
            data += port.read(4096)
    except serial.SerialException:
        pass  # the replay exited and took the pty with it
    port.close()
    assert proc.wait(10) == 0
    assert proc.stderr.read().rstrip().endswith("] 00:02 of 00:02, 00:00 left")  # the progress bar's last state
    assert data.startswith(b"$GPRMC,100000.00,")  # the replay waited for the reader: nothing lost at the start
    assert data.count(b"$GPRMC") == 3
    rmc = [line for line in data.decode("ascii", "replace").splitlines() if line.startswith("$GPRMC") and nmea_writer.checksum_ok(line)]
    assert nmea_writer.time_of_day(rmc[-1]) == 36002.0  # the reader drained it all before the replay exited
    assert nmea_writer.sentence_date(rmc[-1]) == _dt.datetime.now(_dt.timezone.utc).date()
    assert not link.exists()


def test_cli_missing_file_is_one_clear_line_and_exit_2(tmp_path):
    proc = _cli("--nmea", str(tmp_path / "nope.nmea"))
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 2
    assert err.strip().splitlines() == [f"telematics-sim replay: {tmp_path / 'nope.nmea'}: no such file"]
    assert out == ""


@pytest.mark.corpus
def test_every_corpus_byte_arrives_unchanged_with_keep_dates(corpus):
    path = corpus / "nmea" / "bundg_zeus_9.log"
    lines = path.read_bytes().split(b"\n")
    expected = b"\n".join(line for line in lines if not line.startswith(b"#"))
    data, _ = _replay_and_read(NmeaReplay(path, speed=1000, baud=4_000_000, keep_dates=True))
    assert data == expected


@pytest.mark.corpus
def test_every_corpus_capture_loads_with_a_monotonic_schedule_and_dates_move_cleanly(corpus):
    files = sorted((corpus / "nmea").glob("*.log")) + sorted((corpus / "drives").iterdir())
    assert len(files) >= 50
    for path in files:
        timeline = load_nmea(path)
        offsets = [line.offset_s for line in timeline.lines]
        assert offsets == sorted(offsets), path.name
        assert offsets[-1] < 3 * 3600, path.name  # the longest capture is the 149-minute Tahoe drive
        for line in timeline.lines:
            moved = nmea_writer.shift_date(line.text, 3000)
            # A valid sentence stays valid; anything else comes out exactly as it went in.
            assert nmea_writer.checksum_ok(moved) if nmea_writer.checksum_ok(line.text) else moved == line.text or "*" not in line.text
            assert nmea_writer.time_of_day(moved) == nmea_writer.time_of_day(line.text)
    tahoe = load_nmea(corpus / "drives" / "dotmorten_NmeaSampleData.txt")
    # The Reno-Tahoe drive crosses midnight UTC: its schedule runs on through it.
    assert 140 * 60 < tahoe.duration_s < 170 * 60


def test_the_drive_waits_for_a_reader_and_a_stop_ends_the_wait(tmp_path):
    path = _capture(tmp_path, DAY, [(10, 0, s) for s in range(2)])
    replay = NmeaReplay(path, speed=50, keep_dates=True)
    pty_path = replay.open_pty()
    stop = threading.Event()
    worker = threading.Thread(target=replay.run, args=(stop,))
    worker.start()
    time.sleep(0.3)
    assert worker.is_alive() and replay.bytes_written == 0  # nobody has opened the pty yet
    port = serial.Serial(pty_path, 9600, timeout=0.2)
    data = b""
    while b"100001.00" not in data:
        chunk = port.read(4096)
        assert chunk, "the replay did not start when the reader came"
        data += chunk
    assert data.startswith(b"$GPRMC,100000.00,")
    worker.join(10)
    port.close()
    replay.close()

    idle = NmeaReplay(path, speed=50)
    idle.open_pty()
    waiting = threading.Thread(target=idle.run, args=(stop,))
    waiting.start()
    time.sleep(0.1)
    stop.set()
    waiting.join(2)
    assert not waiting.is_alive() and idle.bytes_written == 0
    idle.close()
