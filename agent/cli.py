"""``telematics-agent``: the on-vehicle daemon and its offline tools."""

from __future__ import annotations

from typing import Sequence

from agent.cli_base import dispatch

COMMANDS = {
    "run": ("agent.commands.run", "run the agent daemon"),
    "check-config": ("agent.commands.check_config", "validate a config file and print it with defaults"),
    "provision": ("agent.commands.provision", "give this box its identity, keys and broker; check them; first boot"),
    "release": ("agent.commands.release", "build, sign and verify over-the-air update archives"),
    "update": ("agent.commands.update", "apply a verified update (A/B install, health check, rollback); as root"),
    "status": ("agent.commands.status", "show the running agent's status (GPS, CAN, buffer, broker, power)"),
    "decode-nmea": ("agent.commands.decode_nmea", "print every fix of an NMEA capture as JSON lines"),
    "decode-can": ("agent.commands.decode_can", "print every decoded signal, trouble code set and reassembled message of a CAN capture as JSON lines"),
    "process": ("agent.commands.process", "run geofences, stops, trips and driving events on NMEA/CAN captures; print what would be buffered"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``telematics-agent`` console command."""
    return dispatch("telematics-agent", __doc__, COMMANDS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
