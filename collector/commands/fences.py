"""``telematics-collector fences publish|serve``: fence sets for devices over MQTT (docs/geofences.md).

``publish --file F --version V (--device D ... | --all)`` validates the set, records the assignment
in ``--dir``, publishes the retained manifests, then serves the devices' requests for the set;
``serve`` only serves what ``--dir`` holds. Both run until SIGTERM or SIGINT; run one per broker.
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
    parser.add_argument("action", choices=["publish", "serve"], help="publish a set, or serve the sets published")
    parser.add_argument("--dir", required=True, help="state directory: assignments and the sets' files")
    parser.add_argument("--file", help="publish: the GeoJSON fence set")
    parser.add_argument("--version", dest="set_version", metavar="VERSION", help="publish: the set's version, e.g. v42")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--device", action="append", help="publish: for this device (repeatable)")
    target.add_argument("--all", action="store_true", help="publish: for every device without a set of its own")
    add_broker_arguments(parser)
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def _set_to_publish(args: argparse.Namespace) -> bytes:
    if not args.file or not args.set_version or not (args.device or args.all):
        raise CommandError("publish needs --file, --version and --device D (repeatable) or --all")
    try:
        return Path(args.file).read_bytes()
    except OSError as exc:
        raise CommandError(f"cannot read {args.file}: {exc.strerror or exc}") from exc


def run(args: argparse.Namespace) -> int:
    from collector.fences import FencePublisher

    mqtt_cfg = broker_settings(args)
    data = _set_to_publish(args) if args.action == "publish" else None
    setup_logging(args.log_level)
    try:
        publisher = FencePublisher(mqtt_cfg.host, mqtt_cfg.port,
                                   mqtt_cfg.topic_prefix, args.dir, tls=mqtt_cfg.tls,
                                   username=mqtt_cfg.username, password=mqtt_cfg.password)
        if data is not None:
            manifest = publisher.assign(data, args.set_version, None if args.all else args.device)
            print(f"{args.file}: version {manifest['version']}, {manifest['size']} bytes, "
                  f"sha256 {manifest['sha256']}", flush=True)
    except OSError as exc:
        raise CommandError(f"cannot write to {args.dir}: {exc.strerror or exc}") from exc
    except ValueError as exc:  # GeofenceError, or a manifest devices would refuse
        raise CommandError(f"{args.file}: {exc}") from exc
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        publisher.start()
    except OSError as exc:
        raise CommandError(f"cannot reach the broker: {exc.strerror or exc}") from exc
    try:
        while not stop.wait(1.0):  # timed: a signal must wake the main thread (see agent/app.py)
            pass
    finally:
        publisher.stop()
    return 0
