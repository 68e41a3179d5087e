"""The buffered slcan interface: line parsing, and an slcan adapter emulated on a pty in another process."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import can
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.can_interfaces.slcan_buffered import BufferedSlcanBus, format_frame, parse_line
from agent.clock import SystemClock
from agent.config import CanBusConfig, CanConfig
from agent.decode.can_log import iter_frames
from agent.sources.can_bus import CanSource
from conftest import wait_until

EMULATOR = Path(__file__).resolve().parent / "can_slcan_emulator.py"
TRUCK = "can/css_FCBF0606_j1939_truck.derived.candump.log"


def test_parse_line_frames_and_replies():
    msg = parse_line(b"T18FEF1478FF0000FFFFFFFFFF", 5.0)
    assert (msg.arbitration_id, msg.is_extended_id, bytes(msg.data), msg.timestamp) == (
        0x18FEF147, True, bytes.fromhex("FF0000FFFFFFFFFF"), 5.0)
    msg = parse_line(b"t7E8803410D32CCCCCCCC1A2B", 0.0)  # a 4-digit time stamp after the data (Z1)
    assert (msg.arbitration_id, msg.is_extended_id, bytes(msg.data)) == (0x7E8, False, bytes.fromhex("03410D32CCCCCCCC"))
    assert parse_line(b"r1232", 0.0).is_remote_frame
    assert parse_line(b"z", 0.0) is None and parse_line(b"V1013", 0.0) is None
    with pytest.raises(ValueError):
        parse_line(b"T18FEF1478FF00", 0.0)


@given(st.integers(0, 0x1FFFFFFF), st.booleans(), st.binary(max_size=8))
def test_format_and_parse_round_trip(can_id, extended, data):
    if not extended:
        can_id &= 0x7FF
    msg = can.Message(arbitration_id=can_id, is_extended_id=extended, data=data)
    back = parse_line(format_frame(msg).encode(), 0.0)
    assert (back.arbitration_id, back.is_extended_id, bytes(back.data)) == (can_id, extended, data)


@given(st.binary(max_size=40))
def test_garbage_lines_raise_only_what_the_reader_catches(line):
    try:
        parse_line(line or b"?", 0.0)
    except (ValueError, IndexError):
        pass


class Emulator:
    """tests/can_slcan_emulator.py in its own process."""

    def __init__(self, link: Path, capture: Path, rounds: int = 1, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(EMULATOR), "--link", str(link), "--capture", str(capture), "--rounds", str(rounds),
             *extra],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def read(self) -> str:
        return self.proc.stdout.readline().strip()

    def unplug(self) -> None:
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)


def test_frames_sent_equal_frames_received_and_the_open_is_listen_only(tmp_path, corpus):
    link = tmp_path / "ttyACM0"
    emulator = Emulator(link, corpus / TRUCK)
    try:
        wait_until(link.exists, timeout=10, message="the emulated adapter")
        bus = can.Bus(interface="slcan_buffered", channel=str(link), bitrate=250000)
        try:
            assert isinstance(bus, BufferedSlcanBus)
            assert emulator.read() == "open listen_only=True bitrate=250"
            received = []
            while len(received) < 1815:
                msg = bus.recv(timeout=5)
                assert msg is not None, f"only {len(received)} frames arrived"
                received.append((msg.arbitration_id, msg.is_extended_id, bytes(msg.data)))
            assert emulator.read() == "sent 1815"
            with pytest.raises(can.CanOperationError):
                bus.send(can.Message(arbitration_id=0x7DF, is_extended_id=False, data=b"\x02\x01\x00"))
        finally:
            bus.shutdown()
        expected = [(f.id, f.extended, f.data) for f in iter_frames(corpus / TRUCK)]
        assert received == expected
    finally:
        emulator.close()


def test_can_source_survives_the_adapter_unplugged_and_replugged(tmp_path, corpus):
    link = tmp_path / "ttyACM0"
    emulator = Emulator(link, corpus / TRUCK, rounds=2)
    config = CanConfig(buses=[CanBusConfig(name="can1", interface="slcan_buffered", channel=str(link),
                                           bitrate=250000, reopen_interval_s=0.1)])
    source = CanSource(config, SystemClock())
    records, stop = [], threading.Event()
    thread = threading.Thread(target=source.run, args=(records.append, stop))
    thread.start()
    try:
        assert emulator.read() == "open listen_only=True bitrate=250"
        assert emulator.read() == "sent 1815"
        wait_until(lambda: source.stats()["frames"] == 1815, timeout=10, message="every frame of round 1")
        emulator.unplug()
        assert emulator.read() == "open listen_only=True bitrate=250"
        assert emulator.read() == "sent 1815"
        wait_until(lambda: source.stats()["frames"] == 2 * 1815, timeout=10, message="every frame after replugging")
        stats = source.stats()
        assert stats["opens"] == 2 and stats["failures"] >= 1 and stats["state"] == "up"
        assert stats["tp_completed"] == 2 * 16
        vins = [r for r in records if r.kind == "status" and r.data.type == "vin"]
        assert len(vins) == 1  # the same VIN again after replugging is not news
        emulator.unplug()
        assert emulator.read() == "done"
    finally:
        stop.set()
        thread.join(5)
        emulator.close()
    assert not thread.is_alive()


def test_the_bit_rate_is_detected_listen_only(tmp_path, corpus):
    link = tmp_path / "ttyACM0"
    emulator = Emulator(link, corpus / TRUCK, 1, "--bitrate-kbit", "500")
    config = CanConfig(buses=[CanBusConfig(name="can1", interface="slcan_buffered", channel=str(link), bitrate=0,
                                           reopen_interval_s=0.1)])
    source = CanSource(config, SystemClock())
    wait_until(link.exists, timeout=10, message="the emulated adapter")
    records, stop = [], threading.Event()
    thread = threading.Thread(target=source.run, args=(records.append, stop))
    thread.start()
    try:
        # 250 kbit/s is tried first and hears nothing for a second; 500 kbit/s hears the truck.
        assert emulator.read() == "open listen_only=True bitrate=500"
        assert emulator.read() == "sent 1815"
        wait_until(lambda: source.stats()["frames"] == 1815, timeout=10, message="every frame at 500 kbit/s")
        assert source.stats()["bitrate"] == 500000
        emulator.unplug()
    finally:
        stop.set()
        thread.join(5)
        emulator.close()


@pytest.mark.slow
def test_soak_many_unplugs_with_frames_in_flight(tmp_path, corpus):
    """Five plug-ins of 20 x the truck capture each: every frame sent is counted, nothing is left open."""
    link = tmp_path / "ttyACM0"
    rounds, repeat = 5, 20
    emulator = Emulator(link, corpus / TRUCK, rounds, "--repeat", str(repeat))
    config = CanConfig(buses=[CanBusConfig(name="can1", interface="slcan_buffered", channel=str(link),
                                           bitrate=250000, reopen_interval_s=0.05)])
    source = CanSource(config, SystemClock())
    records, stop = [], threading.Event()
    thread = threading.Thread(target=source.run, args=(records.append, stop))
    thread.start()
    try:
        for n in range(1, rounds + 1):
            assert emulator.read() == "open listen_only=True bitrate=250"
            assert emulator.read() == f"sent {1815 * repeat}"
            wait_until(lambda: source.stats()["frames"] == n * 1815 * repeat, timeout=30, message=f"round {n}")
            emulator.unplug()
        assert emulator.read() == "done"
    finally:
        stop.set()
        thread.join(5)
        emulator.close()
    stats = source.stats()
    assert stats["opens"] == rounds and stats["tp_completed"] == rounds * repeat * 16 and stats["tp_dropped"] == 0
    assert source.sampler.decoder.tp("can1").open_sessions == 0
