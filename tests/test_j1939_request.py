"""J1939 requests (PGN 59904): the frame, the request schedule on a fake clock, and the agent asking
an emulated truck ECU over python-can's virtual bus for its VIN (answered by BAM) and engine hours.

The ECU is a stand-in for a truck, which cannot exist here: it answers Requests the way J1939-21
and J1939-71 describe (a BAM for the 18-byte VIN, a single frame for engine hours) and records
every frame it receives, so a test can see exactly what the agent put on the bus.
"""

from __future__ import annotations

import re
import threading
import time
import uuid

import can
import msgspec
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from agent.config import (CanBusConfig, CanConfig, CanSignalConfig, ConfigError, J1939Config, J1939RequestConfig,
                          parse_config)
from agent.decode.j1939 import make_id, split_id
from agent.decode.j1939_tp import CM_CTS, CM_EOM_ACK, PGN_TP_CM, PGN_TP_DT
from agent.decode.j1939_request import (PGN_REQUEST, REQUEST_GAP_S, RESPONSE_TIMEOUT_S, J1939Requester,
                                        request_frame)
from agent.sources.can_bus import CanSource
from conftest import REPO, wait_until
from test_j1939_tp import bam, packets_of
from test_j1939_tp_receiver import rts_window

VIN = "1FUJGLDR5CLBP8834"
PGN_VI, PGN_HOURS, PGN_VD = 65260, 65253, 65248
ENGINE = 0x00
AGENT = 0xFB


# -- the frame ---------------------------------------------------------------------------------------


def test_request_frame_for_the_vin():
    assert request_frame(PGN_VI, 0xFB) == (0x18EAFFFB, bytes([0xEC, 0xFE, 0x00]))
    assert request_frame(PGN_HOURS, 0xF9, da=0x00) == (0x18EA00F9, bytes([0xE5, 0xFE, 0x00]))
    for sa in (0xFE, 0xFF, -1):
        with pytest.raises(ValueError, match="may not send a request"):
            request_frame(PGN_VI, sa)


@given(st.integers(0, 0x3FFFF), st.integers(0, 0xFD), st.integers(0, 0xFF))
def test_request_frames_split_back_into_what_was_asked(pgn, sa, da):
    can_id, data = request_frame(pgn, sa, da)
    assert split_id(can_id) == (6, PGN_REQUEST, sa, da)
    assert len(data) == 3 and int.from_bytes(data, "little") == pgn


# -- the schedule (a fake clock: the test says what time it is) --------------------------------------


def asked(requester: J1939Requester, now: float) -> int | None:
    request = requester.next_request(now)
    return None if request is None else int.from_bytes(request[1], "little")


def test_every_pgn_at_start_then_backoff_until_answered_then_refresh_or_never():
    r = J1939Requester({PGN_VI: 0.0, PGN_HOURS: 60.0, PGN_VD: 60.0}, sa=AGENT, retry_s=5.0, retry_max_s=20.0)
    # At start, all three, never two within REQUEST_GAP_S.
    assert asked(r, 0.0) == PGN_VD and asked(r, 0.1) is None
    assert asked(r, REQUEST_GAP_S) == PGN_HOURS and asked(r, 2 * REQUEST_GAP_S) == PGN_VI
    assert asked(r, 3 * REQUEST_GAP_S) is None
    r.heard(PGN_VI, 0x00, 2.0)
    r.heard(PGN_HOURS, 0x00, 2.0)
    # VD unanswered: again after 5, 10, 20, 20 s (capped); the VIN never again; the hours 60 s after
    # their answer, then (no answer this time) with the same backoff.
    sent = [(t, pgn) for t in (n / 10 for n in range(0, 1000)) if (pgn := asked(r, t)) is not None]
    assert [t for t, pgn in sent if pgn == PGN_VD] == [5.0, 15.0, 35.0, 55.0, 75.0, 95.0]
    assert [t for t, pgn in sent if pgn == PGN_HOURS] == [62.0, 67.0, 77.0, 97.0]
    assert r.requests(PGN_VI) == 1 and r.answered == {PGN_VI, PGN_HOURS}
    # Answered at last: the next request is the refresh, and its backoff starts over at retry_s.
    r.heard(PGN_VD, 0x17, 96.0)
    assert [t for t in (n / 10 for n in range(960, 2000)) if asked(r, t) == PGN_VD] == [156.0, 161.0, 171.0, 191.0]


