"""Is the new version healthy? Evidence from the service manager and from the agent's status file.

Healthy means, all at once, within ``update.health_timeout_s`` of the switch:
- the service runs and has restarted fewer than ``update.max_restarts`` times since the switch
  (a crash loop fails at once, without waiting out the timeout);
- the systemd watchdog keeps coming: a ``WATCHDOG=1`` since the switch, the last one recent;
- ``{data_dir}/status.json`` is written by that very process (its pid, the new version) and says
  the broker link is up, the buffer has committed records, and some were acknowledged (counters
  of this process: a new version that cannot commit or get acks never passes).
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

log = logging.getLogger(__name__)

# A watchdog ping older than this no longer counts (systemd's WatchdogSec in the unit is 30 s).
WATCHDOG_MAX_AGE_S = 30.0
POLL_S = 0.5


@dataclass
class ServiceState:
    """What the service manager knows about the agent's service."""

    active: bool
    main_pid: int | None
    restarts: int
    last_watchdog: float | None  # time.monotonic() of the last WATCHDOG=1; None: none yet


class ServiceManager(Protocol):
    """systemd in production (:class:`SystemdService`); a notify-socket supervisor in the tests."""

    def restart(self) -> None: ...

    def reload(self) -> None: ...

    def state(self) -> ServiceState: ...

    def log_tail(self, since_wall: float, lines: int) -> list[str]: ...


class SystemdService:
    """One unit, through systemctl and journalctl."""

    def __init__(self, unit: str) -> None:
        self.unit = unit

    def restart(self) -> None:
        subprocess.run(["systemctl", "restart", "--no-block", self.unit], check=True, capture_output=True)

    def reload(self) -> None:
        subprocess.run(["systemctl", "daemon-reload"], check=True, capture_output=True)

    def state(self) -> ServiceState:
        out = subprocess.run(
            ["systemctl", "show", self.unit, "-p", "ActiveState,MainPID,NRestarts,WatchdogTimestampMonotonic"],
            capture_output=True, text=True,
        ).stdout
        props = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        watchdog_us = int(props.get("WatchdogTimestampMonotonic") or 0)
        pid = int(props.get("MainPID") or 0)
        return ServiceState(
            active=props.get("ActiveState") == "active",
            main_pid=pid or None,
            restarts=int(props.get("NRestarts") or 0),
            # systemd's monotonic timestamps are CLOCK_MONOTONIC microseconds, as time.monotonic().
            last_watchdog=watchdog_us / 1e6 if watchdog_us else None,
        )

    def log_tail(self, since_wall: float, lines: int) -> list[str]:
        out = subprocess.run(
            ["journalctl", "-u", self.unit, "--since", f"@{int(since_wall)}", "-n", str(lines), "-o", "cat", "--no-pager"],
            capture_output=True, text=True,
        ).stdout
        return out.splitlines()[-lines:]


@dataclass
class Verdict:
    """The outcome of watching a new version: healthy, or why not."""

    healthy: bool
    reason: str


def read_status(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def check_once(state: ServiceState, status: dict[str, Any], version: str, since_mono: float, now_mono: float) -> list[str]:
    """What is still missing for a healthy verdict (empty: healthy)."""
    missing = []
    if not state.active or state.main_pid is None:
        missing.append("service not running")
    if state.last_watchdog is None or state.last_watchdog < since_mono:
        missing.append("no watchdog ping since the switch")
    elif now_mono - state.last_watchdog > WATCHDOG_MAX_AGE_S:
        missing.append(f"no watchdog ping for {now_mono - state.last_watchdog:.0f} s")
    if status.get("pid") != state.main_pid or status.get("version") != version:
        missing.append(f"no status from version {version} (pid {state.main_pid})")
        return missing
    if status.get("state") != "running":
        missing.append(f"status says {status.get('state')}")
    broker = status.get("broker") or {}
    buffer = status.get("buffer") or {}
    if not broker.get("connected"):
        missing.append("broker not connected")
    if not buffer.get("commits"):
        missing.append("no records committed")
    if not broker.get("acked_batches"):  # by the collector, or the broker's PUBACK with mqtt.ack: broker
        missing.append("no records acknowledged")
    return missing


def await_health(service: ServiceManager, status_path: Path, version: str, timeout_s: float, max_restarts: int,
                 monotonic: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> Verdict:
    """Watch the (just restarted) service until it is healthy, crash-loops, or ``timeout_s`` passes."""
    start = monotonic()
    restarts0 = service.state().restarts
    while True:
        now = monotonic()
        state = service.state()
        status = read_status(status_path)
        restarts = state.restarts - restarts0
        if restarts >= max_restarts:
            return Verdict(False, f"crash loop: restarted {restarts} times within {now - start:.0f} s")
        missing = check_once(state, status, version, start, now)
        if not missing:
            log.info("version %s is healthy after %.1f s", version, now - start)
            return Verdict(True, "healthy")
        if now - start > timeout_s:
            return Verdict(False, f"not healthy within {timeout_s:g} s: {'; '.join(missing)}")
        sleep(POLL_S)
