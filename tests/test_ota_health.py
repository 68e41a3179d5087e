"""The health verdict on a new version: real processes under the notify-socket supervisor
(tests/ota_helpers.py): one that crash-loops, one that is healthy, one whose watchdog never comes."""

from __future__ import annotations

import json
import sys
import textwrap
import time
from pathlib import Path

import pytest

from agent.ota.health import ServiceState, await_health, check_once
from ota_helpers import Supervisor

# Stands where telematics-agent would: argv is "run --config FILE"; FILE names the status file.
AGENT_LIKE = textwrap.dedent(
    """\
    #!{python}
    import json, os, socket, sys, time
    status = sys.argv[3]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.sendto(b"READY=1", os.environ["NOTIFY_SOCKET"])
    while True:
        if {watchdog}:
            sock.sendto(b"WATCHDOG=1", os.environ["NOTIFY_SOCKET"])
        doc = {{"pid": os.getpid(), "version": "2.0.0", "state": "running",
               "broker": {{"connected": True, "acked_batches": 3}}, "buffer": {{"commits": 5}}}}
        with open(status + ".tmp", "w") as fh:
            json.dump(doc, fh)
        os.replace(status + ".tmp", status)
        time.sleep(0.1)
    """
)


def install_fake(root: Path, body: str) -> Path:
    exe = root / "bin" / "telematics-agent"
    exe.parent.mkdir(parents=True)
    exe.write_text(body)
    exe.chmod(0o755)
    return exe


def supervise(tmp_path: Path, body: str) -> tuple[Supervisor, Path]:
    root = tmp_path / "opt"
    install_fake(root, body)
    status = tmp_path / "status.json"
    return Supervisor(root, status, tmp_path, restart_s=0.2).start(), status


def test_a_crash_loop_fails_at_once(tmp_path):
    supervisor, status = supervise(tmp_path, "#!/bin/sh\necho 'ModuleNotFoundError: no module named x' >&2\nexit 1\n")
    try:
        start = time.monotonic()
        verdict = await_health(supervisor, status, "2.0.0", timeout_s=60, max_restarts=3)
        assert not verdict.healthy and verdict.reason.startswith("crash loop: restarted 3 times")
        assert time.monotonic() - start < 10  # not the 60 s timeout
        assert any("ModuleNotFoundError" in line for line in supervisor.log_tail(0, 20))
    finally:
        supervisor.close()


def test_a_healthy_version_passes(tmp_path):
    supervisor, status = supervise(tmp_path, AGENT_LIKE.format(python=sys.executable, watchdog=True))
    try:
        verdict = await_health(supervisor, status, "2.0.0", timeout_s=20, max_restarts=2)
        assert verdict.healthy, verdict
    finally:
        supervisor.close()


def test_no_watchdog_means_not_healthy_within_the_timeout(tmp_path):
    supervisor, status = supervise(tmp_path, AGENT_LIKE.format(python=sys.executable, watchdog=False))
    try:
        verdict = await_health(supervisor, status, "2.0.0", timeout_s=2, max_restarts=2)
        assert not verdict.healthy and verdict.reason == "not healthy within 2 s: no watchdog ping since the switch"
    finally:
        supervisor.close()


GOOD = {"pid": 42, "version": "2.0.0", "state": "running", "broker": {"connected": True, "acked_batches": 1},
        "buffer": {"commits": 1}}


@pytest.mark.parametrize("state, status, missing", [
    (ServiceState(True, 42, 0, 105.0), GOOD, []),
    (ServiceState(False, None, 0, 105.0), GOOD, ["service not running", "no status from version 2.0.0 (pid None)"]),
    (ServiceState(True, 42, 0, 99.0), GOOD, ["no watchdog ping since the switch"]),
    (ServiceState(True, 42, 0, None), GOOD, ["no watchdog ping since the switch"]),
    (ServiceState(True, 42, 0, 101.0), GOOD, []),
    (ServiceState(True, 43, 0, 105.0), GOOD, ["no status from version 2.0.0 (pid 43)"]),  # the old process's file
    (ServiceState(True, 42, 0, 105.0), {**GOOD, "version": "1.0.0"}, ["no status from version 2.0.0 (pid 42)"]),
    (ServiceState(True, 42, 0, 105.0), {**GOOD, "broker": {"connected": False, "acked_batches": 0}},
     ["broker not connected", "no records acknowledged"]),
    (ServiceState(True, 42, 0, 105.0), {**GOOD, "buffer": {"commits": 0}}, ["no records committed"]),
    (ServiceState(True, 42, 0, 105.0), {**GOOD, "state": "stopped"}, ["status says stopped"]),
])
def test_what_is_missing_for_a_healthy_verdict(state, status, missing):
    assert check_once(state, json.loads(json.dumps(status)), "2.0.0", since_mono=100.0, now_mono=106.0) == missing


def test_a_watchdog_that_stopped_coming_is_missing():
    assert check_once(ServiceState(True, 42, 0, 101.0), GOOD, "2.0.0", 100.0, 140.0) == ["no watchdog ping for 39 s"]
