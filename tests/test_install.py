"""install.sh into a staging tree: twice (idempotent), then --uninstall; the tree checked file by file."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from pathlib import Path

import pytest
from device_helpers import REPO, build_wheelhouse, install

VENV = "opt/telematics-agent"

# Every path install.sh leaves outside the virtual environment: (path, type, mode).
INSTALLED = {
    ("etc/systemd/system/telematics-agent.service", "f", 0o644),
    ("etc/systemd/system/telematics-collector.service", "f", 0o644),
    ("etc/systemd/system/telematics-firstboot.service", "f", 0o644),
    ("etc/systemd/system/multi-user.target.wants/telematics-agent.service", "l", None),
    ("etc/systemd/system/multi-user.target.wants/telematics-firstboot.service", "l", None),
    ("usr/lib/sysusers.d/telematics-agent.conf", "f", 0o644),
    ("etc/udev/rules.d/99-telematics-gps.rules", "f", 0o644),
    ("etc/systemd/network/80-can0.network", "f", 0o644),
    ("etc/systemd/network/80-can0.link", "f", 0o644),
    ("etc/systemd/system.conf.d/telematics-watchdog.conf", "f", 0o644),
    ("etc/systemd/journald.conf.d/telematics.conf", "f", 0o644),
    ("etc/polkit-1/rules.d/50-telematics-poweroff.rules", "f", 0o644),
    ("etc/systemd/system/telematics-update@.service", "f", 0o644),
    ("etc/polkit-1/rules.d/51-telematics-update.rules", "f", 0o644),
}
# What the installation owns that --uninstall keeps: the user, the config and the data.
KEPT = {
    ("etc/passwd", "f", 0o644),
    ("etc/group", "f", 0o644),
    ("etc/shadow", "f", 0o000),
    ("etc/gshadow", "f", 0o000),
    ("etc/telematics-agent/agent.yaml", "f", 0o640),
    ("var/lib/telematics-agent/buffer.sqlite", "f", 0o600),  # stands in for unsent telemetry
}


def snapshot(root: Path) -> dict[str, tuple]:
    """path -> (type, mode, uid, gid, sha256 or link target) for every file outside the venv."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        if str(rel_dir) == VENV:
            dirnames[:] = []
            continue
        for name in filenames + [d for d in dirnames if (Path(dirpath) / d).is_symlink()]:
            path = Path(dirpath) / name
            st = path.lstat()
            rel = str(rel_dir / name)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", None, st.st_uid, st.st_gid, os.readlink(path))
            else:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                out[rel] = ("f", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, digest)
    return out


def ids(root: Path, db: str, name: str) -> int:
    for line in (root / "etc" / db).read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return int(fields[2])
    raise AssertionError(f"{name} not in {db}")


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory) -> Path:
    return build_wheelhouse(tmp_path_factory.mktemp("wheelhouse"))


