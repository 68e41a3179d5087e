"""Fix-quality filter: drop at the edge what a fleet server would otherwise have to clean up.

A :class:`FixFilter` passes every record that is not a fix, and a fix only when the receiver says it
is valid and it is plausible: enough satellites, a small enough HDOP, a time after the last accepted
fix (not repeated: a frozen receiver repeats its time), no jump (implied speed from the last accepted
fix beyond ``max_speed_mps``), and, when the wall clock is trusted, a time that is neither in the
future nor far in the past. Every rejection is counted by reason in :attr:`FixFilter.counters`
(read by the status output). Thresholds: the ``gps.filter`` section of the config.
"""

from __future__ import annotations

from typing import Callable, Iterable

from agent.config import GpsFilterConfig
from agent.decode.nmea import invalid_reason
from agent.geo import haversine_m
from agent.record import Fix, Record

# Time going back by more than this is a re-dating, not a receiver's hiccup (see _reason).
REDATE_S = 60.0

REASONS = (
    "invalid_status", "invalid_quality", "invalid_mode", "invalid_faa", "hdop", "sats",
    "future", "past", "duplicate", "frozen", "backwards", "jump",
)


class FixFilter:
    """A :class:`agent.pipeline.Processor` for fixes; ``trusted_wall`` returns the wall time when the
    host clock is trusted, else None (offline processing passes None: the capture's own clock)."""

    def __init__(self, config: GpsFilterConfig, trusted_wall: Callable[[], float | None] | None = None) -> None:
        self.config = config
        self._trusted_wall = trusted_wall
        self.counters: dict[str, int] = {"accepted": 0, **{reason: 0 for reason in REASONS}}
        self._last: Record | None = None
        self._jumps: list[Record] = []  # consecutive fixes rejected as jumps or re-datings, for re-anchoring

    def process(self, record: Record) -> Iterable[Record]:
        """Pass ``record`` on, or nothing when it is a fix that fails a check."""
        if not isinstance(record.data, Fix):
            return (record,)
        return (record,) if self.accept(record) else ()

    def accept(self, record: Record) -> bool:
        """Check one fix record; count and remember the outcome."""
        reason = self._reason(record)
        if reason is None:
            self.counters["accepted"] += 1
            self._last = record
            self._jumps.clear()
            return True
        self.counters[reason] += 1
        return False

    def _reason(self, record: Record) -> str | None:
        fix: Fix = record.data  # type: ignore[assignment]
        cfg = self.config
        reason = invalid_reason(fix)
        if reason is not None:
            return reason
        if fix.hdop is not None and fix.hdop > cfg.max_hdop:
            return "hdop"
        if fix.sats_used is not None and fix.sats_used < cfg.min_sats:
            return "sats"
        now = self._trusted_wall() if self._trusted_wall is not None else None
        if now is not None:
            if record.utc > now + cfg.max_future_s:
                return "future"
            if record.utc < now - cfg.max_age_s:
                return "past"
        last = self._last
        if last is None:
            return None
        prev: Fix = last.data  # type: ignore[assignment]
        dt = record.utc - last.utc
        if dt == 0:
            return "duplicate" if (fix.lat, fix.lon) == (prev.lat, prev.lon) else "frozen"
        if dt < 0:
            # A step back of seconds is a receiver's hiccup: wait until time passes the last fix. A
            # step back of more than REDATE_S means the last fix's time was the wrong one (an epoch
            # dated by the host clock before the receiver's own date arrived): re-anchor like a jump.
            return self._reanchor(record, "backwards") if -dt > REDATE_S else "backwards"
        if haversine_m(prev.lat, prev.lon, fix.lat, fix.lon) / dt > cfg.max_speed_mps:
            return self._reanchor(record, "jump")
        return None

    def _reanchor(self, record: Record, reason: str) -> str | None:
        """``reason`` for a fix that breaks with the last accepted one, until ``jump_reanchor`` such
        fixes in a row agree with each other: then the track is believed to continue from them."""
        # A real relocation (a truck ferried or towed while the receiver was off) looks like a jump
        # that the following fixes agree with; a wrong earlier date like time going backwards.
        fix: Fix = record.data  # type: ignore[assignment]
        if self._jumps:
            ref = self._jumps[-1]
            ref_fix: Fix = ref.data  # type: ignore[assignment]
            dt = record.utc - ref.utc
            agrees = dt > 0 and haversine_m(ref_fix.lat, ref_fix.lon, fix.lat, fix.lon) / dt <= self.config.max_speed_mps
            if not agrees:
                self._jumps.clear()
        self._jumps.append(record)
        if len(self._jumps) >= self.config.jump_reanchor:
            return None
        return reason
