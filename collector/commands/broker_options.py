"""The broker options of the collector's MQTT services (fences, serve-updates, sign-certs): the
config file's ``mqtt`` section, with ``--host``, ``--port`` and ``--topic-prefix`` over it."""

from __future__ import annotations

import argparse

import msgspec

from agent.cli_base import CommandError
from collector.config import CollectorConfigError, load_collector_config


def add_broker_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config``, ``--host``, ``--port`` and ``--topic-prefix``."""
    parser.add_argument("--config", "-c", default=None, help="the collector's YAML config (its mqtt section is used)")
    parser.add_argument("--host", help="broker host (default from the config, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="broker port (default from the config, 1883)")
    parser.add_argument("--topic-prefix", help="topic prefix (default telematics)")


def broker_settings(args: argparse.Namespace):
    """The config's mqtt section with the command line's overrides; CommandError for a bad config."""
    try:
        mqtt_cfg = load_collector_config(args.config).mqtt
    except CollectorConfigError as exc:
        raise CommandError(str(exc)) from exc
    overrides = {"host": args.host, "port": args.port, "topic_prefix": args.topic_prefix}
    return msgspec.structs.replace(mqtt_cfg, **{k: v for k, v in overrides.items() if v is not None})
