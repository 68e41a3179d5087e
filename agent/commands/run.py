"""``telematics-agent run --config FILE``: the daemon. SIGTERM or SIGINT stops it cleanly."""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from agent.cli_base import CommandError, setup_logging
from agent.config import ConfigError, load_config

DEFAULT_CONFIG = "/etc/telematics-agent/agent.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", default=DEFAULT_CONFIG, help=f"the agent's YAML config (default {DEFAULT_CONFIG})")


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        raise CommandError(str(exc)) from exc
    setup_logging(config.logging.level)
    from agent.app import Agent, StartupError

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    agent = Agent(config)
    try:
        agent.run_until(stop)
    except StartupError as exc:
        logging.getLogger("agent").error("%s", exc)
        raise CommandError(str(exc)) from exc
    return 0
