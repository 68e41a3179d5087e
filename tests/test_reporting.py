"""Adaptive reporting: the profiles' criteria, reports at events, the error bound between reports
(property test), and the fidelity target on the real drives of the corpus."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import ReportingConfig, ReportingProfile
from agent.geo import offset
from agent.processors.reporting import AdaptiveReporter, fidelity_errors_m
from agent.record import Event, Record
from edge_drive import Drive, run

HOME = (59.33, 18.06)


def reported(config: ReportingConfig, records: list[Record]) -> tuple[list[Record], AdaptiveReporter]:
    reporter = AdaptiveReporter(config)
    out = [r for r in run([reporter], records) if r.kind == "fix"] + reporter.flush()
    return out, reporter


def test_straight_constant_speed_is_reported_by_period_only():
    d = Drive(*HOME)
    d.go(0, 6000, 20)  # 300 s due east
    out, reporter = reported(ReportingConfig(), d.records)
    times = [r.utc - d.records[0].utc for r in out]
    assert times == [0, 60, 120, 180, 240, 299]  # the first fix, every period, the last (flush)
    assert reporter.seen == 300 and reporter.reported == len(out)


def test_a_turn_is_reported_where_it_happens():
    d = Drive(*HOME)
    d.go(0, 400, 20).go(400, 0, 20)
    out, _ = reported(ReportingConfig(), d.records)
    corner = offset(*HOME, 0, 400)
    assert min(math.dist((r.data.lat, r.data.lon), corner) for r in out) < 1e-6
    assert max(fidelity_errors_m(d.records, out)) <= ReportingConfig().moving.tolerance_m + 0.01


def test_heading_and_speed_criteria_without_the_error_bound():
    profile = ReportingProfile(period_s=600, heading_deg=30, speed_change_mps=5)
    config = ReportingConfig(moving=profile, parked=profile)
    d = Drive(*HOME)
    d.go(0, 200, 10)
    d.course = 40.0
    d.speed_profile([10.0])  # a 40 degree turn: reported
    d.speed_profile([13.0, 16.0])  # +6 m/s since the turn: the second is reported
    out, _ = reported(config, d.records)
    assert [r.utc - d.records[0].utc for r in out] == [0, 20, 22]


def test_parked_profile_reports_rarely_and_the_switch_to_moving_at_once():
    d = Drive(*HOME)
    d.stay(1800, noise_m=2, rng=random.Random(3))
    start = d.t
    d.go(500, 0, 10)
    out, _ = reported(ReportingConfig(), d.records)
    parked = [r for r in out if r.utc <= start]
    assert len(parked) <= 1 + 1800 // 600 + 1
    assert any(r.utc == start + 1 for r in out)  # first moving fix


def test_the_fix_of_an_event_is_always_reported():
    d = Drive(*HOME)
    d.go(0, 2000, 20)
    cause = d.records[37]
    records = d.records[:37] + [Record(utc=cause.utc, mono=cause.mono, data=Event(type="harsh_brake"))] + d.records[37:]
    out, _ = reported(ReportingConfig(), records)
    assert cause in out


def test_disabled_reports_everything():
    d = Drive(*HOME)
    d.go(0, 500, 10)
    out, _ = reported(ReportingConfig(enabled=False), d.records)
    assert out == d.records[:len(out)] and len(out) == len(d.records)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), tolerance=st.floats(2.0, 20.0), noise=st.floats(0.0, 5.0))
def test_no_fix_strays_further_than_the_tolerance_from_the_reported_track(seed, tolerance, noise):
    rng = random.Random(seed)
    d = Drive(*HOME)
    for _ in range(rng.randint(3, 12)):
        d.course = rng.uniform(0, 360)
        speeds = [max(0.0, rng.gauss(12, 6)) for _ in range(rng.randint(5, 60))]
        d.speed_profile(speeds)
        if rng.random() < 0.3:
            d.stay(rng.randint(5, 120), noise_m=noise, rng=rng)
    profile = ReportingProfile(period_s=120, tolerance_m=tolerance)
    out, _ = reported(ReportingConfig(moving=profile, parked=profile), d.records)
    # The local frame of the check and the haversine of the measure agree to well below a centimetre here.
    assert max(fidelity_errors_m(d.records, out)) <= tolerance + 0.01


@pytest.mark.corpus
@pytest.mark.parametrize("name", ["genivi_munich-gps.nmea", "dotmorten_NmeaSampleData.txt"])
def test_fidelity_on_real_drives(corpus, name):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from bench_reporting import measure

    from agent.config import Config, DeviceConfig

    m = measure(corpus / "drives" / name, Config(device=DeviceConfig(id="t")))
    assert m["fixes"] > 1000
    assert m["p99_m"] <= 10.0 and m["share"] <= 0.20, m
