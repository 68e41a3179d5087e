"""Helpers shared by the install and systemd tests: a wheelhouse of this checkout, install.sh runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
INSTALL_SH = REPO / "install.sh"


def build_wheelhouse(dest: Path) -> Path:
    """Wheels of this checkout and its dependencies (PyPI, or pip's cache) for install.sh --wheelhouse."""
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(dest), str(REPO)],
        capture_output=True, text=True, timeout=600,
    )
    if proc.returncode != 0:
        reason = f"cannot build a wheelhouse (no PyPI access?): {proc.stderr.strip().splitlines()[-1:]}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return dest


def install(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run install.sh with ``args``; its output is returned (and shown when it fails)."""
    proc = subprocess.run(["bash", str(INSTALL_SH), *args], capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"install.sh {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc
