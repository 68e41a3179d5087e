"""In-vehicle telematics agent: GPS, CAN and ignition in; durable, batched MQTT telemetry out."""

__version__ = "0.1.0"
