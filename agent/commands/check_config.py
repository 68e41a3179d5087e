"""``telematics-agent check-config FILE``: validate a config; exit 0 and print it with defaults, or 2."""

from __future__ import annotations

import argparse

from agent.cli_base import CommandError
from agent.config import ConfigError, load_config, to_yaml


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="the agent's YAML config")
    parser.add_argument("--quiet", "-q", action="store_true", help="print nothing when the file is valid")


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
    except ConfigError as exc:
        raise CommandError(str(exc)) from exc
    if not args.quiet:
        print(f"# {args.file}: valid")
        print(to_yaml(config), end="")
    return 0
