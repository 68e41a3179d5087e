"""The update's root-only unit and the polkit rule that lets the agent's user start it (and nothing else)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from agent.ota.update import VERSION_RE

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "telematics-update@.service"
RULE = REPO / "firmware_config" / "51-telematics-update.rules"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_an_instance_of_the_update_unit_verifies(tmp_path):
    exe = tmp_path / "opt/telematics-agent/bin/telematics-agent"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    instance = tmp_path / "telematics-update@1.4.0.service"
    instance.write_text(UNIT.read_text().replace("/opt/telematics-agent/", f"{exe.parent.parent}/"))
    proc = subprocess.run(["systemd-analyze", "verify", str(instance)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and (proc.stdout + proc.stderr).strip() == ""
    assert "--version %i" in UNIT.read_text()


def test_the_polkit_rule_allows_only_update_units_the_agent_would_start():
    pattern = re.search(r"/(\^telematics-update@.*?\$)/", RULE.read_text()).group(1)
    allowed = re.compile(pattern.replace("\\.", r"\."))
    for version in ("0.2.0", "1.10.0rc1", "2.0.0.post1", "3.0.0-beta"):
        assert VERSION_RE.match(version) and allowed.match(f"telematics-update@{version}.service")
    for unit in ("telematics-agent.service", "telematics-update@.service", "telematics-update@x.service",
                 "telematics-update@1.0.service.d", "other@1.0.service"):
        assert not allowed.match(unit), unit
    text = RULE.read_text()
    assert 'action.lookup("verb") == "start"' in text and 'subject.user == "telematics"' in text
