"""OBD-II: service 01/03/09 decoding against the real session and cantools, ISO-TP, and polling an
emulated ECU over python-can's virtual bus."""

from __future__ import annotations

import threading
import uuid

import can
import cantools
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.clock import SystemClock
from agent.config import CanBusConfig, CanConfig, CanSignalConfig, ObdPollConfig
from agent.decode import obd
from agent.decode.can_decoder import FrameDecoder
from agent.decode.can_log import iter_frames
from agent.decode.dtc import obd_code, parse_obd_dtcs
from agent.decode.j1939 import J1939Database
from agent.sources.can_bus import CanSource
from conftest import wait_until

SESSION = "can/css_7512BE4D_obd2_session.derived_bus1.candump.log"
VIN = "TMBJP7NX5NY084923"


def test_service_01_formulas():
    assert obd.decode_answer(bytes([0x41, 0x0C, 0x1A, 0xF8])) == [obd.ObdValue(1, 0x0C, "EngineRPM", 1726.0, "rpm")]
    assert obd.decode_answer(bytes([0x41, 0x05, 0x7B]))[0].value == 83.0
    assert obd.decode_answer(bytes([0x41, 0x0D, 0x32, 0x05, 0x7B]))[1].name == "EngineCoolantTemp"  # two PIDs
    assert obd.decode_answer(bytes([0x41, 0xA6, 0x00, 0x01, 0xE2, 0x40]))[0].value == 12345.6  # 123456 / 10
    assert obd.decode_answer(bytes([0x41, 0x0C, 0x1A])) == []  # truncated
    assert obd.decode_answer(bytes([0x7F, 0x01, 0x12])) == []  # negative response


def test_supported_pid_bitmaps():
    # J1979-DA: bit 7 of byte A is PID 01; the last bit (PID 20) says the next range exists.
    assert obd.supported_pids(bytes([0x41, 0x00, 0x80, 0x00, 0x00, 0x01])) == {0x01, 0x20}
    assert obd.supported_pids(bytes([0x41, 0x20, 0x00, 0x02, 0x00, 0x00])) == {0x2F}


def test_dtc_codes():
    assert obd_code(0x01, 0x33) == "P0133"
    assert obd_code(0xC1, 0x23) == "U0123"
    assert parse_obd_dtcs(bytes([0x00])) == []
    assert parse_obd_dtcs(bytes([0x02, 0x01, 0x33, 0x43, 0x00])) == ["P0133", "C0300"]


@given(st.lists(st.binary(min_size=0, max_size=8), max_size=40), st.lists(st.floats(0, 2), min_size=40, max_size=40))
def test_isotp_random_frames_never_raise_and_never_exceed_the_announced_size(frames, gaps):
    isotp = obd.IsoTpReassembler()
    t = 0.0
    for data, gap in zip(frames, gaps):
        t += gap
        payload = isotp.feed(t, 0x7E8, data)
        assert payload is None or len(payload) <= obd.MAX_MESSAGE
    isotp.expire(t + obd.N_CR_S + 1)
    assert isotp.open_messages == 0


@settings(max_examples=200)
@given(st.binary(min_size=8, max_size=200))
def test_isotp_reassembles_what_was_segmented(payload):
    frames = [bytes([0x10 | (len(payload) >> 8), len(payload) & 0xFF]) + payload[:6]]
    rest, seq = payload[6:], 1
    while rest:
        frames.append(bytes([0x20 | seq]) + rest[:7])
        rest, seq = rest[7:], (seq + 1) & 0x0F
    isotp = obd.IsoTpReassembler()
    results = [isotp.feed(0.0, 0x7E8, f) for f in frames]
    assert results[-1] == payload and all(r is None for r in results[:-1])


@given(st.binary(max_size=16))
def test_decode_answer_never_raises(payload):
    for item in obd.decode_answer(payload):
        assert item.name


def test_the_real_session_every_answered_pid_vin_and_no_codes(corpus):
    decoder = FrameDecoder(J1939Database.load())
    answered, decoded, vins, dtcs = set(), set(), [], []
    for frame in iter_frames(corpus / SESSION):
        if frame.id == 0x7E8 and frame.data[0] >> 4 == 0 and frame.data[1] == 0x41:
            answered.add(frame.data[2])
        for item in decoder.feed(frame.time, frame.bus, frame.id, frame.extended, frame.data):
            if item.kind == "vin":
                vins.append(item.value)
            elif item.kind == "dtcs":
                dtcs.append(item.value)
            elif item.pid is not None:
                decoded.add(item.pid)
    assert len(answered) == 31
    assert answered == decoded
    assert vins == [VIN]  # from a first frame and two consecutive frames
    assert [d.codes for d in dtcs] == [()]


def test_the_real_session_matches_cantools_where_the_dbc_has_the_pid(corpus):
    """Our formulas against the CSS OBD2 DBC (nested multiplexing), on every single-frame service 01 answer."""
    dbc = cantools.database.load_file(str(corpus / "dbc" / "CSS-Electronics-OBD2-v1.4.dbc"))
    message = dbc.get_message_by_frame_id(0x7E8)
    compared = set()
    for frame in iter_frames(corpus / SESSION):
        if frame.id != 0x7E8 or frame.data[0] >> 4 != 0 or frame.data[1] != 0x41:
            continue
        pid = frame.data[2]
        if pid in (0x01, 0x03, 0x13, 0xA4, 0x1C):
            continue  # bit fields and enums, or PIDs the DBC lacks (13, A4)
        ours = obd.decode_answer(frame.data[1 : 1 + frame.data[0]])
        reference = message.decode(bytes(frame.data), decode_choices=False)
        ref_values = {k: v for k, v in reference.items() if k.startswith(f"S1_PID_{pid:02X}_")}
        ref_value = next(iter(ref_values.values()))
        assert ours[0].value == pytest.approx(ref_value, abs=0.01), (pid, ours, ref_values)
        compared.add(pid)
    assert len(compared) >= 24