def test_a_pgn_broadcast_anyway_is_never_asked_for():
    r = J1939Requester({PGN_HOURS: 60.0}, sa=AGENT)
    assert asked(r, 0.0) == PGN_HOURS
    for t in range(1, 300):
        r.heard(PGN_HOURS, 0x00, float(t))  # the engine sends it every second
        assert asked(r, float(t)) is None


def test_retries_are_never_closer_than_the_response_timeout():
    r = J1939Requester({PGN_VI: 0.0}, sa=AGENT, retry_s=0.1, retry_max_s=0.2)
    assert asked(r, 0.0) == PGN_VI
    assert asked(r, RESPONSE_TIMEOUT_S - 0.01) is None and asked(r, RESPONSE_TIMEOUT_S) == PGN_VI


def ack(control: int, pgn: int, acknowledged: int = 0xFF) -> bytes:
    """J1939-21 §5.4.4 Acknowledgment data: control, group function, 0xFF, 0xFF, address, PGN."""
    return bytes([control, 0xFF, 0xFF, 0xFF, acknowledged]) + pgn.to_bytes(3, "little")


def test_destination_specific_requests_count_only_the_destination_and_stop_on_a_refusal():
    r = J1939Requester({PGN_VI: 0.0, PGN_HOURS: 60.0}, sa=AGENT, da=ENGINE, retry_s=2.0)
    assert asked(r, 0.0) == PGN_HOURS and r.next_request(0.5)[0] == 0x18EA00FB
    r.heard(PGN_VI, 0x03, 1.0)  # the transmission's VIN is not the engine's answer
    r.acknowledgement(ENGINE, AGENT, ack(1, PGN_HOURS, acknowledged=0xF9))  # a NACK to another tool
    r.acknowledgement(ENGINE, AGENT, ack(3, PGN_HOURS))  # busy: ask again later
    r.acknowledgement(0x03, AGENT, ack(1, PGN_HOURS))  # not the destination
    assert r.refused == set() and r.answered == set()
    r.acknowledgement(ENGINE, 0xFF, ack(1, PGN_VI))  # NACK to global (older revisions)
    r.acknowledgement(ENGINE, AGENT, ack(2, PGN_HOURS, acknowledged=AGENT))  # access denied
    assert r.refused == {PGN_VI, PGN_HOURS}
    assert all(asked(r, t / 10) is None for t in range(10, 10000))


def test_a_nack_to_a_global_request_is_not_a_refusal():
    r = J1939Requester({PGN_VI: 0.0}, sa=AGENT, retry_s=2.0)
    assert asked(r, 0.0) == PGN_VI
    r.acknowledgement(ENGINE, 0xFF, ack(1, PGN_VI))  # one ECU lacks it; another may have it
    assert r.refused == set() and asked(r, 2.0) == PGN_VI


