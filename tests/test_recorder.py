"""Recording on the device (agent/ops/recorder.py): candump -L lines python-can reads back, rotation and
the size cap, and the raw taps of the real GPS source (a pty) and CAN source (python-can's virtual bus)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import can
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.clock import SystemClock
from agent.config import CanBusConfig, CanConfig, GpsConfig, RecordConfig
from agent.ops.recorder import Recorder, candump_line
from agent.sources.can_bus import CanSource
from agent.sources.gps_serial import GpsSerialSource
from conftest import REPO, wait_until
from sim.scenario import run_scenario

DRIVE = REPO / "sim" / "drives" / "delivery_route.nmea"

frames = st.builds(
    lambda ext, ident, remote, data, stamp: (ext, ident & (0x1FFFFFFF if ext else 0x7FF), remote,
                                              b"" if remote else data, stamp),
    st.booleans(), st.integers(0, 0x1FFFFFFF), st.booleans(), st.binary(max_size=8),
    st.floats(1.6e9, 2.1e9, allow_nan=False),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(frames, min_size=1, max_size=20))
def test_candump_lines_read_back_by_python_can(tmp_path_factory, batch):
    path = tmp_path_factory.mktemp("candump") / "x.log"
    path.write_text("".join(candump_line(stamp, "can0", ident, ext, data, remote) for ext, ident, remote, data, stamp in batch))
    with can.CanutilsLogReader(str(path)) as reader:
        got = list(reader)
    assert len(got) == len(batch)
    for msg, (ext, ident, remote, data, stamp) in zip(got, batch):
        assert (msg.arbitration_id, msg.is_extended_id, msg.is_remote_frame, msg.channel) == (ident, ext, remote, "can0")
        assert bytes(msg.data) == data and abs(msg.timestamp - stamp) < 1e-5


def _recorded(files) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(files.recordings(), key=lambda p: p.stat().st_mtime_ns))


def test_files_rotate_within_their_size_and_the_oldest_go_past_the_total(tmp_path):
    config = RecordConfig(enabled=True, dir=str(tmp_path / "rec"), max_file_bytes=4096, max_total_bytes=16384)
    recorder = Recorder(config)
    recorder.open()
    lines = DRIVE.read_bytes().splitlines(keepends=True)
    for line in lines:
        recorder.nmea(line)
    recorder.close()
    files = recorder.nmea_files.recordings()
    assert recorder.nmea_files.files_started > len(files) >= 4
    assert all(p.stat().st_size <= 4096 for p in files)
    assert sum(p.stat().st_size for p in files) <= 16384 + 4096  # the file being written may take it over
    # What is left is the end of the stream, whole lines, in order.
    kept = _recorded(recorder.nmea_files)
    assert DRIVE.read_bytes().endswith(kept) and kept.startswith((b"$", b"#"))


def test_a_directory_that_cannot_be_written_pauses_recording_without_raising(tmp_path, caplog):
    blocker = tmp_path / "rec"
    recorder = Recorder(RecordConfig(enabled=True, dir=str(blocker)))
    blocker.write_text("a file where the directory should be")
    for _ in range(3):
        recorder.nmea(b"$GPGGA\r\n")
    assert [r.message for r in caplog.records].count(
        f"record: cannot write to {blocker}: Not a directory; recording paused") == 1


def test_the_gps_source_hands_every_byte_it_reads_to_the_recorder(tmp_path, pty_gps):
    recorder = Recorder(RecordConfig(enabled=True, dir=str(tmp_path / "rec")))
    recorder.open()
    source = GpsSerialSource(GpsConfig(port=pty_gps.path, baud=115200), SystemClock())
    source.on_raw = recorder.nmea
    stop = threading.Event()
    thread = threading.Thread(target=source.run, args=(lambda record: None, stop))
    thread.start()
    try:
        wait_until(lambda: source.stats["port_open"], message="the port open")
        data = DRIVE.read_bytes()[:20000] + b"\x00\xffnot nmea\r\n"  # garbage is recorded as it came
        for start in range(0, len(data), 997):
            pty_gps.write(data[start:start + 997])
        wait_until(lambda: source.stats["bytes"] == len(data), message="the source reading everything")
    finally:
        stop.set()
        thread.join(5)
    recorder.close()
    assert _recorded(recorder.nmea_files) == data


def test_the_can_source_records_every_frame_as_a_candump_log(tmp_path):
    recorder = Recorder(RecordConfig(enabled=True, dir=str(tmp_path / "rec")))
    recorder.open()
    channel = f"rec-{time.monotonic_ns()}"
    source = CanSource(CanConfig(buses=[CanBusConfig(name="can1", interface="virtual", channel=channel)]), SystemClock())
    source.on_frame = recorder.can
    stop = threading.Event()
    thread = threading.Thread(target=source.run, args=(lambda record: None, stop))
    thread.start()
    sent = [can.Message(arbitration_id=0x18FEF100 + i, is_extended_id=True, data=bytes([i, 0xFF, 0x00, i]))
            for i in range(50)] + [can.Message(arbitration_id=0x7E8, is_extended_id=False, data=b"\x03\x41\x0d\x32")]
    try:
        wait_until(lambda: source.state == "up", message="the bus up")
        with can.Bus(interface="virtual", channel=channel) as bus:
            for msg in sent:
                bus.send(msg)
        wait_until(lambda: source.stats()["frames"] == len(sent), message="every frame received")
    finally:
        stop.set()
        thread.join(5)
    recorder.close()
    [log] = recorder.can_files.recordings()
    assert log.name.startswith("can-") and log.suffix == ".log"
    with can.CanutilsLogReader(str(log)) as reader:
        got = list(reader)
    assert [(m.arbitration_id, m.is_extended_id, bytes(m.data), m.channel) for m in got] == [
        (m.arbitration_id, m.is_extended_id, bytes(m.data), "can1") for m in sent]
    assert all(abs(m.timestamp - time.time()) < 60 for m in got)  # the receive time, a Unix time


def test_recording_is_off_by_default():
    assert RecordConfig().enabled is False
    assert Path(RecordConfig().dir).is_absolute()


def test_a_running_agent_records_what_the_scenario_runner_sent(tmp_path):
    """The whole agent (telematics-agent run) with record.enabled, fed by the scenario runner: the NMEA
    files hold exactly the bytes written to the pty, the CAN files every frame delivered."""
    drives = REPO / "sim" / "drives"
    rec = tmp_path / "rec"
    scenario = {"name": "recording", "speed": 30, "end_s": 60,
                "inputs": {"nmea": str(drives / "delivery_route.nmea"), "can": str(drives / "delivery_route.candump.log")},
                "agent": {"config": {"record": {"enabled": True, "dir": str(rec)}, "edge": {"reporting": {"enabled": False}}}}}
    path = tmp_path / "recording.yaml"
    path.write_text(yaml.safe_dump(scenario))
    _, checks, outcome = run_scenario(path, tmp_path / "run")
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]
    recorder = Recorder(RecordConfig(dir=str(rec)))
    assert _recorded(recorder.nmea_files) == (tmp_path / "run" / "sent.nmea").read_bytes()
    got = []
    for log in recorder.can_files.recordings():
        with can.CanutilsLogReader(str(log)) as reader:
            got += [(m.arbitration_id, bytes(m.data)) for m in reader]
    assert len(got) == outcome.can_sent - outcome.can_dropped > 500