def test_install_twice_then_uninstall(tmp_path, wheelhouse):
    root = tmp_path / "root"
    first = install("--root", str(root), "--wheelhouse", str(wheelhouse))
    assert "writing /etc/telematics-agent/agent.yaml" in first.stdout

    # The user, in the groups it needs (created when missing).
    assert "telematics:x:" in (root / "etc/passwd").read_text()
    groups = {line.split(":")[0]: line.split(":")[3] for line in (root / "etc/group").read_text().splitlines()}
    assert "telematics" in groups["dialout"].split(",") and "telematics" in groups["gpio"].split(",")
    uid, gid = ids(root, "passwd", "telematics"), ids(root, "group", "telematics")

    # Config: root writes, the agent's group reads; data owned by the agent.
    conf_dir, data_dir = root / "etc/telematics-agent", root / "var/lib/telematics-agent"
    running_as_root = os.geteuid() == 0
    assert stat.S_IMODE(conf_dir.stat().st_mode) == 0o750
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o750
    if running_as_root:
        assert (conf_dir.stat().st_uid, conf_dir.stat().st_gid) == (0, gid)
        assert ((conf_dir / "agent.yaml").stat().st_uid, (conf_dir / "agent.yaml").stat().st_gid) == (0, gid)
        assert (data_dir.stat().st_uid, data_dir.stat().st_gid) == (uid, gid)
    assert (conf_dir / "agent.yaml").read_bytes() == (REPO / "firmware_config/agent.example.yaml").read_bytes()

    tree = snapshot(root)
    for path, kind, mode in INSTALLED:
        assert path in tree, f"{path} not installed"
        assert tree[path][0] == kind
        if kind == "f":
            assert tree[path][1] == mode, f"{path}: mode {tree[path][1]:o}"
    source = {
        "etc/systemd/system/telematics-agent.service": "systemd/telematics-agent.service",
        "usr/lib/sysusers.d/telematics-agent.conf": "systemd/telematics-agent.sysusers",
        "etc/systemd/network/80-can0.network": "firmware_config/80-can0.network",
        "etc/polkit-1/rules.d/50-telematics-poweroff.rules": "firmware_config/50-telematics-poweroff.rules",
    }
    for installed, src in source.items():
        assert (root / installed).read_bytes() == (REPO / src).read_bytes()
    assert tree["etc/systemd/system/multi-user.target.wants/telematics-agent.service"][4] == (
        "/etc/systemd/system/telematics-agent.service"
    )
    kept_now = {p for p, _, _ in KEPT if "buffer.sqlite" not in p}
    assert set(tree) == {p for p, _, _ in INSTALLED} | kept_now | {"etc/.pwd.lock"}
    docs = root / VENV / "share/doc/telematics-agent"
    shipped = {"device.md", "operations.md", "ota.md", "certificates.md"}
    assert sorted(p.name for p in docs.iterdir()) == sorted(
        {"agent.example.yaml"} | {name for name in shipped if (REPO / "docs" / name).exists()})

    # The installed agent runs from its own virtual environment.
    agent = root / VENV / "bin/telematics-agent"
    check = subprocess.run([str(agent), "check-config", "-q", str(conf_dir / "agent.yaml")], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr

    # Second run: nothing changes, and an edited config is kept.
    (conf_dir / "agent.yaml").write_text("device:\n  id: truck-7\n")
    edited = snapshot(root)
    second = install("--root", str(root), "--wheelhouse", str(wheelhouse))
    assert "keeping the existing /etc/telematics-agent/agent.yaml" in second.stdout
    assert "installing /etc/" not in second.stdout  # unit files unchanged: not rewritten
    assert snapshot(root) == edited

    # After an over-the-air update, installing again runs the installed version once more.
    current = root / VENV / "current"
    current.unlink()
    current.symlink_to("versions/9.9.9")
    third = install("--root", str(root), "--wheelhouse", str(wheelhouse))
    assert f"pointing /{VENV}/current at this installation (it was versions/9.9.9)" in third.stdout
    assert os.readlink(current) == "." and snapshot(root) == edited

    # Uninstall: only the user, the config and the data remain.
    (data_dir / "buffer.sqlite").write_bytes(b"unsent")
    (data_dir / "buffer.sqlite").chmod(0o600)
    install("--root", str(root), "--uninstall")
    remaining = snapshot(root)
    assert set(remaining) == {p for p, _, _ in KEPT} | {"etc/.pwd.lock"}
    for path, kind, mode in KEPT:
        assert remaining[path][:2] == (kind, mode), path
    assert (conf_dir / "agent.yaml").read_text() == "device:\n  id: truck-7\n"
    assert (data_dir / "buffer.sqlite").read_bytes() == b"unsent"
    assert not (root / VENV).exists()
    # Uninstalling again is harmless.
    install("--root", str(root), "--uninstall")


def test_dry_run_changes_nothing(tmp_path):
    root = tmp_path / "root"
    proc = install("--root", str(root), "--dry-run")
    assert list(root.iterdir()) == []
    assert "would run: install -D -m 0644" in proc.stdout
    assert "would run: systemd-sysusers" in proc.stdout
    assert f"{root}/etc/telematics-agent/agent.yaml" in proc.stdout
    assert proc.stdout.rstrip().endswith("dry run: nothing was changed")


def test_unknown_option_is_refused(tmp_path):
    proc = install("--rooot", str(tmp_path), check=False)
    assert proc.returncode == 2
    assert "unknown option --rooot" in proc.stderr


def test_a_missing_wheelhouse_is_refused(tmp_path):
    proc = install("--root", str(tmp_path / "r"), "--wheelhouse", str(tmp_path / "nope"), check=False)
    assert proc.returncode == 2
    assert "no wheelhouse directory" in proc.stderr


def test_every_firmware_config_file_is_explained():
    readme = (REPO / "firmware_config/README.md").read_text()
    unexplained = [p.name for p in (REPO / "firmware_config").iterdir() if p.name != "README.md" and f"`{p.name}`" not in readme]
    assert not unexplained, f"firmware_config/README.md does not explain: {unexplained}"
