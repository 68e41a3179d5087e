"""Sampling policies per signal on the frames' own timestamps, and the records CanSampler emits."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.config import CanConfig, CanSignalConfig
from agent.decode.can_log import iter_frames
from agent.decode.dtc import DtcSet
from agent.decode.j1939 import J1939Database, SignalLayout
from agent.record import Signal, Status
from agent.sources.can_sampling import CanSampler

DB = J1939Database.load()
EEC1 = 0x0CF00400
TRUCK = "can/css_FCBF0606_j1939_truck.derived.candump.log"


def eec1(rpm: float) -> bytes:
    raw = round(rpm / 0.125)  # J1939-71 SPN 190: 0.125 rpm/bit
    return bytes([0xF0, 0xFF, 0x7D, raw & 0xFF, raw >> 8, 0xFF, 0xFF, 0xFF])


def sampler(*signals: CanSignalConfig) -> CanSampler:
    return CanSampler(DB, signals, "can0")


def signals_of(records) -> list[tuple[float, str, float | None]]:
    return [(round(r.utc, 6), r.data.name, r.data.value) for r in records if isinstance(r.data, Signal)]


def test_latest_turns_100_hz_into_1_hz_and_decodes_only_when_due(monkeypatch):
    calls = []
    original = SignalLayout.value
    monkeypatch.setattr(SignalLayout, "value", lambda self, payload: calls.append(1) or original(self, payload))
    s = sampler(CanSignalConfig(signal="EngineSpeed", period_s=1.0))
    out = []
    for i in range(1000):  # 10 s at 100 Hz
        out += s.feed(100 + i * 0.01, EEC1, True, eec1(600 + i))
    got = signals_of(out)
    assert len(got) == 10 and len(calls) == 10
    assert got[0] == (100.0, "EngineSpeed", 600.0) and got[1] == (101.0, "EngineSpeed", 700.0)


def test_mean_min_max_over_windows_with_the_mean_rounded_to_the_resolution():
    s = sampler(
        CanSignalConfig(signal="EngineSpeed", policy="mean", period_s=1.0, name="rpm_mean"),
        CanSignalConfig(signal="EngineSpeed", policy="min", period_s=1.0, name="rpm_min"),
        CanSignalConfig(signal="EngineSpeed", policy="max", period_s=1.0, name="rpm_max"),
    )
    out = []
    for t, rpm in [(0.0, 800.0), (0.4, 800.125), (0.8, 800.125), (1.0, 900.0), (1.5, 1000.0)]:
        out += s.feed(t, EEC1, True, eec1(rpm))
    out += s.tick(2.5)
    got = signals_of(out)
    # 800.0833.. rounds to the 0.125 rpm resolution: 800.125; stamped at each window's end.
    assert got == [(1.0, "rpm_mean", 800.125), (1.0, "rpm_min", 800.0), (1.0, "rpm_max", 800.125),
                   (2.0, "rpm_mean", 950.0), (2.0, "rpm_min", 900.0), (2.0, "rpm_max", 1000.0)]


def test_a_window_of_nothing_but_not_available_emits_none():
    s = sampler(CanSignalConfig(signal="EngineSpeed", policy="mean", period_s=1.0))
    out = s.feed(0.0, EEC1, True, bytes.fromhex("F0FF7DFFFFFFFFFF")) + s.tick(1.0)
    assert signals_of(out) == [(1.0, "EngineSpeed", None)]


def test_change_beyond_a_deadband_and_availability_changes():
    s = sampler(CanSignalConfig(signal="EngineSpeed", policy="change", deadband=10.0))
    out = []
    for t, data in [(0, eec1(800)), (1, eec1(805)), (2, eec1(811)), (3, bytes.fromhex("F0FF7DFFFFFFFFFF")),
                    (4, bytes.fromhex("F0FF7DFFFFFFFFFF")), (5, eec1(811))]:
        out += s.feed(t, EEC1, True, data)
    assert signals_of(out) == [(0, "EngineSpeed", 800.0), (2, "EngineSpeed", 811.0), (3, "EngineSpeed", None),
                               (5, "EngineSpeed", 811.0)]


def test_unconfigured_pgns_cost_a_lookup_and_a_source_address_filter_applies(monkeypatch):
    s = sampler(CanSignalConfig(signal="WheelBasedVehicleSpeed", sa=0x47))
    calls = []
    original = SignalLayout.value
    monkeypatch.setattr(SignalLayout, "value", lambda self, payload: calls.append(1) or original(self, payload))
    out = []
    for i in range(100):
        out += s.feed(i, EEC1, True, eec1(900))  # in the DBC, no policy
        out += s.feed(i, 0x18FEF100, True, bytes.fromhex("FF0032FFFFFFFFFF"))  # CCVS1 from 0x00: filtered out
        out += s.feed(i, 0x18FEF147, True, bytes.fromhex("FF0032FFFFFFFFFF"))  # CCVS1 from 0x47
    assert len(calls) == 100 and len(out) == 100


def test_dm1_sets_are_emitted_when_they_change():
    s = sampler()
    frames = [bytes([0x04, 0xFF, 110, 0, 0, 1, 0xFF, 0xFF])] * 3 + [bytes([0x04, 0xFF, 110, 0, 0, 2, 0xFF, 0xFF]),
                                                                   bytes([0x00, 0xFF, 0, 0, 0, 0, 0xFF, 0xFF])]
    out = []
    for t, data in enumerate(frames):
        out += s.feed(float(t), 0x18FECA00, True, data)
    statuses = [r.data for r in out]
    assert all(isinstance(x, Status) and x.type == "dm1" for x in statuses)
    assert [(x.attrs["codes"], x.attrs["occurrences"] if "occurrences" in x.attrs else "") for x in statuses] == [
        ("110-0", "1"), ("110-0", "2"), ("", "")]
    assert s.dtc_sets()[("j1939", 0)] == DtcSet("j1939", "can0", 0, (), (), {
        "mil": "off", "red_stop": "off", "amber_warning": "off", "protect": "off"})


@given(st.lists(st.tuples(st.integers(0, 0x1FFFFFFF), st.booleans(), st.binary(max_size=8), st.floats(0, 1)),
                max_size=60))
def test_random_frames_never_raise(frames):
    s = CanSampler(DB, CanConfig().signals, "can0")
    t = 0.0
    for can_id, extended, data, dt in frames:
        t += dt
        if not extended:
            can_id &= 0x7FF
        for record in s.feed(t, can_id, extended, data):
            assert record.utc <= t + 60  # windows are stamped at their end, never later than a period ahead
    s.tick(math.inf)


def test_truck_capture_through_the_default_policies(corpus):
    s = CanSampler(DB, CanConfig().signals, "can1")
    out = []
    frames = list(iter_frames(corpus / TRUCK))
    for f in frames:
        out += s.feed(f.time, f.id, f.extended, f.data)
    out += s.tick(frames[-1].time + 60)
    names = {r.data.name for r in out if isinstance(r.data, Signal)}
    assert {"EngineSpeed", "WheelBasedVehicleSpeed", "EngineCoolantTemperature", "EngineTotalHoursOfOperation"} <= names
    speeds = [r for r in out if isinstance(r.data, Signal) and r.data.name == "WheelBasedVehicleSpeed"]
    gaps = [b.utc - a.utc for a, b in zip(speeds, speeds[1:])]
    assert min(gaps) >= 0.99 and len(speeds) == pytest.approx(frames[-1].time - frames[0].time, abs=5)
    hours = [r.data.value for r in out if isinstance(r.data, Signal) and r.data.name == "EngineTotalHoursOfOperation"]
    assert hours[0] == 219.2  # 0x1120 * 0.05 h
    vins = [r.data.attrs["vin"] for r in out if isinstance(r.data, Status) and r.data.type == "vin"]
    assert vins == ["1L06130RELP969468"]


def test_a_clock_stepping_back_restarts_the_cadence():
    s = sampler(CanSignalConfig(signal="EngineSpeed", period_s=1.0, name="latest"),
                CanSignalConfig(signal="EngineSpeed", policy="max", period_s=1.0, name="max"))
    out = []
    for t in (1000.0, 1000.5, 1001.0, 1001.5, 10.0, 10.5, 11.0, 11.5):  # the host clock steps back 990 s
        out += s.feed(t, EEC1, True, eec1(t))
    got = signals_of(out)
    assert [g for g in got if g[1] == "latest"] == [(1000.0, "latest", 1000.0), (1001.0, "latest", 1001.0),
                                                    (10.0, "latest", 10.0), (11.0, "latest", 11.0)]
    assert [g for g in got if g[1] == "max"] == [(1001.0, "max", 1000.5), (1002.0, "max", 1001.5),
                                                 (11.0, "max", 10.5)]
