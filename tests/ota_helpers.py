"""Real releases of this checkout for the OTA tests: copies of the source with another version
(and, for the broken one, an import that fails at start-up), built into signed archives once per session."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.ota.release import build_release, sign_archive

REPO = Path(__file__).resolve().parent.parent
SOURCES = ("agent", "collector", "sim", "pyproject.toml", "README.md")
BROKEN_LINE = "\nimport telematics_module_that_does_not_exist  # a release that fails at start-up\n"


class ReleaseFactory:
    """Builds and signs releases on demand, each (version, broken) once."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.key = Ed25519PrivateKey.generate()
        self.public_key_path = workdir / "release.pub"
        self.public_key_path.write_bytes(self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        self._deps: Path | None = None
        self._built: dict[tuple[str, bool], Path] = {}

    def deps(self) -> Path:
        """Wheels of the project's dependencies (pip's cache makes this quick after the first time)."""
        if self._deps is None:
            dest = self.workdir / "deps"
            # With the build backend's own requirements, so releases build with --no-index.
            subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(dest), str(REPO),
                            "setuptools>=68", "wheel"], check=True, capture_output=True, timeout=600)
            self._deps = dest
        return self._deps

    def source(self, version: str, broken: bool = False) -> Path:
        """A copy of the checkout claiming ``version``."""
        dest = self.workdir / f"src-{version}{'-broken' if broken else ''}"
        if dest.exists():
            return dest
        dest.mkdir()
        for name in SOURCES:
            src = REPO / name
            if src.is_dir():
                shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
            elif src.exists():
                shutil.copy2(src, dest / name)
        init = dest / "agent" / "__init__.py"
        init.write_text(init.read_text().replace('__version__ = "', f'__version__ = "{version}"  # was "', 1))
        if broken:
            with open(dest / "agent" / "app.py", "a") as fh:
                fh.write(BROKEN_LINE)
        return dest

    def release(self, version: str, broken: bool = False, signed: bool = True) -> Path:
        """A signed (or unsigned) archive of ``version``; callers copy it before changing it."""
        key = (version, broken)
        if key not in self._built:
            out = self.workdir / f"out-{version}{'-broken' if broken else ''}"
            archive = build_release(self.source(version, broken), out,
                                    pip_args=["--no-index", "--find-links", str(self.deps())])
            unsigned = archive.with_name(archive.name.replace(".tar", ".unsigned.tar"))
            shutil.copy2(archive, unsigned)
            sign_archive(archive, self.key)
            self._built[key] = archive
        archive = self._built[key]
        return archive if signed else archive.with_name(archive.name.replace(".tar", ".unsigned.tar"))


class Supervisor:
    """Stands in for systemd: runs ``{install_root}/current/bin/telematics-agent run`` (the factory's
    bin/ until ``current`` exists, as the update's drop-in does) under a real notify socket, restarts
    it when it exits (Restart=always, counted like NRestarts), and notes every WATCHDOG=1.
    Implements agent.ota.health.ServiceManager."""

    def __init__(self, install_root: Path, config: Path, workdir: Path, watchdog_usec: int = 1_000_000,
                 restart_s: float = 0.5) -> None:
        import socket

        self.install_root, self.config, self.workdir = install_root, config, workdir
        self.watchdog_usec, self.restart_s = watchdog_usec, restart_s
        self.notify_path = workdir / "notify"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.notify_path))
        self.sock.settimeout(0.1)
        self.log_path = workdir / "agent.log"
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self.last_watchdog: float | None = None
        self.ready_pids: list[int] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._listen, daemon=True),
                         threading.Thread(target=self._watch, daemon=True)]

    def executable(self) -> Path:
        current = self.install_root / "current"
        return (current if current.exists() else self.install_root) / "bin" / "telematics-agent"

    def start(self) -> "Supervisor":
        self._spawn()
        for thread in self._threads:
            thread.start()
        return self

    def _spawn(self) -> None:
        env = dict(os.environ, NOTIFY_SOCKET=str(self.notify_path), WATCHDOG_USEC=str(self.watchdog_usec))
        env.pop("WATCHDOG_PID", None)
        with open(self.log_path, "a") as log:
            log.write(f"--- start {self.executable()} at {time.time():.3f}\n")
            log.flush()
            self.proc = subprocess.Popen([str(self.executable()), "run", "--config", str(self.config)],
                                         stdout=log, stderr=subprocess.STDOUT, env=env)

    def _listen(self) -> None:
        import socket

        while not self._stop.is_set():
            try:
                message = self.sock.recv(4096).decode()
            except socket.timeout:
                continue
            except OSError:
                return
            if "WATCHDOG=1" in message:
                self.last_watchdog = time.monotonic()
            if "READY=1" in message and self.proc is not None:
                self.ready_pids.append(self.proc.pid)

    def _watch(self) -> None:
        while not self._stop.wait(0.1):
            with self._lock:
                if self.proc is not None and self.proc.poll() is not None:
                    if self._stop.wait(self.restart_s):
                        return
                    self.restarts += 1
                    self._spawn()

    def _terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    # -- ServiceManager ---------------------------------------------------------------------------

    def restart(self) -> None:
        with self._lock:
            self._terminate()
            self._spawn()

    def reload(self) -> None:
        """Nothing to reload: executable() follows ``current`` already."""

    def state(self):
        from agent.ota.health import ServiceState

        proc = self.proc
        alive = proc is not None and proc.poll() is None
        return ServiceState(active=alive, main_pid=proc.pid if alive else None, restarts=self.restarts,
                            last_watchdog=self.last_watchdog)

    def log_tail(self, since_wall: float, lines: int) -> list[str]:
        return self.log_path.read_text(errors="replace").splitlines()[-lines:]

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            self._terminate()
        for thread in self._threads:
            thread.join(5)
        self.sock.close()
