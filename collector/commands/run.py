"""``telematics-collector run``: subscribe to the devices' telemetry, store it, acknowledge it.

Options override the config file; SIGTERM or SIGINT stops it after storing what it received.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sqlite3
import threading

import msgspec

from agent.cli_base import CommandError
from agent.ops.logging import setup_logging
from collector.config import CollectorConfigError, load_collector_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", default=None, help="the collector's YAML config (default: built-in defaults)")
    parser.add_argument("--host", help="broker host (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="broker port (default 1883)")
    parser.add_argument("--topic-prefix", help="topic prefix (default telematics)")
    parser.add_argument("--db", help="SQLite file (default collector.sqlite)")
    parser.add_argument("--postgres", metavar="DSN", help="store into PostgreSQL instead (postgresql://user@host/db)")
    parser.add_argument("--share-group", help="subscribe as a member of this MQTT 5 shared subscription group")
    parser.add_argument("--client-id", help="MQTT client id (each collector process of a group needs its own)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def run(args: argparse.Namespace) -> int:
    try:
        config = load_collector_config(args.config)
    except CollectorConfigError as exc:
        raise CommandError(str(exc)) from exc
    mqtt_cfg = msgspec.structs.replace(
        config.mqtt,
        **{k: v for k, v in {"host": args.host, "port": args.port, "topic_prefix": args.topic_prefix,
                             "share_group": args.share_group, "client_id": args.client_id}.items() if v is not None},
    )
    db = args.db or config.store.sqlite_path
    dsn = args.postgres or config.store.postgres_dsn
    setup_logging(args.log_level)
    from collector.service import Collector

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    store = None
    if dsn:
        from collector.store_pg import PostgresStore, PostgresUnavailable

        try:
            store = PostgresStore(dsn)
        except PostgresUnavailable as exc:
            raise CommandError(str(exc)) from exc
    try:
        collector = Collector(
            mqtt_cfg.host, mqtt_cfg.port, mqtt_cfg.topic_prefix, db, store=store,
            client_id=mqtt_cfg.client_id, session_expiry_s=mqtt_cfg.session_expiry_s,
            username=mqtt_cfg.username, password=mqtt_cfg.password, tls=mqtt_cfg.tls, share_group=mqtt_cfg.share_group,
        ).start()
    except (OSError, ValueError, sqlite3.Error) as exc:  # ssl.SSLError is an OSError
        raise CommandError(f"cannot start: {exc}") from exc
    logging.getLogger("collector").info("collector storing into %s", "PostgreSQL" if dsn else db)
    try:
        stop.wait()
    finally:
        collector.stop()
        logging.getLogger("collector").info("collector stopped: %s", collector_stats_line(collector))
    return 0


def collector_stats_line(collector) -> str:
    stats = collector.stats()
    return ", ".join(f"{k} {v}" for k, v in stats.items() if k not in ("connected", "queued"))
