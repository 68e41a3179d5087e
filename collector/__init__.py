"""Broker-side collector: decodes, de-duplicates, stores and acknowledges telemetry."""
