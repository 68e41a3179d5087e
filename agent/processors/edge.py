"""The edge processors in the order records must pass through them, built from the ``edge:`` config.

Order matters: geofences first (stops ask it for the customer stop a stop is in, driving asks it
for the speed zones a fix is in), then stops, trips, idling and driving, which all see every
fix; then trouble codes, fuel level and maintenance; adaptive reporting last, as it drops the fixes it does not report, and it sees the events the
others emitted for a fix just before that fix (so the fix of an event is always reported).
"""

from __future__ import annotations

from pathlib import Path

from agent.config import EdgeConfig
from agent.processors.diagnostics import DiagnosticsMonitor
from agent.processors.driving import DrivingMonitor
from agent.processors.geofence import GeofenceProcessor, GeofenceSet
from agent.processors.idling import IdleDetector
from agent.processors.reporting import AdaptiveReporter
from agent.processors.stops import StopDetector
from agent.processors.trips import TripDetector


class EdgeChain:
    """Geofences, stops, trips, idling, driving and health events, adaptive reporting, wired together.

    ``data_dir`` holds their restart state (None: in memory only, for offline runs). ``fence_set``
    (with its ``fence_version``, e.g. one received remotely) overrides ``config.geofences.file``.
    Raises GeofenceError for an unusable fence file.
    """

    def __init__(self, config: EdgeConfig, data_dir: str | Path | None, fence_set: GeofenceSet | None = None,
                 fence_version: str | None = None) -> None:
        if fence_set is None and config.geofences.file:
            fence_set = GeofenceSet.load(config.geofences.file)
        self.geofences = GeofenceProcessor(config.geofences, data_dir, fence_set, fence_version)
        self.reporter = AdaptiveReporter(config.reporting)
        self.processors = [
            self.geofences,
            StopDetector(config.stops, data_dir, self.geofences.customer_stop_at),
            TripDetector(config.trips, data_dir),
            IdleDetector(config.idling, config.trips.engine_on_rpm, data_dir),
            DrivingMonitor(config.driving, self.geofences.speed_limit_at, data_dir),
            DiagnosticsMonitor(config.diagnostics, data_dir),
            self.reporter,
        ]
