"""The installed systemd units pass `systemd-analyze verify`, and the agent's is hardened (exposure <= 3.0).

A staging install (install.sh --root) is checked with the unit files' /opt paths pointed into the
staging tree, so that verify finds the installed executables. In CI (CI=true, as root) a real
install is checked as it is, at /etc/systemd/system.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from device_helpers import REPO, build_wheelhouse, install

UNITS = ("telematics-agent.service", "telematics-collector.service", "telematics-firstboot.service")
MAX_EXPOSURE = 3.0

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None and os.environ.get("CI") != "true",
    reason="systemd-analyze is not installed here (apt-get install systemd); CI has it",
)


def verify(paths: list[Path]) -> str:
    """Warnings and errors of `systemd-analyze verify` (it exits 0 on many of them: read the output)."""
    proc = subprocess.run(["systemd-analyze", "verify", *map(str, paths)], capture_output=True, text=True, timeout=120)
    return (proc.stdout + proc.stderr).strip() + ("" if proc.returncode == 0 else f"\n(exit status {proc.returncode})")


def exposure(unit: Path, root: str | None = None) -> float:
    args = ["systemd-analyze", "security", "--offline=true", "--no-pager"]
    args += [f"--root={root}", str(unit)] if root else [str(unit)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", proc.stdout + proc.stderr)
    assert match, proc.stdout + proc.stderr
    return float(match.group(1))


@pytest.fixture(scope="module")
def staged(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("root")
    install("--root", str(root), "--wheelhouse", str(build_wheelhouse(tmp_path_factory.mktemp("wheelhouse"))))
    return root


def test_staged_units_verify(staged, tmp_path):
    copies = []
    for unit in UNITS:
        text = (staged / "etc/systemd/system" / unit).read_text()
        copy = tmp_path / unit
        copy.write_text(text.replace("/opt/telematics-agent/", f"{staged}/opt/telematics-agent/"))
        copies.append(copy)
    assert verify(copies) == ""


def test_verify_reports_a_broken_unit(tmp_path):
    """The check above can fail: verify's complaints about a bad key reach the output."""
    broken = tmp_path / "telematics-agent.service"
    broken.write_text((REPO / "systemd/telematics-agent.service").read_text().replace("Restart=always", "Restart=sometimes"))
    assert "Restart" in verify([broken]) or "restart" in verify([broken])


def test_agent_unit_exposure(staged):
    assert exposure(staged / "etc/systemd/system/telematics-agent.service") <= MAX_EXPOSURE


def test_agent_unit_essentials():
    text = (REPO / "systemd/telematics-agent.service").read_text()
    for line in ("Type=notify", "Restart=always", "User=telematics", "StateDirectory=telematics-agent",
                 "LogsDirectory=telematics-agent", "NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes",
                 "DevicePolicy=closed", "CapabilityBoundingSet=CAP_SYS_TIME"):
        assert re.search(rf"^{re.escape(line)}$", text, re.M), line
    assert re.search(r"^WatchdogSec=\d+", text, re.M)


@pytest.mark.skipif(
    not (os.environ.get("CI") == "true" and os.geteuid() == 0),
    reason="a real install changes this machine: it runs only in CI (CI=true, as root)",
)
def test_real_install_verifies(tmp_path_factory):
    install("--wheelhouse", str(build_wheelhouse(tmp_path_factory.mktemp("wheelhouse"))))
    units = [Path("/etc/systemd/system") / unit for unit in UNITS]
    assert verify(units) == ""
    assert exposure(units[0]) <= MAX_EXPOSURE
    assert Path("/opt/telematics-agent/bin/telematics-agent").exists()