# -- the config ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("j1939, error", [
    ({"source_address": 254}, "can.j1939: source_address 254 is the null address"),
    ({"source_address": 255}, "can.j1939: source_address 255 is the global address"),
    ({"source_address": 256}, "can.j1939.source_address: expected int <= 255"),
    ({"destination": 0xFB}, "destination 251 is the agent's own source_address"),
    ({"retry_s": 1.0}, "can.j1939.retry_s: expected float >= 1.25"),
    ({"retry_s": 10.0, "retry_max_s": 5.0}, "retry_max_s 5.0 is below retry_s 10.0"),
    ({"requests": [{"pgn": 65260}, {"pgn": 65260, "refresh_s": 5}]}, "PGN 65260 listed more than once"),
    ({"requests": [{"pgn": 0x40000}]}, "can.j1939.requests.0.pgn: expected int <= 262143"),
    ({"requests": [{"pgn": 65260, "refresh": 5}]}, "can.j1939.requests.0.refresh: unknown key"),
    ({"source_adress": 249}, "can.j1939.source_adress: unknown key"),
])
def test_config_errors_name_the_key(j1939, error):
    with pytest.raises(ConfigError, match=re.escape(error)):
        parse_config(yaml.safe_dump({"device": {"id": "t"}, "can": {"j1939": j1939}}))


def _defaults() -> dict:
    return msgspec.to_builtins(J1939Config())


def test_the_documented_j1939_sections_show_every_key_with_its_default():
    # docs/can.md's configuration block, and the commented truck example of agent.example.yaml.
    docs = (REPO / "docs" / "can.md").read_text()
    block = yaml.safe_load(re.search(r"```yaml\n(can:\n.*?)```", docs, re.S).group(1))
    assert block["can"]["j1939"] == _defaults()
    example = (REPO / "firmware_config" / "agent.example.yaml").read_text()
    truck = re.search(r"# A truck.*?\n((?:#   .*\n)+)", example).group(1)
    truck_yaml = yaml.safe_load("\n".join(line[4:] for line in truck.splitlines()))
    config = parse_config(yaml.safe_dump({"device": {"id": "t"}, **truck_yaml}))
    assert truck_yaml["can"]["j1939"] == _defaults() and config.can.j1939 == J1939Config()


# -- the agent on a virtual bus, against an emulated truck ECU ---------------------------------------


class ShiftedClock:
    """The host's clocks, with monotonic time the test can move forward (retries without waiting)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def wall(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic() + self.offset


class EmulatedTruckEcu:
    """An engine ECU (source address 0) on the virtual bus: answers a Request for 65260 with the VIN,
    by BAM to a global request (TP.CM to global, then TP.DT packets 50 ms apart, J1939-21
    §5.10.2.4) and by RTS/CTS to one sent to it (two packets per CTS, then it waits for the
    acknowledgement), and a Request for 65253 with one frame; other PGNs go unanswered. Every frame
    it receives is kept in ``received``."""

    HOURS = (round(12345.6 / 0.05)).to_bytes(4, "little") + bytes([0xFF] * 4)  # SPN 247: 0.05 h/bit

    def __init__(self, channel: str) -> None:
        self.bus = can.Bus(interface="virtual", channel=channel)
        self.received: list[can.Message] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def requested(self, pgn: int) -> list[can.Message]:
        return [m for m in list(self.received)
                if split_id(m.arbitration_id)[1] == PGN_REQUEST and int.from_bytes(m.data[:3], "little") == pgn]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.bus.shutdown()

    def send(self, can_id: int, data: bytes) -> None:
        self.bus.send(can.Message(arbitration_id=can_id, is_extended_id=True, data=data))

    def _serve(self) -> None:
        while not self._stop.is_set():
            msg = self.bus.recv(0.05)
            if msg is None:
                continue
            self.received.append(msg)
            _, pgn, sa, da = split_id(msg.arbitration_id)
            if pgn != PGN_REQUEST or da not in (ENGINE, 0xFF):
                continue
            wanted = int.from_bytes(msg.data[:3], "little")
            payload = (VIN + "*").encode()  # J1939-71 SPN 237: ASCII, "*"-delimited
            if wanted == PGN_VI and da == 0xFF:
                packets = packets_of(payload)
                self.send(0x1CECFF00, bam(len(payload), len(packets), PGN_VI))
                for packet in packets:
                    self._stop.wait(0.05)
                    self.send(0x1CEBFF00, packet)
            elif wanted == PGN_VI:
                self._rts_cts(sa, payload)
            elif wanted == PGN_HOURS:
                self.send(0x18FEE500, self.HOURS)

    def _rts_cts(self, to: int, payload: bytes) -> None:
        packets = packets_of(payload)
        self.send(make_id(PGN_TP_CM, ENGINE, 7, to), rts_window(len(payload), len(packets), PGN_VI, 2))
        while (cts := self._expect(to, CM_CTS)) is not None:
            count, first = cts.data[1], cts.data[2]
            for packet in packets[first - 1 : first - 1 + count]:
                self.send(make_id(PGN_TP_DT, ENGINE, 7, to), packet)
            if first - 1 + count >= len(packets):
                self._expect(to, CM_EOM_ACK)
                return

    def _expect(self, sender: int, control: int) -> can.Message | None:
        """The next TP.CM frame of ``control`` from ``sender``; None after J1939-21's T3 (1.25 s)."""
        deadline = time.monotonic() + 1.25
        while time.monotonic() < deadline and not self._stop.is_set():
            msg = self.bus.recv(0.05)
            if msg is not None:
                self.received.append(msg)
                if split_id(msg.arbitration_id)[1:3] == (PGN_TP_CM, sender) and msg.data[0] == control:
                    return msg
        return None


