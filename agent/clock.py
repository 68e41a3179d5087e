"""Clocks, injected so that tests and offline replays control time.

Wall time (UTC seconds since the epoch) stamps records when no GPS time is known; monotonic time
measures intervals. Never mix the two.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """Source of wall and monotonic time, in seconds."""

    def wall(self) -> float: ...

    def monotonic(self) -> float: ...


class SystemClock:
    """The host's clocks."""

    def wall(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()
