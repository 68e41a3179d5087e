"""``telematics-agent update apply (ARCHIVE | --version V)``: the root-only install step of an update;
``update recover``: before the agent starts, roll back a trial whose watcher is gone.

The running agent starts it (as ``telematics-update@V.service``) after downloading and verifying
the archive into ``{data_dir}/updates/telematics-agent-V.tar``;
it verifies again, installs side by side, switches ``current``, restarts the service, and rolls
back when the new version is not healthy in time (docs/ota.md). It prints the outcome as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from agent.cli_base import CommandError
from agent.ops.logging import setup_logging
from agent.config import ConfigError, load_config

DEFAULT_CONFIG = "/etc/telematics-agent/agent.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    apply = sub.add_parser("apply", help="install a downloaded release, switch to it, roll back if unhealthy")
    apply.add_argument("--config", default=DEFAULT_CONFIG, help=f"the agent's config (default {DEFAULT_CONFIG})")
    which = apply.add_mutually_exclusive_group(required=True)
    which.add_argument("archive", nargs="?", help="the release archive")
    which.add_argument("--version", dest="release_version", help="the downloaded release of this version")
    recover = sub.add_parser("recover", help="roll back an update trial that nobody watches any more (before start)")
    recover.add_argument("--config", default=DEFAULT_CONFIG, help=f"the agent's config (default {DEFAULT_CONFIG})")


def run(args: argparse.Namespace) -> int:
    from agent.ota.health import SystemdService
    from agent.ota.install import Layout
    from agent.ota.update import apply_update, archive_path, recover

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        raise CommandError(str(exc)) from exc
    setup_logging(config.logging.level)
    layout = Layout(Path(config.update.install_root))
    if args.action == "recover":
        state = recover(config, layout)
        if state is not None:
            print(json.dumps({k: state.get(k) for k in ("outcome", "version", "previous", "reason")}))
        return 0  # never keeps the agent from starting
    archive = Path(args.archive) if args.archive else archive_path(config, args.release_version)
    if not archive.is_file():
        raise CommandError(f"no archive {archive}")
    state = apply_update(archive, config, args.config, layout, SystemdService(config.update.service))
    print(json.dumps({k: state.get(k) for k in ("outcome", "version", "previous", "reason")}))
    return 0 if state.get("outcome") == "applied" else 1
