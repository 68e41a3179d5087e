"""FixFilter: every rejection reason, counted; re-anchoring after a real relocation; a real drive."""

from __future__ import annotations

import pytest

from agent.config import GpsFilterConfig
from agent.decode.nmea import decode_file
from agent.geo import haversine_m
from agent.processors.fix_filter import FixFilter
from agent.record import Event, Fix, Record

GOOD = dict(quality=1, mode=3, status="A", faa_mode="A", hdop=0.9, sats_used=9)
# 10 m/s north: 1e-4 degrees of latitude is 11.1 m.
STEP_DEG = 10.0 / 111_195.0


def rec(utc: float, lat: float = 52.0, lon: float = 4.0, **fields) -> Record:
    return Record(utc=utc, mono=utc, data=Fix(lat=lat, lon=lon, **{**GOOD, **fields}))


def run(fix_filter: FixFilter, records: list[Record]) -> list[Record]:
    return [out for r in records for out in fix_filter.process(r)]


def test_distance_matches_a_known_baseline():
    # One degree of latitude is 111.195 km on the mean sphere; across the antimeridian the short way.
    assert haversine_m(0, 0, 1, 0) == pytest.approx(111_195, rel=1e-4)
    assert haversine_m(0, 179.9, 0, -179.9) == pytest.approx(2 * 11_119.5, rel=1e-3)


@pytest.mark.parametrize(
    "fields, reason",
    [
        (dict(status="V"), "invalid_status"),
        (dict(quality=0), "invalid_quality"),
        (dict(mode=1), "invalid_mode"),
        (dict(faa_mode="N"), "invalid_faa"),
        (dict(hdop=25.0), "hdop"),
        (dict(sats_used=3), "sats"),
    ],
)
def test_the_receivers_own_invalid_flags_and_thresholds(fields, reason):
    fix_filter = FixFilter(GpsFilterConfig())
    assert run(fix_filter, [rec(100.0, **fields)]) == []
    assert fix_filter.counters[reason] == 1 and fix_filter.counters["accepted"] == 0


def test_unknown_values_are_not_rejected():
    fix_filter = FixFilter(GpsFilterConfig())
    bare = Record(utc=1.0, mono=1.0, data=Fix(lat=1.0, lon=2.0))  # an RMC-only receiver says little
    assert run(fix_filter, [bare]) == [bare]


def test_other_records_pass_untouched():
    fix_filter = FixFilter(GpsFilterConfig())
    event = Record(utc=1.0, mono=1.0, data=Event(type="gps_lost"))
    assert run(fix_filter, [event]) == [event]
    assert fix_filter.counters["accepted"] == 0


def test_duplicates_frozen_receiver_and_time_going_backwards():
    fix_filter = FixFilter(GpsFilterConfig())
    records = [
        rec(100.0),
        rec(100.0),  # the same fix again
        rec(100.0, lat=52.0 + STEP_DEG),  # a frozen clock: the position moves, the time does not
        rec(99.0, lat=52.0 + STEP_DEG),
        rec(101.0, lat=52.0 + STEP_DEG),
    ]
    assert [r.utc for r in run(fix_filter, records)] == [100.0, 101.0]
    assert (fix_filter.counters["duplicate"], fix_filter.counters["frozen"], fix_filter.counters["backwards"]) == (1, 1, 1)


def test_a_wrong_date_does_not_stop_the_track_for_good():
    """After a restart the first epoch may lack its RMC and be dated by the host clock: if that date
    is wrong, the receiver's own, earlier, dates that follow are believed after jump_reanchor fixes."""
    fix_filter = FixFilter(GpsFilterConfig(jump_reanchor=3))
    day = 86_400.0
    records = [rec(100.0 + 200 * day)] + [rec(100.0 + i, lat=52.0 + i * STEP_DEG) for i in range(1, 7)]
    kept = run(fix_filter, records)
    assert [r.utc for r in kept] == [100.0 + 200 * day, 103.0, 104.0, 105.0, 106.0]
    assert fix_filter.counters["backwards"] == 2


def test_a_jump_is_rejected_and_the_track_continues():
    fix_filter = FixFilter(GpsFilterConfig(max_speed_mps=70.0))
    records = [rec(100.0), rec(101.0, lat=52.0 + STEP_DEG), rec(102.0, lat=53.0), rec(103.0, lat=52.0 + 3 * STEP_DEG)]
    kept = run(fix_filter, records)
    assert [r.utc for r in kept] == [100.0, 101.0, 103.0]
    assert fix_filter.counters["jump"] == 1


def test_agreeing_jumps_re_anchor_the_track():
    # The truck was moved while the receiver was off: every later fix "jumps" from the old place.
    fix_filter = FixFilter(GpsFilterConfig(max_speed_mps=70.0, jump_reanchor=3))
    moved = [rec(200.0 + i, lat=53.0 + i * STEP_DEG) for i in range(5)]
    kept = run(fix_filter, [rec(100.0)] + moved)
    assert [r.utc for r in kept] == [100.0, 202.0, 203.0, 204.0]
    assert fix_filter.counters["jump"] == 2


def test_future_and_past_only_against_a_trusted_clock():
    now = 1_700_000_000.0
    trusted = FixFilter(GpsFilterConfig(max_future_s=5.0, max_age_s=300.0), trusted_wall=lambda: now)
    kept = run(trusted, [rec(now + 60.0), rec(now - 3600.0), rec(now - 1.0)])
    assert [r.utc for r in kept] == [now - 1.0]
    assert (trusted.counters["future"], trusted.counters["past"]) == (1, 1)
    untrusted = FixFilter(GpsFilterConfig(), trusted_wall=lambda: None)  # a Pi's clock not yet set
    assert len(run(untrusted, [rec(now + 60.0)])) == 1


def test_a_real_drive_keeps_almost_everything_and_loses_no_real_motion(corpus):
    drive = corpus / "drives" / "genivi_munich-gps.nmea"
    fix_filter = FixFilter(GpsFilterConfig())
    fixes = [Record(utc=u, mono=u, data=f) for u, f in decode_file(drive)]
    kept = run(fix_filter, fixes)
    assert 0.7 * len(fixes) < len(kept) < len(fixes)
    assert sum(fix_filter.counters.values()) == len(fixes)
    # What is left is a plausible track: no step faster than the limit, time strictly increasing.
    for a, b in zip(kept, kept[1:]):
        assert b.utc > a.utc
        assert haversine_m(a.data.lat, a.data.lon, b.data.lat, b.data.lon) / (b.utc - a.utc) <= 70.0
    assert fix_filter.counters["backwards"] >= 1  # the capture's timestamp steps back once
