"""Credentials of the broker-side MQTT clients (collector, fence server, update and signing services)."""

from __future__ import annotations

import ssl

import paho.mqtt.client as mqtt

from agent.config import TlsConfig


def apply_credentials(client: mqtt.Client, tls: TlsConfig | None, username: str | None = None,
                      password: str | None = None) -> None:
    """Set user name and password (when given) and TLS with server verification (when configured)."""
    if username is not None:
        client.username_pw_set(username, password)
    if tls is not None:
        client.tls_set(ca_certs=tls.ca_file, certfile=tls.cert_file, keyfile=tls.key_file, cert_reqs=ssl.CERT_REQUIRED)
