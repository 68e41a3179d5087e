"""``telematics-collector serve-updates --dir DIR``: send release chunks to devices that ask over MQTT.

DIR holds signed archives named ``telematics-agent-{version}.tar`` (``telematics-agent release``
makes them); docs/ota.md describes the exchange. Runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

from agent.cli_base import CommandError
from agent.ops.logging import setup_logging
from collector.config import CollectorConfigError, load_collector_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", required=True, help="directory of release archives")
    parser.add_argument("--config", "-c", default=None, help="the collector's YAML config (its mqtt section is used)")
    parser.add_argument("--host", help="broker host (default from the config, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="broker port (default from the config, 1883)")
    parser.add_argument("--topic-prefix", help="topic prefix (default telematics)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def run(args: argparse.Namespace) -> int:
    from collector.ota_chunks import ChunkServer

    try:
        mqtt_cfg = load_collector_config(args.config).mqtt
    except CollectorConfigError as exc:
        raise CommandError(str(exc)) from exc
    if not Path(args.dir).is_dir():
        raise CommandError(f"no directory {args.dir}")
    setup_logging(args.log_level)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        server = ChunkServer(args.host or mqtt_cfg.host, args.port or mqtt_cfg.port,
                             args.topic_prefix or mqtt_cfg.topic_prefix, args.dir, tls=mqtt_cfg.tls).start()
    except OSError as exc:
        raise CommandError(f"cannot reach the broker: {exc.strerror or exc}") from exc
    try:
        stop.wait()
    finally:
        server.stop()
    return 0
