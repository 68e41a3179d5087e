"""The MQTT link: publishes batches from the buffer, frees them on the collector's ack."""
