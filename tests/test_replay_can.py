"""CAN replay: into python-can's virtual bus in step with the NMEA pty, and through the emulated
slcan adapter to python-can's own slcan interface on a real pty."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import can
import pytest
import serial
from hypothesis import given
from hypothesis import strategies as st

from conftest import wait_until

from sim import nmea_writer
from sim.replay import CanReplay, DriveClock, NmeaReplay, Replay
from sim.slcan_adapter import SlcanAdapter, decode_transmit, encode_frame

REPO = Path(__file__).resolve().parent.parent
DRIVE = REPO / "sim" / "drives" / "delivery_route"


@pytest.fixture
def virtual_channel(request):
    """A fresh virtual channel name per test, and every bus opened on it shut down afterwards."""
    buses: list[can.BusABC] = []

    def open_bus() -> can.BusABC:
        bus = can.Bus(interface="virtual", channel=request.node.name, receive_own_messages=False)
        buses.append(bus)
        return bus

    yield open_bus
    for bus in buses:
        bus.shutdown()


def test_nmea_and_can_arrive_in_step(virtual_channel):
    """20 s of the bundled drive at 5x: each NMEA epoch and the CAN frames of the same second arrive together."""
    sender, receiver = virtual_channel(), virtual_channel()
    nmea = NmeaReplay(DRIVE.with_suffix(".nmea"), speed=5, baud=1_000_000, keep_dates=True, start_s=100, end_s=120)
    replay = Replay(nmea, DRIVE.with_suffix(".candump.log"), can_bus=sender)
    port = serial.Serial(nmea.open_pty(), timeout=0.05)
    epochs: list[tuple[float, float]] = []  # (arrival, drive second from the RMC time)
    frames: list[tuple[float, can.Message]] = []
    worker = threading.Thread(target=replay.run)
    began = time.monotonic()
    worker.start()
    buffer = b""
    while worker.is_alive() or port.in_waiting:
        buffer += port.read(4096)
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            tod = nmea_writer.time_of_day(line.decode() + "\n")
            if line.startswith(b"$GPRMC") and tod is not None:
                epochs.append((time.monotonic() - began, tod))
        while (msg := receiver.recv(0)) is not None:
            frames.append((time.monotonic() - began, msg))
    worker.join()
    port.close()
    nmea.close()
    assert len(epochs) == 21
    # 21 seconds of EEC1 + CCVS1 at 10 Hz and LFE1 at 1 Hz.
    assert 20 * 21 <= len(frames) <= 21 * 21 + 3
    first_tod = epochs[0][1]
    for arrival, tod in epochs:
        # Frames due up to this epoch's drive second have all arrived within 0.5 s (2.5 drive s) of it,
        # and none due more than that later (slack for a loaded 2-core machine, not the replay's precision).
        due = (tod - first_tod) * 21
        assert sum(1 for t, _ in frames if t <= arrival + 0.5) >= due - 1
        assert sum(1 for t, _ in frames if t < arrival - 0.5) <= due + 21 * 2.5
    # The same 20 s take 4 s at 5x.
    assert epochs[-1][0] - epochs[0][0] >= 4.0 * 0.95


def test_can_frames_keep_their_recorded_spacing(virtual_channel):
    sender, receiver = virtual_channel(), virtual_channel()
    msgs = [can.Message(arbitration_id=0x18FEF100, data=bytes([i]), timestamp=1000.0 + i * 0.5) for i in range(5)]
    replay = CanReplay(msgs, sender.send)
    stop = threading.Event()
    began = time.monotonic()
    replay.run(stop, DriveClock(speed=2.0))
    got = []
    while (msg := receiver.recv(0)) is not None:
        got.append(msg)
    assert [bytes(m.data) for m in got] == [bytes([i]) for i in range(5)]
    assert time.monotonic() - began >= 2.0 / 2.0 * 0.95
    assert replay.sent == 5


def test_python_can_slcan_talks_to_the_emulated_adapter():
    received: list[can.Message] = []
    adapter = SlcanAdapter(on_transmit=received.append)
    path = adapter.open_pty()
    bus = can.Bus(interface="slcan", channel=path, bitrate=500000, sleep_after_open=0)
    try:
        # python-can does not wait for the adapter's replies to S6 and O.
        wait_until(lambda: adapter.bitrate_kbit == 500 and adapter.is_open, 2, message="S6 and O")
        assert bus.get_version(2) == (10, 13)
        assert bus.get_serial_number(2) == "SIM1"
        frames = [
            can.Message(arbitration_id=0x0CF00400, data=bytes.fromhex("F07D7D40150000FF")),
            can.Message(arbitration_id=0x7E8, is_extended_id=False, data=bytes.fromhex("03410D3C")),
            can.Message(arbitration_id=0x18FEF100, is_remote_frame=True, dlc=8),
        ]
        for msg in frames:
            assert adapter.deliver(msg)
        got = [bus.recv(2) for _ in frames]
        for sent, msg in zip(frames, got):
            assert msg is not None
            assert (msg.arbitration_id, msg.is_extended_id, msg.is_remote_frame) == (sent.arbitration_id, sent.is_extended_id, sent.is_remote_frame)
            assert bytes(msg.data) == (b"" if sent.is_remote_frame else bytes(sent.data))
        bus.send(can.Message(arbitration_id=0x7DF, is_extended_id=False, data=bytes.fromhex("02010D5555555555")))
        wait_until(lambda: received, 2, message="the transmitted frame")
        assert received[0].arbitration_id == 0x7DF and bytes(received[0].data) == bytes.fromhex("02010D5555555555")
    finally:
        bus.shutdown()
    wait_until(lambda: not adapter.is_open, 2, message="python-can closing the channel with C")
    assert not adapter.deliver(can.Message(arbitration_id=1, data=b"\x01"))  # a closed channel passes nothing
    adapter.close()


def test_adapter_refuses_what_a_lawicel_adapter_refuses():
    adapter = SlcanAdapter()
    assert adapter.handle("t1232AABB") == b"\a"  # transmit while closed
    assert adapter.handle("S6") == b"\r" and adapter.bitrate_kbit == 500
    assert adapter.handle("S9") == b"\a"
    assert adapter.handle("L") == b"\r" and adapter.listen_only
    assert adapter.handle("t1232AABB") == b"\a"  # listen-only
    assert adapter.handle("S4") == b"\a"  # bit rate while open
    assert adapter.handle("C") == b"\r" and adapter.handle("O") == b"\r"
    assert adapter.handle("t1232AABB") == b"z\r" and adapter.handle("T12345678100") == b"Z\r"
    assert adapter.handle("t12") == b"\a" and adapter.handle("t1233AABB") == b"\a"
    assert adapter.handle("F") == b"F00\r" and adapter.handle("Z1") == b"\r" and adapter.timestamps
    assert adapter.handle("X") == b"\a"


@given(
    st.booleans(),
    st.booleans(),
    st.integers(0, 0x1FFFFFFF),
    st.binary(max_size=8),
)
def test_frame_text_round_trips(extended, remote, arbitration_id, data):
    arbitration_id &= 0x1FFFFFFF if extended else 0x7FF
    msg = can.Message(arbitration_id=arbitration_id, is_extended_id=extended, is_remote_frame=remote,
                      data=None if remote else data, dlc=len(data))
    text = encode_frame(msg)
    assert text.endswith(b"\r") and text[:1] == {(False, False): b"t", (True, False): b"T", (False, True): b"r", (True, True): b"R"}[(extended, remote)]
    back = decode_transmit(text[:-1].decode())
    assert (back.arbitration_id, back.is_extended_id, back.is_remote_frame, back.dlc) == (arbitration_id, extended, remote, len(data))
    if not remote:
        assert bytes(back.data) == data


def test_cli_replays_nmea_and_can_through_two_ptys():
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from sim.cli import main; sys.exit(main())", "replay",
         "--nmea", str(DRIVE.with_suffix(".nmea")), "--can", str(DRIVE.with_suffix(".candump.log")),
         "--start", "30", "--end", "36", "--speed", "2", "--baud", "115200"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        pty_line, slcan_line = proc.stdout.readline(), proc.stdout.readline()
        assert pty_line.startswith("pty: /dev/pts/") and slcan_line.startswith("slcan: /dev/pts/")
        gps = serial.Serial(pty_line.split(": ")[1].strip(), timeout=0.1)
        bus = can.Bus(interface="slcan", channel=slcan_line.split(": ")[1].strip(), bitrate=250000, sleep_after_open=0)
        frames, nmea = [], b""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and b"$GPRMC,083036.00" not in nmea:
            nmea += gps.read(gps.in_waiting or 1)
            while (msg := bus.recv(0)) is not None:
                frames.append(msg)
        bus.shutdown()
        while gps.read(4096):
            pass  # drained: the replay exits
        assert proc.wait(10) == 0
        gps.close()
    finally:
        if proc.poll() is None:
            proc.kill()
    # About 6 s of the drive (minus the moment python-can took to open the channel) at 21 frames/s.
    assert 3 * 21 < len(frames) <= 7 * 21
    assert {m.arbitration_id for m in frames} == {0x0CF00400, 0x18FEF100, 0x18FEF200}


def test_a_can_log_alone_is_cut_by_start_and_end(virtual_channel):
    sender, receiver = virtual_channel(), virtual_channel()
    replay = Replay(None, DRIVE.with_suffix(".candump.log"), can_bus=sender, start_s=10, end_s=12)
    replay.run(speed=50)
    got = []
    while (msg := receiver.recv(0)) is not None:
        got.append(msg)
    # 2 s of the drive (both ends included): 21 EEC1 and CCVS1 frames each, 2-3 LFE1.
    assert 40 <= len(got) <= 46
