"""Wire formats of telemetry batches, shared by the agent (encode) and the collector (decode)."""
