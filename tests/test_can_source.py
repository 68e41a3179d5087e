"""CanSource on python-can's virtual bus, and on a fault-injecting bus: bus-off, interface down, recovery."""

from __future__ import annotations

import collections
import threading
import uuid

import can
import pytest

from agent.clock import SystemClock
from agent.config import CanBusConfig, CanConfig, CanSignalConfig
from agent.decode.can_log import iter_frames
from agent.sources import can_bus
from agent.sources.can_bus import CAN_ERR_BUSOFF, CanSource
from conftest import wait_until

TRUCK = "can/css_FCBF0606_j1939_truck.derived.candump.log"


def run_source(source: CanSource):
    records, stop = [], threading.Event()
    thread = threading.Thread(target=source.run, args=(records.append, stop))
    thread.start()
    return records, stop, thread


def test_virtual_bus_frames_sent_equal_frames_decoded(corpus):
    channel = f"truck-{uuid.uuid4().hex}"
    config = CanConfig(buses=[CanBusConfig(name="can1", interface="virtual", channel=channel)])
    source = CanSource(config, SystemClock())
    records, stop, thread = run_source(source)
    sender = can.Bus(interface="virtual", channel=channel)
    try:
        wait_until(lambda: source.state == "up", message="the bus open")
        frames = list(iter_frames(corpus / TRUCK))
        for f in frames:
            sender.send(can.Message(arbitration_id=f.id, is_extended_id=f.extended, data=f.data))
        wait_until(lambda: source.stats()["frames"] == len(frames), message="every frame received")
    finally:
        sender.shutdown()
        stop.set()
        thread.join(5)
    stats = source.stats()
    assert stats["frames"] == 1815 and stats["tp_completed"] == 16 and stats["tp_dropped"] == 0
    names = {getattr(r.data, "name", None) for r in records}
    assert {"EngineSpeed", "WheelBasedVehicleSpeed", "EngineCoolantTemperature"} <= names
    assert stats["records"] == len(records) and stats["state"] == "closed"


def test_interfaces_that_cannot_be_opened_listen_only_are_refused_without_allow_transmit():
    bus = CanBusConfig(interface="pcan", channel="PCAN_USBBUS1")
    with pytest.raises(ValueError, match="listen-only"):
        CanSource(CanConfig(buses=[bus]), SystemClock())
    CanSource(CanConfig(allow_transmit=True, buses=[bus]), SystemClock())  # allowed; nothing opened yet
    with pytest.raises(FileNotFoundError):
        CanSource(CanConfig(dbc=["/nonexistent.dbc"]), SystemClock())
    with pytest.raises(ValueError, match="no interface 'sockcan'"):
        CanSource(CanConfig(buses=[CanBusConfig(interface="sockcan")]), SystemClock())


class FaultyBus(can.BusABC):
    """A bus whose faults the test scripts through ``FAULTS``: frames, error frames, the interface down."""

    def __init__(self, channel: str, **kwargs) -> None:
        if FAULTS["down"]:
            raise can.CanInitializationError("[Errno 100] Network is down")
        FAULTS["opened"].append(kwargs)
        self.channel_info = f"faulty {channel}"
        super().__init__(channel=channel, **kwargs)

    def _recv_internal(self, timeout):
        if FAULTS["down"]:
            raise can.CanOperationError("[Errno 100] Network is down")
        queue = FAULTS["queue"]
        if queue:
            return queue.popleft(), False
        threading.Event().wait(min(timeout or 0.01, 0.01))
        return None, False

    def send(self, msg, timeout=None):
        raise can.CanOperationError("listen-only")


FAULTS: dict = {}


@pytest.fixture
def faulty(monkeypatch):
    FAULTS.update(down=False, queue=collections.deque(), opened=[])
    # Registered by name as an entry point would be: python-can checks both tables.
    monkeypatch.setitem(can.interfaces.BACKENDS, "faulty", (__name__, "FaultyBus"))
    monkeypatch.setattr(can.util, "VALID_INTERFACES", can.util.VALID_INTERFACES | {"faulty"})
    monkeypatch.setitem(can_bus.LISTEN_ONLY_ARGS, "faulty", {})
    return FAULTS


def eec1(t: float, rpm: float) -> can.Message:
    raw = round(rpm / 0.125)  # J1939-71 SPN 190: 0.125 rpm/bit
    return can.Message(timestamp=t, arbitration_id=0x0CF00400, data=[0xF0, 0xFF, 0x7D, raw & 0xFF, raw >> 8, 0xFF, 0xFF, 0xFF])


def test_bus_off_and_an_interface_going_down_are_survived(faulty):
    config = CanConfig(buses=[CanBusConfig(interface="faulty", channel="x", reopen_interval_s=0.05)],
                       signals=[CanSignalConfig(signal="EngineSpeed", policy="change")])
    source = CanSource(config, SystemClock())
    records, stop, thread = run_source(source)
    try:
        faulty["queue"].extend([eec1(1.0, 800), eec1(1.1, 900)])
        wait_until(lambda: source.stats()["frames"] == 2, message="two frames")
        # SocketCAN reports bus-off as an error frame with CAN_ERR_BUSOFF in its id (linux/can/error.h).
        faulty["queue"].append(can.Message(timestamp=1.2, arbitration_id=CAN_ERR_BUSOFF, is_error_frame=True))
        wait_until(lambda: source.state == "bus_off", message="bus-off seen")
        faulty["queue"].append(eec1(1.3, 1000))  # the controller restarted (networkd RestartSec)
        wait_until(lambda: source.state == "up" and source.stats()["frames"] == 4, message="back up")
        faulty["down"] = True
        wait_until(lambda: source.state == "down" and source.stats()["failures"] >= 2, message="down, reopen failing")
        faulty["down"] = False
        faulty["queue"].append(eec1(2.0, 1100))
        wait_until(lambda: source.stats()["frames"] == 5, message="a frame after the interface came back")
    finally:
        stop.set()
        thread.join(5)
    stats = source.stats()
    assert stats["error_frames"] == 1 and stats["bus_off"] == 1 and stats["opens"] == 2
    assert [r.data.value for r in records] == [800.0, 900.0, 1000.0, 1100.0]
    assert faulty["opened"] == [{}, {}]  # nothing asked of the controller but listening
