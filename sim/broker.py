"""A private Mosquitto for the bench tools and the tests: on a free port, stopped and restarted by PID.

Used by ``telematics-sim demo`` (when no broker listens on 127.0.0.1:1883), ``telematics-sim run`` and
the test fixtures, so a broker is started and ended the same way everywhere.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path


class BrokerError(Exception):
    """Mosquitto is not installed or did not start; the message says what to do."""


def mosquitto_exe() -> str | None:
    """The ``mosquitto`` binary (Debian puts it in /usr/sbin, often not on a user's PATH), or None."""
    return shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listening(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    with socket.socket() as sock:
        sock.settimeout(timeout)
        return sock.connect_ex((host, port)) == 0


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    """Return once 127.0.0.1:``port`` accepts connections; raise TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not listening("127.0.0.1", port):
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:g} s")
        time.sleep(0.02)


def end_process(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
    """Send ``sig`` and wait; SIGKILL after ``timeout`` s. Nothing to do for an ended process."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class MosquittoBroker:
    """``mosquitto`` on a free port of 127.0.0.1, anonymous, without persistence (Mosquitto's default:
    a restart forgets what it held). ``extra_conf`` is appended to its config file; its output goes
    to ``workdir/mosquitto.log``."""

    def __init__(self, workdir: Path, extra_conf: str = "") -> None:
        exe = mosquitto_exe()
        if exe is None:
            raise BrokerError("mosquitto is not installed: sudo apt-get install mosquitto (or scripts/setup)")
        self.exe = exe
        self.workdir = Path(workdir)
        self.port = free_port()
        self.extra_conf = extra_conf
        self.conf = self.workdir / "mosquitto.conf"
        self.log = self.workdir / "mosquitto.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n{self.extra_conf}"
        )
        with self.log.open("ab") as log_file:  # the child keeps its own descriptor
            self.proc = subprocess.Popen([self.exe, "-c", str(self.conf)], stdout=log_file, stderr=subprocess.STDOUT)
        try:
            wait_for_port(self.port)
        except TimeoutError as exc:
            raise BrokerError(f"mosquitto did not start on 127.0.0.1:{self.port}: see {self.log}") from exc

    def stop(self) -> None:
        end_process(self.proc)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()
