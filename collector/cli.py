"""``telematics-collector``: decode, de-duplicate, store and acknowledge device telemetry."""

from __future__ import annotations

from typing import Sequence

from agent.cli_base import dispatch

COMMANDS = {
    "run": ("collector.commands.run", "subscribe to the devices' telemetry and store it"),
    "summary": ("collector.commands.summary", "records stored, first/last time, distance and duration per device"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``telematics-collector`` console command."""
    return dispatch("telematics-collector", __doc__, COMMANDS, argv)
