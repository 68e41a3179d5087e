"""systemd's notify protocol (sd_notify(3)) over a plain datagram socket: no libsystemd needed.

Under ``Type=notify`` systemd sets ``$NOTIFY_SOCKET``; the agent sends ``READY=1`` once started,
``STATUS=...`` lines ops see in ``systemctl status``, and ``WATCHDOG=1`` at least every
``WatchdogSec`` (systemd passes it as ``$WATCHDOG_USEC``) while the agent is healthy. When the
agent's main loop hangs, :class:`WatchdogPinger` stops sending and systemd restarts the service.
Without ``$NOTIFY_SOCKET`` (run by hand) every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Callable, Mapping

log = logging.getLogger(__name__)


class Notifier:
    """Sends sd_notify messages to ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        # sd_notify(3): a leading "@" names a socket in the abstract namespace.
        self._address = "\0" + path[1:] if path.startswith("@") else path
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._failed = False

    @property
    def enabled(self) -> bool:
        """True when running under systemd with a notify socket."""
        return bool(self._address)

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=value`` lines in one datagram; False if there is no socket or it failed."""
        if not self._address:
            return False
        message = "\n".join(assignments).encode("utf-8")
        with self._lock:
            try:
                if self._sock is None:
                    # Non-blocking: a ping systemd cannot take now is dropped, never a reason to hang.
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
                self._sock.sendto(message, self._address)
            except OSError as exc:
                if not self._failed:
                    log.warning("cannot notify systemd at %s: %s", self._address.lstrip("\0"), exc)
                self._failed = True
                return False
        if self._failed:
            log.info("notifying systemd again")
            self._failed = False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Start-up is complete (``Type=notify`` units count as started from here)."""
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        """One line shown by ``systemctl status``."""
        return self.send(f"STATUS={text}")

    def watchdog(self) -> bool:
        """Reset the service's watchdog timer."""
        return self.send("WATCHDOG=1")

    def stopping(self) -> bool:
        """The agent is shutting down on purpose."""
        return self.send("STOPPING=1")

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between pings (half of ``$WATCHDOG_USEC``, as sd_watchdog_enabled(3) advises); None if off.

    ``$WATCHDOG_PID``, when set, must be this process: the variable may be inherited by children.
    """
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None


class Heartbeat:
    """The main loop calls :meth:`beat` each turn; :meth:`healthy` says whether it did so recently."""

    def __init__(self, max_age_s: float, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.max_age_s = max_age_s
        self._monotonic = monotonic
        self._last = monotonic()

    def beat(self) -> None:
        self._last = self._monotonic()

    def healthy(self) -> bool:
        return self._monotonic() - self._last <= self.max_age_s


class WatchdogPinger:
    """A thread that sends ``WATCHDOG=1`` every ``interval_s`` while ``healthy()`` returns True.

    ``healthy`` is the pipeline's liveness (e.g. :meth:`Heartbeat.healthy`); when it says no, pings
    stop and systemd restarts the agent after ``WatchdogSec``. One log line per change of state.
    """

    def __init__(self, notifier: Notifier, interval_s: float, healthy: Callable[[], bool]) -> None:
        self.notifier = notifier
        self.interval_s = interval_s
        self.healthy = healthy
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._was_healthy = True

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            ok = self.healthy()
            if ok:
                self.notifier.watchdog()
            if ok != self._was_healthy:
                if ok:
                    log.info("main loop healthy again: watchdog pings resumed")
                else:
                    log.error("main loop not healthy: withholding watchdog pings so systemd restarts the agent")
                self._was_healthy = ok
            self._stop.wait(self.interval_s)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