def run_agent(config: CanConfig, clock: ShiftedClock):
    source = CanSource(config, clock)
    records, stop = [], threading.Event()
    thread = threading.Thread(target=source.run, args=(records.append, stop))
    thread.start()
    return source, records, stop, thread


def truck_config(channel: str, allow_transmit: bool, j1939: J1939Config | None = None) -> CanConfig:
    return CanConfig(allow_transmit=allow_transmit,
                     buses=[CanBusConfig(name="truck", interface="virtual", channel=channel)],
                     signals=[CanSignalConfig(signal="EngineTotalHoursOfOperation", period_s=0.1)],
                     j1939=j1939 or J1939Config())


def test_the_agent_asks_the_truck_for_its_vin_and_hours_and_stops_or_slows_once_answered():
    channel = f"j1939-{uuid.uuid4().hex}"
    ecu = EmulatedTruckEcu(channel)
    clock = ShiftedClock()
    source, records, stop, thread = run_agent(truck_config(channel, allow_transmit=True), clock)
    try:
        wait_until(lambda: all(ecu.requested(p) for p in (PGN_VI, PGN_HOURS, PGN_VD)), message="three requests")
        wait_until(lambda: {PGN_VI, PGN_HOURS} <= source.requester.answered, message="VIN and hours answered")
        for msg in ecu.received:
            assert msg.is_extended_id and msg.arbitration_id == 0x18EAFFFB and len(msg.data) == 3
        assert [bytes(ecu.requested(p)[0].data) for p in (PGN_VI, PGN_HOURS, PGN_VD)] == [
            bytes([0xEC, 0xFE, 0x00]), bytes([0xE5, 0xFE, 0x00]), bytes([0xE0, 0xFE, 0x00])]
        # Five seconds on (retry_s): vehicle distance, unanswered, is asked again; then after ten more.
        clock.offset += 5.0
        wait_until(lambda: len(ecu.requested(PGN_VD)) == 2, message="VD asked again")
        clock.offset += 10.0
        wait_until(lambda: len(ecu.requested(PGN_VD)) == 3, message="VD asked a third time")
        # A minute after the answer (refresh_s): the hours again; the VIN never.
        clock.offset += 60.0
        wait_until(lambda: len(ecu.requested(PGN_HOURS)) == 2, message="hours refreshed")
        stop.set()
        thread.join(5)
        stats = source.stats()
        wait_until(lambda: len(ecu.received) == stats["sent"], message="the ECU received all the agent sent")
    finally:
        stop.set()
        thread.join(5)
        ecu.close()
    assert len(ecu.requested(PGN_VI)) == 1
    assert stats["j1939_answered_pgns"] == [PGN_HOURS, PGN_VI]
    vins = [r.data.attrs for r in records if r.kind == "status" and r.data.type == "vin"]
    assert vins == [{"vin": VIN, "bus": "truck", "ecu": ENGINE, "protocol": "j1939"}]
    hours = {r.data.value for r in records if r.kind == "signal" and r.data.name == "EngineTotalHoursOfOperation"}
    assert hours == {12345.6}


