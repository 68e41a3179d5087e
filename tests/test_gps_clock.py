"""ClockCheck: the host clock against GPS time, reported once per state change, optionally set.

``settime`` is injected: a test must never move the shared machine's real clock.
"""

from __future__ import annotations

import logging
import time

from agent.record import Fix, Status
from agent.sources.gps_clock import ClockCheck

GOOD = Fix(lat=52.0, lon=4.0, quality=1, status="A")
GPS = 1_700_000_000.0


def test_within_the_margin_nothing_is_reported_and_the_offset_is_kept():
    check = ClockCheck(margin_s=2.0, set_clock=False)
    assert check.fix(GPS, GPS + 0.4) is None
    assert check.ok is True and check.offset_s == 0.4


def test_an_unset_clock_is_reported_once_then_its_return():
    check = ClockCheck(margin_s=2.0, set_clock=False)
    first = check.fix(GPS, 0.0)  # a Pi that booted in 1970
    assert isinstance(first, Status) and first.type == "clock_offset"
    assert first.attrs == {"offset_s": -GPS, "corrected": False}
    assert check.fix(GPS + 1, 1.0) is None  # still off: no second record
    assert check.ok is False
    back = check.fix(GPS + 2, GPS + 2.1)  # NTP set it
    assert back.type == "clock_ok" and back.attrs == {"offset_s": 0.1}
    assert check.fix(GPS + 3, GPS + 3) is None


def test_set_clock_sets_the_realtime_clock_to_gps_time():
    calls = []
    check = ClockCheck(margin_s=2.0, set_clock=True, settime=lambda clk, t: calls.append((clk, t)))
    status = check.fix(GPS, GPS - 3600.0)
    assert calls == [(time.CLOCK_REALTIME, GPS)]
    assert status.type == "clock_offset" and status.attrs["corrected"] is True
    assert check.ok is True and check.sets == 1


def test_without_the_capability_one_log_line_and_no_repeats(caplog):
    caplog.set_level(logging.INFO, logger="agent.sources.gps_clock")

    def refuse(clk, t):
        raise PermissionError(1, "Operation not permitted")

    check = ClockCheck(margin_s=2.0, set_clock=True, settime=refuse)
    assert check.fix(GPS, 0.0).attrs["corrected"] is False
    for i in range(5):
        assert check.fix(GPS + i, float(i)) is None
    assert sum("cannot set the system clock" in r.getMessage() for r in caplog.records) == 1


def test_only_valid_fixes_are_trusted():
    check = ClockCheck(margin_s=2.0, set_clock=False)
    assert check.check(GPS, Fix(lat=0.0, lon=0.0, status="V"), 0.0, 5.0) is None
    assert check.ok is None
    record = check.check(GPS, GOOD, 0.0, 5.0)
    assert record.utc == GPS and record.mono == 5.0 and record.data.type == "clock_offset"
