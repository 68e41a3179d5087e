"""``telematics-collector``: decode, de-duplicate, store and acknowledge device telemetry."""

from __future__ import annotations

from typing import Sequence

from agent.cli_base import dispatch

COMMANDS = {
    "run": ("collector.commands.run", "subscribe to the devices' telemetry and store it"),
    "summary": ("collector.commands.summary", "records stored, first/last time, distance and duration per device"),
    "gaps": ("collector.commands.gaps", "per device, the sequence numbers that never arrived"),
    "export": ("collector.commands.export", "a device's track in a time range as GeoJSON, GPX or CSV"),
    "reprocess": ("collector.commands.reprocess", "decode the dead letters again and store what now decodes"),
    "sign-certs": ("collector.commands.sign_certs", "answer devices' certificate renewal requests with a CA or a command"),
    "serve-updates": ("collector.commands.serve_updates", "send over-the-air update chunks to devices that ask over MQTT"),
    "fences": ("collector.commands.fences", "publish fence sets to devices (retained manifest, set on request) and serve them"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``telematics-collector`` console command."""
    return dispatch("telematics-collector", __doc__, COMMANDS, argv)
