"""``telematics-collector sign-certs``: answer devices' certificate renewal requests (docs/certificates.md).

  sign-certs --ca-cert ca.pem --ca-key ca.key [--days 90]      sign with a CA held here
  sign-certs --command /usr/local/bin/fleet-ca-sign            the fleet's own CA: CSR on stdin,
                                                               $TELEMATICS_DEVICE_ID, certificate on stdout
Runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
import signal
import threading

from agent.cli_base import CommandError
from agent.ops.logging import setup_logging
from collector.commands.broker_options import add_broker_arguments, broker_settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_broker_arguments(parser)
    parser.add_argument("--ca-cert", help="the CA certificate (PEM) that signs device certificates")
    parser.add_argument("--ca-key", help="its private key (PEM, unencrypted; keep it mode 0600)")
    parser.add_argument("--days", type=float, default=90.0, help="lifetime of the certificates signed (default 90)")
    parser.add_argument("--command", dest="ca_command", help="sign with this command instead (the fleet's own CA)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def run(args: argparse.Namespace) -> int:
    from collector.signing import CommandCa, LocalCa, SigningService

    mqtt_cfg = broker_settings(args)
    if bool(args.ca_command) == bool(args.ca_cert or args.ca_key):
        raise CommandError("give either --ca-cert and --ca-key, or --command")
    if args.ca_command:
        signer = CommandCa(shlex.split(args.ca_command))
    else:
        if not (args.ca_cert and args.ca_key):
            raise CommandError("--ca-cert needs --ca-key (and the other way round)")
        try:
            signer = LocalCa(args.ca_cert, args.ca_key, lifetime=dt.timedelta(days=args.days))
        except (OSError, ValueError, TypeError) as exc:
            raise CommandError(f"cannot load the CA: {exc}") from exc
    setup_logging(args.log_level)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    service = SigningService(mqtt_cfg.host, mqtt_cfg.port,
                             mqtt_cfg.topic_prefix, signer, tls=mqtt_cfg.tls)
    service.start()
    try:
        stop.wait()
    finally:
        service.stop()
    return 0
