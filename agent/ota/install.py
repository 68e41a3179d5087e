"""A/B installation: each version in its own directory and virtual environment, one ``current`` link.

Layout under ``update.install_root`` (/opt/telematics-agent)::

    bin/, lib/ ...           the version install.sh put there (the factory version)
    versions/1.3.0/          a venv per installed update, complete once .installed exists
    current -> versions/1.3.0 (or "." for the factory version)

The unit runs ``{install_root}/current/bin/telematics-agent`` (a drop-in written at the first
update). The switch is atomic: a new link made beside ``current`` and renamed over it (rename(2)
replaces a directory entry atomically), so a power cut leaves the old or the new version, never
none. The buffer and the config are outside this tree and untouched by an update.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from agent.ota.verify import Release, extract_wheels

log = logging.getLogger(__name__)

INSTALLED_MARK = ".installed"
DROPIN_NAME = "ota.conf"


class InstallFailed(Exception):
    """A verified release could not be installed (pip, disk space); nothing was switched."""


@dataclass(frozen=True)
class Layout:
    """The install tree at ``install_root``, and where the unit's drop-in goes (a staging tree in tests)."""

    install_root: Path = Path("/opt/telematics-agent")
    systemd_dir: Path = Path("/etc/systemd/system")

    @property
    def versions(self) -> Path:
        return self.install_root / "versions"

    @property
    def current(self) -> Path:
        return self.install_root / "current"

    def version_dir(self, version: str) -> Path:
        return self.versions / version

    def is_installed(self, version: str) -> bool:
        return (self.version_dir(version) / INSTALLED_MARK).exists()

    def current_link(self) -> str:
        """What ``current`` points at, relative to the root ("." for the factory version)."""
        try:
            return os.readlink(self.current)
        except FileNotFoundError:
            return "."

    def switch(self, link: str) -> None:
        """Point ``current`` at ``link`` ("versions/V" or "."), atomically and durably."""
        tmp = self.install_root / ".current.new"
        tmp.unlink(missing_ok=True)
        os.symlink(link, tmp)
        os.replace(tmp, self.current)
        fd = os.open(self.install_root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        log.info("current version switched to %s", link)

    def prune(self, keep: set[str], max_versions: int) -> list[str]:
        """Remove installed versions beyond ``max_versions`` (oldest first), never those in ``keep``."""
        if not self.versions.is_dir():
            return []
        dirs = sorted((d for d in self.versions.iterdir() if d.is_dir()), key=lambda d: d.stat().st_mtime)
        removed = []
        for d in dirs[: max(0, len(dirs) - max_versions)]:
            if f"versions/{d.name}" not in keep:
                shutil.rmtree(d)
                removed.append(d.name)
        return removed


def install_version(release: Release, layout: Layout, python: str) -> str:
    """Create ``versions/{v}`` with its own venv holding the release; returns the link target."""
    version = release.version
    target = layout.version_dir(version)
    link = f"versions/{version}"
    if layout.is_installed(version):
        log.info("version %s is installed already", version)
        return link
    if target.exists():
        shutil.rmtree(target)  # a half-made attempt (power cut, full disk)
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("installing version %s into %s", version, target)
    # The same venv as install.sh's: system site packages visible for the Pi's GPIO backend.
    _run([python, "-m", "venv", "--system-site-packages", str(target)], "create the virtual environment")
    wheels = extract_wheels(release, target)
    try:
        _run([str(target / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-index", "--no-cache-dir",
              "--find-links", str(wheels), f"telematics-agent=={version}"], "install the wheels")
    finally:
        shutil.rmtree(wheels, ignore_errors=True)
    (target / INSTALLED_MARK).write_text(release.manifest["version"] + "\n")
    return link


def _run(argv: list[str], what: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise InstallFailed(f"cannot {what}: {tail}")


def write_dropin(layout: Layout, service: str, config_path: str) -> bool:
    """The unit drop-in that starts ``current`` (and recovers an interrupted trial first, with the
    install.sh version's code, which no update replaces); True when it was (re)written."""
    path = layout.systemd_dir / f"{service}.d" / DROPIN_NAME
    text = (
        "# Written by telematics-agent update: run the version the `current` link points at, after\n"
        "# rolling back a trial that was interrupted (as root: `+`; docs/ota.md).\n"
        "[Service]\n"
        f"ExecStartPre=+{layout.install_root}/bin/telematics-agent update recover --config {config_path}\n"
        "ExecStart=\n"
        f"ExecStart={layout.current}/bin/telematics-agent run --config {config_path}\n"
    )
    if path.exists() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return True
