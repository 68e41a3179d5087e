"""Client certificate renewal over MQTT (docs/certificates.md)."""
