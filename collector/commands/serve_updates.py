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
from collector.commands.broker_options import add_broker_arguments, broker_settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", required=True, help="directory of release archives")
    add_broker_arguments(parser)
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def run(args: argparse.Namespace) -> int:
    from collector.ota_chunks import ChunkServer

    mqtt_cfg = broker_settings(args)
    if not Path(args.dir).is_dir():
        raise CommandError(f"no directory {args.dir}")
    setup_logging(args.log_level)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        server = ChunkServer(mqtt_cfg.host, mqtt_cfg.port,
                             mqtt_cfg.topic_prefix, args.dir, tls=mqtt_cfg.tls).start()
    except OSError as exc:
        raise CommandError(f"cannot reach the broker: {exc.strerror or exc}") from exc
    try:
        stop.wait()
    finally:
        server.stop()
    return 0
