"""``telematics-sim``: bench tools for technicians (replay, generate, demo)."""

from __future__ import annotations

from typing import Sequence

from agent.cli_base import dispatch

COMMANDS = {
    "replay": ("sim.replay", "replay an NMEA capture into a pseudo-terminal at its recorded pace"),
    "demo": ("sim.demo", "replay the bundled drive through the agent and the collector, then summarise"),
    "generate": ("sim.generate", "generate a delivery drive: NMEA, candump, geofences and the ground truth"),
    "report": ("sim.report", "draw a device's drive from the collector's database as a self-contained HTML page"),
    "run": ("sim.scenario", "run a scenario: broker, agent and collector, faults injected, expectations checked"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``telematics-sim`` console command."""
    return dispatch("telematics-sim", __doc__, COMMANDS, argv)