class EmulatedEcu:
    """An engine ECU on the virtual bus answering ISO 15765-4 requests: 7DF/7E0 -> 7E8, or on 29-bit
    ids 18DB33F1/18DA10F1 -> 18DAF110."""

    VALUES = {0x0C: bytes([0x1A, 0xF8]), 0x0D: bytes([0x32]), 0x05: bytes([0x7B])}
    SUPPORTED = {0x05, 0x0C, 0x0D, 0x20, 0x2F}  # 0x2F is announced but never answered

    def __init__(self, channel: str, extended: bool) -> None:
        self.extended = extended
        self.answer_id, self.requests_to = (0x18DAF110, (0x18DB33F1, 0x18DA10F1)) if extended else (0x7E8, (0x7DF, 0x7E0))
        self.bus = can.Bus(interface="virtual", channel=channel)
        self.requests: list[bytes] = []
        self.flow_controls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.bus.shutdown()

    def _send(self, data: bytes) -> None:
        self.bus.send(can.Message(arbitration_id=self.answer_id, is_extended_id=self.extended,
                                  data=data.ljust(8, b"\xcc")))

    def _answer(self, payload: bytes) -> None:
        if len(payload) <= 7:
            self._send(bytes([len(payload)]) + payload)
            return
        self._send(bytes([0x10 | (len(payload) >> 8), len(payload) & 0xFF]) + payload[:6])
        # ISO 15765-2: wait for the tester's flow control before the consecutive frames.
        while not self._stop.is_set():
            fc = self.bus.recv(0.5)
            if fc is None:
                return  # no flow control: the answer is abandoned, as a real ECU would
            if fc.arbitration_id == self.requests_to[1] and fc.data[0] == 0x30:
                self.flow_controls += 1
                break
        rest, seq = payload[6:], 1
        while rest:
            self._send(bytes([0x20 | seq]) + rest[:7])
            rest, seq = rest[7:], (seq + 1) & 0x0F

    def _serve(self) -> None:
        while not self._stop.is_set():
            msg = self.bus.recv(0.05)
            if msg is None or msg.arbitration_id not in self.requests_to or msg.data[0] >> 4 != 0:
                continue
            request = bytes(msg.data[1 : 1 + msg.data[0]])
            self.requests.append(request)
            service, pid = request[0], request[1] if len(request) > 1 else None
            if service == 0x01 and pid in (0x00, 0x20):
                bits = sum(1 << (32 - (p - pid)) for p in self.SUPPORTED if pid < p <= pid + 32)
                self._answer(bytes([0x41, pid]) + bits.to_bytes(4, "big"))
            elif service == 0x01 and pid in self.VALUES:
                self._answer(bytes([0x41, pid]) + self.VALUES[pid])
            elif service == 0x09 and pid == 0x02:
                self._answer(bytes([0x49, 0x02, 0x01]) + VIN.encode())  # 20 bytes: 3 frames
            elif service == 0x03:
                self._answer(bytes([0x43, 0x03, 0x01, 0x33, 0x04, 0x20, 0xC1, 0x23]))  # 8 bytes: 2 frames


@pytest.mark.parametrize("extended", [False, True], ids=["11-bit", "29-bit"])
def test_polling_an_emulated_ecu_over_the_virtual_bus(extended):
    channel = f"obd-{uuid.uuid4().hex}"
    ecu = EmulatedEcu(channel, extended)
    config = CanConfig(
        allow_transmit=True,
        buses=[CanBusConfig(name="obd", interface="virtual", channel=channel, protocol="obd2")],
        signals=[CanSignalConfig(signal=s, period_s=0.2) for s in ("EngineRPM", "VehicleSpeed", "EngineCoolantTemp")],
        obd=ObdPollConfig(pids=[0x0C, 0x0D, 0x05, 0x2F, 0x5E], period_s=0.05, timeout_s=0.05, max_misses=2,
                          extended_ids=extended),
    )
    source = CanSource(config, SystemClock())
    records, stop = [], threading.Event()
    thread = threading.Thread(target=source.run, args=(records.append, stop))
    thread.start()
    try:
        def names():
            return {getattr(r.data, "name", None) or r.data.type for r in list(records)}

        wait_until(lambda: {"EngineRPM", "VehicleSpeed", "EngineCoolantTemp", "vin", "obd_dtcs"} <= names(),
                   timeout=10, message="signals, VIN and codes from the emulated ECU")
        wait_until(lambda: 0x2F in source.poller.dropped_pids, timeout=5, message="the unanswered PID dropped")
    finally:
        stop.set()
        thread.join(5)
        ecu.close()
    values = {r.data.name: r.data.value for r in records if r.kind == "signal"}
    assert values == {"EngineRPM": 1726.0, "VehicleSpeed": 50.0, "EngineCoolantTemp": 83.0}
    statuses = {r.data.type: r.data.attrs for r in records if r.kind == "status"}
    assert statuses["vin"]["vin"] == VIN
    assert statuses["obd_dtcs"]["codes"] == "P0133 P0420 U0123"
    assert ecu.flow_controls >= 2  # the VIN and the codes were multi-frame answers
    assert source.poller.schedule == {0x05, 0x0C, 0x0D}  # 5E never announced, 2F dropped
    assert not any(r[:2] == bytes([0x01, 0x5E]) for r in ecu.requests)
    assert source.stats()["obd_dropped_pids"] == [0x2F]
