"""Processors: single-threaded steps between sources and the buffer (thinning, geofences, events)."""
