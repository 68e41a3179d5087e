"""The collector's YAML configuration (``telematics-collector run --config FILE``); unknown keys are errors.

Command-line options override the file; without a file every key has its default::

    mqtt:
      host: 127.0.0.1
      port: 1883
      topic_prefix: telematics
    store:
      sqlite_path: collector.sqlite
"""

from __future__ import annotations

from pathlib import Path

import msgspec
import yaml

from agent.config import Port, TlsConfig, TopicPrefix


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of every section: unknown keys are rejected."""


class CollectorMqttConfig(_Section):
    """Where the collector subscribes."""

    host: str = "127.0.0.1"
    port: Port = 1883
    topic_prefix: TopicPrefix = "telematics"
    # A fixed client id with a persistent session: the broker queues telemetry while the collector is down.
    client_id: str = "telematics-collector"
    session_expiry_s: int = 86400
    # Several collector processes split the fleet by an MQTT 5 shared subscription
    # ($share/<group>/<prefix>/+/telemetry); each needs its own client_id. None: a plain subscription.
    share_group: str | None = None
    username: str | None = None
    password: str | None = None
    tls: TlsConfig | None = None


class CollectorStoreConfig(_Section):
    """Where records are stored: SQLite by default; PostgreSQL when ``postgres_dsn`` is set."""

    sqlite_path: str = "collector.sqlite"
    postgres_dsn: str | None = None  # libpq form, e.g. postgresql://collector@db.example/telemetry


class CollectorConfig(_Section):
    """The whole collector configuration."""

    mqtt: CollectorMqttConfig = msgspec.field(default_factory=CollectorMqttConfig)
    store: CollectorStoreConfig = msgspec.field(default_factory=CollectorStoreConfig)


class CollectorConfigError(Exception):
    """The file cannot be used; the message names the file, the key path and the problem."""


def load_collector_config(path: str | Path | None) -> CollectorConfig:
    """Read and validate ``path``; None gives the defaults."""
    if path is None:
        return CollectorConfig()
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise CollectorConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise CollectorConfigError(f"{path}: not valid YAML: {exc}") from exc
    try:
        return msgspec.convert(raw, CollectorConfig, strict=True)
    except msgspec.ValidationError as exc:
        message, _, where = str(exc).partition(" - at `$")
        where = where.rstrip("`").lstrip(".")
        raise CollectorConfigError(f"{path}: {where + ': ' if where else ''}{message.replace('`', '')}") from exc
