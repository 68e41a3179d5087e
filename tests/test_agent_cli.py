"""Bad input at the agent's front door: one clear line each, never a traceback for an expected condition."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import free_port, wait_until

AGENT = str(Path(sys.executable).parent / "telematics-agent")


def run_agent(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([AGENT, *args], capture_output=True, text=True, timeout=timeout)


def test_config_with_a_typo_names_file_key_and_problem(tmp_path):
    config = tmp_path / "agent.yaml"
    config.write_text("device: {id: truck-7}\nmqtt:\n  hots: broker.example\n")
    for command in (["check-config", str(config)], ["run", "--config", str(config)]):
        result = run_agent(*command)
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert f"{config}: mqtt.hots: unknown key" in lines[0]
        assert "host" in lines[0], "the message lists the keys that exist"
        assert "Traceback" not in result.stderr


def test_config_with_a_wrong_type_and_a_missing_file(tmp_path):
    config = tmp_path / "agent.yaml"
    config.write_text("device: {id: truck-7}\nbuffer: {commit_window_s: soon}\n")
    result = run_agent("check-config", str(config))
    assert result.returncode == 2
    assert "buffer.commit_window_s: expected" in result.stderr
    missing = run_agent("check-config", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr and "Traceback" not in missing.stderr


def test_check_config_prints_the_defaults(tmp_path):
    config = tmp_path / "agent.yaml"
    config.write_text("device: {id: truck-7}\n")
    result = run_agent("check-config", str(config))
    assert result.returncode == 0, result.stderr
    assert "commit_window_s: 1.0" in result.stdout
    assert "topic_prefix: telematics" in result.stdout


def test_missing_serial_port_and_refused_broker_keep_the_agent_running(tmp_path):
    """No GPS at the configured port and nothing listening at the broker's: the agent says so once
    each, keeps running (it buffers and retries), and stops cleanly on SIGTERM."""
    config = tmp_path / "agent.yaml"
    config.write_text(
        f"device: {{id: truck-7, data_dir: {tmp_path / 'data'}}}\n"
        f"gps: {{port: {tmp_path / 'ttyNOPE'}, reopen_interval_s: 0.2}}\n"
        f"mqtt: {{port: {free_port()}, reconnect_min_s: 0.2, reconnect_max_s: 0.5}}\n"
    )
    log = tmp_path / "agent.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([AGENT, "run", "--config", str(config)], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "ttyNOPE" in log.read_text() and "refused" in log.read_text().lower(), timeout=20,
                   message="log lines about the port and the broker")
        time.sleep(2)  # several reopen and reconnect attempts
        assert proc.poll() is None, "the agent keeps running"
        text = log.read_text()
        assert "Traceback" not in text
        port_lines = [line for line in text.splitlines() if "ttyNOPE" in line]
        assert len(port_lines) == 1, f"one line per state change, not per retry: {port_lines}"
        refused = [line for line in text.splitlines() if "refused" in line.lower()]
        assert len(refused) == 1, refused
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    assert "stopped" in log.read_text()
