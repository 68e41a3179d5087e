"""The installed systemd units pass `systemd-analyze verify`, and the agent's is hardened (exposure <= 3.0).

A staging install (install.sh --root) is checked with the unit files' /opt paths pointed into the
staging tree, so that verify finds the installed executables. A real install (as root) is checked
as it is, at /etc/systemd/system, inside a private mount namespace with overlays on /etc, /opt, /usr
and /var, so that it can run on any machine (CI included) and leaves nothing behind.
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
def wheelhouse(tmp_path_factory) -> Path:
    return build_wheelhouse(tmp_path_factory.mktemp("wheelhouse"))


@pytest.fixture(scope="module")
def staged(tmp_path_factory, wheelhouse) -> Path:
    root = tmp_path_factory.mktemp("root")
    install("--root", str(root), "--wheelhouse", str(wheelhouse))
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


# A real install (no --root) into a private mount namespace whose /etc, /opt, /usr and /var are
# overlays on the real ones: install.sh runs exactly as on a box, and the host is left untouched.
REAL_INSTALL = """
set -eu
trap 'echo "FAILED at line $LINENO: $BASH_COMMAND" >&2' ERR
for d in etc opt usr var; do
    mkdir -p "$WORK/$d/upper" "$WORK/$d/work"
    mount -t overlay overlay -o "lowerdir=/$d,upperdir=$WORK/$d/upper,workdir=$WORK/$d/work" "/$d"
done
bash "$INSTALL_SH" --wheelhouse "$WHEELHOUSE" > "$OUT/install1.txt"
bash "$INSTALL_SH" --wheelhouse "$WHEELHOUSE" > "$OUT/install2.txt"
id telematics > "$OUT/id.txt"
stat -c '%U:%G %a %n' /etc/telematics-agent /etc/telematics-agent/agent.yaml /var/lib/telematics-agent > "$OUT/stat.txt"
systemd-analyze verify /etc/systemd/system/telematics-agent.service /etc/systemd/system/telematics-collector.service \
    /etc/systemd/system/telematics-firstboot.service > "$OUT/verify.txt" 2>&1 || echo "exit status $?" >> "$OUT/verify.txt"
systemd-analyze security --offline=true --no-pager /etc/systemd/system/telematics-agent.service > "$OUT/security.txt" 2>&1 || true
/opt/telematics-agent/bin/telematics-agent check-config -q /etc/telematics-agent/agent.yaml > "$OUT/check.txt" 2>&1
bash "$INSTALL_SH" --uninstall > "$OUT/uninstall.txt"
ls -A /etc/systemd/system /opt > "$OUT/after.txt"
test -f /etc/telematics-agent/agent.yaml && test -d /var/lib/telematics-agent && echo kept >> "$OUT/after.txt"
"""


def _can_unshare() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


def test_real_install_verifies(tmp_path, wheelhouse):
    if not _can_unshare():
        reason = "a real install needs root and a private mount namespace (unshare -m) to leave this machine untouched"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    env = dict(os.environ, WORK=str(work), OUT=str(out), INSTALL_SH=str(REPO / "install.sh"),
               WHEELHOUSE=str(wheelhouse))
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", "bash", "-c", REAL_INSTALL], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, "\n".join(l for l in proc.stderr.splitlines() if "FAILED" in l) + "\n" + proc.stderr
    assert "writing /etc/telematics-agent/agent.yaml" in (out / "install1.txt").read_text()
    assert "keeping the existing /etc/telematics-agent/agent.yaml" in (out / "install2.txt").read_text()
    groups = (out / "id.txt").read_text()
    assert "(dialout)" in groups and "(gpio)" in groups
    assert (out / "stat.txt").read_text().splitlines() == [
        "root:telematics 750 /etc/telematics-agent",
        "root:telematics 640 /etc/telematics-agent/agent.yaml",
        "telematics:telematics 750 /var/lib/telematics-agent",
    ]
    assert (out / "verify.txt").read_text().strip() == ""
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", (out / "security.txt").read_text())
    assert match and float(match.group(1)) <= MAX_EXPOSURE, (out / "security.txt").read_text()
    assert (out / "check.txt").read_text() == ""
    after = (out / "after.txt").read_text()
    assert "telematics" not in after.replace("kept", "") and after.strip().endswith("kept")
    # Nothing leaked out of the namespace.
    assert not Path("/opt/telematics-agent").exists()
    assert "telematics:" not in Path("/etc/passwd").read_text()
