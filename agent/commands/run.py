"""``telematics-agent run --config FILE``: the daemon. SIGTERM or SIGINT stops it cleanly.

The config file is read with the settings received by remote management merged over it
(agent/ops/remote.py). The ``restart`` remote command, and a remote change of settings, stop the
agent cleanly and start it again in the same process slot (exec), under systemd or not.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from agent.cli_base import CommandError
from agent.ops.logging import setup_logging
from agent.config import ConfigError

DEFAULT_CONFIG = "/etc/telematics-agent/agent.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", default=DEFAULT_CONFIG, help=f"the agent's YAML config (default {DEFAULT_CONFIG})")


def run(args: argparse.Namespace) -> int:
    from agent.ops.remote import load_effective_config

    try:
        config = load_effective_config(args.config)
    except ConfigError as exc:
        raise CommandError(str(exc)) from exc
    setup_logging(config.logging.level)
    from agent.app import Agent, StartupError

    stop = threading.Event()
    restart = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())

    def request_restart() -> None:
        restart.set()
        stop.set()

    agent = Agent(config, config_path=args.config, restart=request_restart)
    try:
        agent.run_until(stop)
    except StartupError as exc:
        logging.getLogger("agent").error("%s", exc)
        raise CommandError(str(exc)) from exc
    if restart.is_set():
        logging.getLogger("agent").info("restarting")
        os.execv(sys.executable, [sys.executable, "-m", "agent.cli", *sys.argv[1:]])
    return 0