def test_listen_only_the_agent_puts_nothing_on_the_bus():
    channel = f"j1939-{uuid.uuid4().hex}"
    ecu = EmulatedTruckEcu(channel)
    clock = ShiftedClock()
    source, records, stop, thread = run_agent(truck_config(channel, allow_transmit=False), clock)
    try:
        wait_until(lambda: source.state == "up", message="the bus open")
        for n in range(1, 4):
            clock.offset += 400.0  # past every retry and refresh period
            ecu.send(0x18FEE500, EmulatedTruckEcu.HOURS)  # the engine broadcasting on its own
            wait_until(lambda: source.stats()["frames"] == n, message=f"frame {n} received")
        stats = source.stats()
    finally:
        stop.set()
        thread.join(5)
        ecu.close()
    assert ecu.received == [] and stats["sent"] == 0
    assert source.requester is None and "j1939_answered_pgns" not in stats
    assert {r.data.value for r in records if r.kind == "signal"} == {12345.6}  # passive decoding as before


def test_no_requests_on_obd2_buses_or_with_an_empty_list():
    obd2 = CanConfig(allow_transmit=True, buses=[CanBusConfig(interface="virtual", protocol="obd2")])
    empty = CanConfig(allow_transmit=True, buses=[CanBusConfig(interface="virtual")],
                      j1939=J1939Config(requests=[]))
    one = CanConfig(allow_transmit=True, buses=[CanBusConfig(interface="virtual")],
                    j1939=J1939Config(requests=[J1939RequestConfig(pgn=PGN_VI)]))
    assert [CanSource(c, ShiftedClock()).requesting for c in (obd2, empty, one)] == [False, False, True]



def test_asked_destination_specifically_the_ecu_answers_by_rts_cts_and_the_agent_sends_the_ctss():
    channel = f"j1939-{uuid.uuid4().hex}"
    ecu = EmulatedTruckEcu(channel)
    j1939 = J1939Config(destination=ENGINE, requests=[J1939RequestConfig(pgn=PGN_VI)])
    source, records, stop, thread = run_agent(truck_config(channel, True, j1939), ShiftedClock())
    try:
        wait_until(lambda: any(r.kind == "status" and r.data.type == "vin" for r in list(records)),
                   message="the VIN by RTS/CTS")
        wait_until(lambda: any(m.data[0] == CM_EOM_ACK for m in list(ecu.received)), message="the acknowledgement")
    finally:
        stop.set()
        thread.join(5)
        ecu.close()
    request, *session = ecu.received
    assert (request.arbitration_id, bytes(request.data)) == (0x18EA00FB, bytes([0xEC, 0xFE, 0x00]))
    vi = bytes([0xEC, 0xFE, 0x00])
    assert [(m.arbitration_id, bytes(m.data)) for m in session] == [
        (0x1CEC00FB, bytes([17, 2, 1, 0xFF, 0xFF]) + vi),  # CTS: packets 1-2
        (0x1CEC00FB, bytes([17, 1, 3, 0xFF, 0xFF]) + vi),  # CTS: packet 3
        (0x1CEC00FB, bytes([19, 18, 0, 3, 0xFF]) + vi),  # end of message: 18 bytes, 3 packets
    ]
    assert [r.data.attrs["vin"] for r in records if r.kind == "status"] == [VIN]
    assert source.requester.answered == {PGN_VI} and len(ecu.requested(PGN_VI)) == 1
