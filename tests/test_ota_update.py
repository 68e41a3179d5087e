"""Updates end to end. Fast: the update command through remote management (a real Mosquitto) is
checked, downloaded over HTTPS, verified and handed to the install step, or refused and reported.
Slow: install.sh into a staging root, the agent under a notify-socket supervisor, two real releases:
the broken one is rolled back within the health timeout with nothing in the buffer lost; the
working one stays."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import ssl
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from agent import __version__
from agent.clock import SystemClock
from agent.config import load_config
from agent.ota.install import Layout
from agent.ota.release import sha256_file
from agent.ota.update import STATE_NAME, Updater, apply_update, archive_path, parse_request
from agent.state_file import StateFile
from conftest import wait_until
from ota_helpers import Supervisor
from test_publish_tls import Pki


def make_config(tmp_path: Path, ota_releases, port: int = 1883, **update) -> tuple[Path, object]:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    raw = {
        "device": {"id": "truck-1", "data_dir": str(data)},
        "gps": {"enabled": False},
        "mqtt": {"port": port, "batch_max_wait_s": 0.1, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0,
                 "ack_timeout_s": 3.0},
        "status": {"interval_s": 0.5},
        "update": {"public_key": str(ota_releases.public_key_path), "python": sys.executable,
                   "install_root": str(tmp_path / "opt"), **update},
    }
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, load_config(path)


class Emitted(list):
    def types(self) -> list[str]:
        return [r.data.type for r in self]


@pytest.fixture(scope="module")
def https(tmp_path_factory):
    """A local HTTPS server (test CA) serving files from a directory at /NAME."""
    import http.server

    root = tmp_path_factory.mktemp("www")
    ca = Pki(tmp_path_factory.mktemp("pki"), "www-ca")
    cert, key = ca.issue("www", server=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)

    class Files(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Files)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server.root, server.ca_file = root, ca.ca_file
    server.url = f"https://127.0.0.1:{server.server_address[1]}"
    yield server
    server.shutdown()


def publish(https, archive: Path, name: str | None = None) -> dict:
    """Put ``archive`` on the server; the update command's args for it."""
    name = name or archive.name
    shutil.copy2(archive, https.root / name)
    return {"version": archive.name.split("-")[2].removesuffix(".tar"), "size": archive.stat().st_size,
            "sha256": sha256_file(archive), "url": f"{https.url}/{name}"}


@pytest.fixture
def systemctl(tmp_path, monkeypatch) -> Path:
    """A `systemctl` first in PATH that notes what it was asked (this machine runs no systemd);
    the file it writes is returned."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    out = tmp_path / "systemctl.txt"
    (bin_dir / "systemctl").write_text(f'#!/bin/sh\necho "$@" > {out}\n')
    (bin_dir / "systemctl").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return out


def updater_for(tmp_path, ota_releases, https, **update) -> tuple[Updater, Emitted]:
    path, config = make_config(tmp_path, ota_releases, ca_file=https.ca_file, **update)
    emitted = Emitted()
    return Updater(config, path, None, emitted.append, SystemClock()), emitted


def test_a_verified_download_is_handed_to_the_install_step(ota_releases, https, tmp_path, systemctl):
    updater, emitted = updater_for(tmp_path, ota_releases, https)
    args = publish(https, ota_releases.release("0.2.0"))
    assert updater.handle(args) == {"accepted": True, "version": "0.2.0"}
    wait_until(systemctl.exists, 30, message="the install step started")
    assert systemctl.read_text().split() == ["start", "--no-block", "telematics-update@0.2.0.service"]
    # Where the unit's `update apply --version 0.2.0` finds it:
    assert sha256_file(archive_path(updater.config, "0.2.0")) == args["sha256"]
    assert emitted == []


@pytest.mark.parametrize("case, reason", [
    ("other_key", "signature"),
    ("wrong_hash", "hash"),
    ("wrong_version", "version"),
    ("no_public_key", "key"),
])
def test_a_bad_archive_is_refused_before_install_and_reported(ota_releases, https, tmp_path, systemctl, case, reason):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from agent.ota.release import sign_archive

    updater, emitted = updater_for(tmp_path, ota_releases, https,
                                   **({"public_key": str(tmp_path / "missing.pub")} if case == "no_public_key" else {}))
    archive = ota_releases.release("0.2.0")
    if case == "other_key":
        archive = Path(shutil.copy2(ota_releases.release("0.2.0", signed=False), tmp_path / "telematics-agent-0.2.0.tar"))
        sign_archive(archive, Ed25519PrivateKey.generate())
    args = publish(https, archive, name=f"{case}.tar")
    if case == "wrong_hash":
        args["sha256"] = "0" * 64
    if case == "wrong_version":
        args["version"] = "0.2.1"
    updater.handle(args)
    wait_until(lambda: emitted, 30, message="the refusal event")
    assert emitted.types() == ["update_refused"]
    assert emitted[0].data.attrs["reason"].startswith(reason) and emitted[0].data.attrs["version"] == args["version"]
    assert not systemctl.exists()
    assert not list((Path(updater.config.device.data_dir) / "updates").glob("*.tar"))  # not kept, not resumed


def test_a_downgrade_is_refused_before_downloading(ota_releases, https, tmp_path):
    updater, emitted = updater_for(tmp_path, ota_releases, https, min_version="0.5.0")
    args = publish(https, ota_releases.release("0.2.0"))
    with pytest.raises(ValueError, match=r"refused \(downgrade\): version 0.2.0 is below the floor 0.5.0"):
        updater.handle(args)
    assert emitted.types() == ["update_refused"]
    assert not (Path(updater.config.device.data_dir) / "updates").exists()


@pytest.mark.parametrize("args, message", [
    ({"size": 1, "sha256": "0" * 64, "url": "https://x/y"}, "version"),
    ({"version": "1.0", "size": 0, "sha256": "0" * 64, "url": "https://x/y"}, "size"),
    ({"version": "1.0", "size": 5, "sha256": "abc", "url": "https://x/y"}, "sha256"),
    ({"version": "1.0", "size": 5, "sha256": "0" * 64, "url": "http://x/y"}, "https"),
    ({"version": "1.0", "size": 5, "sha256": "0" * 64}, "exactly one of url"),
    ({"version": "1.0", "size": 5, "sha256": "0" * 64, "mqtt": {"chunk_size": 10}}, "chunk_size"),
    ({"version": "../../etc", "size": 5, "sha256": "0" * 64, "url": "https://x/y"}, "version"),
])
def test_bad_requests_say_what_is_wrong(args, message):
    with pytest.raises(ValueError, match=message):
        parse_request(args)


def test_the_update_command_through_remote_management(ota_releases, https, tmp_path, mosquitto):
    from agent.ops.remote import RemoteManager
    from test_remote import Ops, PahoLink

    path, config = make_config(tmp_path, ota_releases, mosquitto.port, min_version="0.5.0")
    emitted = Emitted()
    link = PahoLink(mosquitto.port)
    updater = Updater(config, path, link, emitted.append, SystemClock())
    manager = RemoteManager(path, config, link, SystemClock(), apply=lambda c: None, link_up=link.connected.is_set,
                            status=dict, flush=lambda t: True, restart=lambda: None, update=updater.handle)
    stop = threading.Event()
    thread = threading.Thread(target=manager.run, args=(stop,), daemon=True)
    ops = Ops(mosquitto.port)
    try:
        thread.start()
        ops.wait_until_served()
        args = publish(https, ota_releases.release("0.2.0"))
        response = ops.send("command", {"id": "u1", "command": "update", "args": args})
        assert response == {"id": "u1", "ok": False,
                            "error": "refused (downgrade): version 0.2.0 is below the floor 0.5.0"}
        response = ops.send("command", {"id": "u2", "command": "update", "args": {"version": "1.0"}})
        assert response["ok"] is False and "size" in response["error"]
        assert emitted.types() == ["update_refused"]
    finally:
        stop.set()
        thread.join(5)
        ops.close()
        link.close()


def test_the_outcome_of_the_install_step_is_reported_once(ota_releases, tmp_path):
    path, config = make_config(tmp_path, ota_releases)
    state = StateFile(config.device.data_dir, STATE_NAME)
    state.save({"id": "a@1", "state": "trial", "version": __version__, "previous": "0.0.9"})
    emitted = Emitted()
    updater = Updater(config, path, None, emitted.append, SystemClock())
    updater.start()
    try:
        assert emitted.types() == ["update_trial"]
        state.save({"id": "a@1", "state": "done", "outcome": "applied", "version": __version__, "previous": "0.0.9",
                    "reason": "healthy"})
        wait_until(lambda: len(emitted) == 2, 10, message="the outcome event")
        assert emitted[1].data.type == "update_applied"
        assert emitted[1].data.attrs == {"version": __version__, "previous": "0.0.9", "reason": "healthy"}
        assert not updater.report_outcome()  # once only, also after a restart:
        assert not Updater(config, path, None, emitted.append, SystemClock()).report_outcome()
    finally:
        updater.close()


# -- the whole update on an installed agent ------------------------------------------------------


def collected(db: Path) -> list[tuple[int, str, dict]]:
    """(seq, kind, payload) of everything the collector stored, by seq."""
    if not db.exists():
        return []
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        rows = conn.execute("SELECT seq, kind, data FROM records WHERE device = 'truck-1' ORDER BY seq").fetchall()
    return [(seq, kind, json.loads(data)) for seq, kind, data in rows]


def types_in(db: Path) -> list[str]:
    return [data.get("type") for _, kind, data in collected(db) if kind in ("event", "status")]


@pytest.mark.slow
def test_install_then_a_broken_update_rolls_back_and_a_working_one_stays(ota_releases, tmp_path, mosquitto):
    from agent.buffer.store import DurableBuffer
    from agent.config import BufferConfig
    from agent.record import Fix, Record
    from collector.service import Collector
    from device_helpers import install

    root = tmp_path / "root"
    install("--root", str(root), "--wheelhouse", str(ota_releases.deps()))
    install_root = root / "opt" / "telematics-agent"
    health_timeout = 90.0
    config_path, config = make_config(tmp_path, ota_releases, mosquitto.port, install_root=str(install_root),
                                      health_timeout_s=health_timeout, max_restarts=3)
    layout = Layout(install_root, root / "etc" / "systemd" / "system")
    data = Path(config.device.data_dir)
    # Telemetry the collector has not confirmed yet: it must survive both updates.
    with DurableBuffer(data, BufferConfig(), SystemClock()) as buffer:
        buffer.append([Record(utc=1.7e9 + i, mono=float(i), data=Fix(lat=48.0, lon=11.0 + i * 1e-5)) for i in range(200)])
        buffer.flush()
    collector = Collector("127.0.0.1", mosquitto.port, "telematics", tmp_path / "collector.sqlite")
    supervisor = Supervisor(install_root, config_path, tmp_path).start()
    try:
        wait_until(lambda: supervisor.ready_pids, 60, message="the factory version's READY=1")

        # A release that cannot start: a crash loop, rolled back well within the health timeout.
        started = time.monotonic()
        broken = Path(shutil.copy2(ota_releases.release("0.3.0", broken=True), data / "updates.tar"))
        state = apply_update(broken, config, str(config_path), layout, supervisor)
        assert state["outcome"] == "rolled_back" and state["version"] == "0.3.0" and state["previous"] == __version__
        assert time.monotonic() - started < health_timeout
        assert state["reason"].startswith("crash loop")
        assert "telematics_module_that_does_not_exist" in state["log_tail"]
        assert layout.current_link() == "."
        dropin = (root / "etc/systemd/system/telematics-agent.service.d/ota.conf").read_text()
        assert f"ExecStart={install_root}/current/bin/telematics-agent run --config {config_path}" in dropin
        assert f"ExecStartPre=+{install_root}/bin/telematics-agent update recover --config {config_path}" in dropin
        assert not broken.exists()  # not tried again
        ready_before = len(supervisor.ready_pids)
        wait_until(lambda: len(supervisor.ready_pids) > ready_before or supervisor.state().active, 60,
                   message="the previous version back")

        # The collector comes up: everything buffered before the failed update arrives, once.
        collector.start()
        wait_until(lambda: {1, 200} <= {seq for seq, _, _ in collected(collector.db_path)}, 60,
                   message="the buffered fixes delivered")
        seqs = [seq for seq, _, _ in collected(collector.db_path)]
        assert set(range(1, 201)) <= set(seqs)
        wait_until(lambda: "update_rolled_back" in types_in(collector.db_path), 30,
                   message="the rollback reported by the version that came back")

        # The working release: proves itself healthy and stays.
        good = Path(shutil.copy2(ota_releases.release("0.2.0"), data / "updates.tar"))
        state = apply_update(good, config, str(config_path), layout, supervisor)
        assert state["outcome"] == "applied", state
        assert layout.current_link() == "versions/0.2.0"
        assert json.loads((data / "status.json").read_text())["version"] == "0.2.0"
        wait_until(lambda: "update_applied" in types_in(collector.db_path), 30, message="the applied event")
        kinds = types_in(collector.db_path)
        assert kinds.index("update_trial") < kinds.index("update_applied")
        applied = next(d["attrs"] for _, _, d in collected(collector.db_path) if d.get("type") == "update_applied")
        assert applied["version"] == "0.2.0" and applied["previous"] == __version__
        rolled = next(d["attrs"] for _, _, d in collected(collector.db_path) if d.get("type") == "update_rolled_back")
        assert rolled["version"] == "0.3.0" and "telematics_module_that_does_not_exist" in rolled["log_tail"]
        # Still nothing lost, nothing twice.
        seqs = [seq for seq, _, _ in collected(collector.db_path)]
        assert len(seqs) == len(set(seqs)) and set(range(1, 201)) <= set(seqs)
        # The failed version's directory stays until pruned; the good one is complete.
        assert layout.is_installed("0.2.0")

        # Uninstalling removes the versions and the drop-in too; the buffer stays.
        supervisor.close()
        install("--root", str(root), "--uninstall")
        assert not install_root.exists() and not (root / "etc/systemd/system/telematics-agent.service.d").exists()
        assert (data / "buffer.sqlite").exists()
    finally:
        supervisor.close()
        collector.stop()


def test_an_update_over_mqtt_chunks_from_the_backend(ota_releases, tmp_path, mosquitto, systemctl):
    from collector.ota_chunks import ChunkServer
    from test_remote import PahoLink

    archive = ota_releases.release("0.2.0")
    releases = tmp_path / "releases"
    releases.mkdir()
    shutil.copy2(archive, releases / archive.name)
    path, config = make_config(tmp_path, ota_releases, mosquitto.port, chunk_idle_s=2.0)
    link = PahoLink(mosquitto.port)
    server = ChunkServer("127.0.0.1", mosquitto.port, "telematics", releases).start()
    emitted = Emitted()
    updater = Updater(config, path, link, emitted.append, SystemClock())
    try:
        wait_until(link.connected.is_set, 10, message="the device link")
        updater.start()
        chunk_size = 256 * 1024
        updater.handle({"version": "0.2.0", "size": archive.stat().st_size, "sha256": sha256_file(archive),
                        "mqtt": {"chunk_size": chunk_size}})
        wait_until(systemctl.exists, 120, message="the install step started")
        assert sha256_file(archive_path(config, "0.2.0")) == sha256_file(archive) and emitted == []
        assert server.counts["chunks"] >= -(-archive.stat().st_size // chunk_size)
    finally:
        updater.close()
        server.stop()
        link.close()


def test_the_chunk_server_serves_only_releases_it_has(tmp_path):
    from collector.ota_chunks import ChunkServer

    (tmp_path / "telematics-agent-1.0.0.tar").write_bytes(bytes(range(256)) * 10)
    server = ChunkServer("127.0.0.1", 1, "telematics", tmp_path)
    one = server.chunks_for(json.dumps({"version": "1.0.0", "chunk_size": 1000, "chunks": [[2, 2]]}).encode())
    assert len(one) == 1 and one[0].endswith((bytes(range(256)) * 10)[2000:])
    for request, error in [
        ({"version": "../../etc/passwd", "chunk_size": 10, "chunks": [[0, 0]]}, "bad version"),
        ({"version": "1.0.0", "chunk_size": 10, "chunks": [[0, 1000]]}, "at a time"),
        ({"version": "1.0.0", "chunk_size": 1000, "chunks": [[3, 3]]}, "beyond the end"),
        ({"version": "1.0.0", "chunk_size": 0, "chunks": [[0, 0]]}, "chunk_size"),
    ]:
        with pytest.raises(ValueError, match=error):
            server.chunks_for(json.dumps(request).encode())
    with pytest.raises(FileNotFoundError):
        server.chunks_for(json.dumps({"version": "2.0.0", "chunk_size": 10, "chunks": [[0, 0]]}).encode())


def test_a_trial_nobody_watches_any_more_is_rolled_back_before_the_next_start(ota_releases, tmp_path):
    import subprocess

    from agent.ota.update import recover

    path, config = make_config(tmp_path, ota_releases)
    layout = Layout(tmp_path / "opt")
    (layout.versions / "0.2.0").mkdir(parents=True)
    layout.switch("versions/0.2.0")
    state = StateFile(config.device.data_dir, STATE_NAME)
    # The apply step still watching: nothing to do.
    state.save({"id": "a@1", "state": "trial", "version": "0.2.0", "previous": "0.1.0", "previous_link": ".",
                "pid": os.getpid()})
    assert recover(config, layout) is None and layout.current_link() == "versions/0.2.0"
    # Its process gone (a power cut, a crash): back to the previous version, reported as rolled back.
    dead = subprocess.Popen(["true"])
    dead.wait()
    state.save({**state.load(), "pid": dead.pid})
    cli = subprocess.run([str(Path(sys.executable).parent / "telematics-agent"), "update", "recover", "--config", str(path)],
                         capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["outcome"] == "rolled_back"
    assert layout.current_link() == "."
    emitted = Emitted()
    Updater(config, path, None, emitted.append, SystemClock()).report_outcome()
    assert emitted.types() == ["update_rolled_back"] and emitted[0].data.attrs["reason"].startswith("interrupted")
    assert recover(config, layout) is None  # done: nothing more


def test_the_running_agent_serves_the_update_command(ota_releases, https, tmp_path, mosquitto, systemctl,
                                                     collector_sqlite):
    """agent.app.Agent in-process: the command through its remote management, the download, the
    hand-over to the install unit; a refusal reaches the collector as an event."""
    from agent.app import Agent
    from test_remote import DEVICE, Ops

    path, _ = make_config(tmp_path, ota_releases, mosquitto.port, ca_file=https.ca_file)
    raw = yaml.safe_load(path.read_text())
    raw["device"]["id"] = DEVICE
    path.write_text(yaml.safe_dump(raw))
    agent = Agent(load_config(path), config_path=path)
    ops = Ops(mosquitto.port)
    try:
        agent.start()
        ops.wait_until_served()
        low = ops.send("command", {"id": "u0", "command": "update", "args": {**publish(https, ota_releases.release("0.2.0")),
                                                                             "version": "0.0.9"}})
        assert low["ok"] is False and low["error"].startswith("refused (downgrade)")
        args = publish(https, ota_releases.release("0.2.0"))
        assert ops.send("command", {"id": "u1", "command": "update", "args": args}) == {
            "id": "u1", "ok": True, "result": {"accepted": True, "version": "0.2.0"}}
        wait_until(systemctl.exists, 60, message="the install unit started")
        assert systemctl.read_text().split() == ["start", "--no-block", "telematics-update@0.2.0.service"]

        def refused_events():
            with sqlite3.connect(f"file:{collector_sqlite.db_path}?mode=ro", uri=True, timeout=5) as conn:
                rows = conn.execute("SELECT data FROM records WHERE device = ? AND kind = 'event'", (DEVICE,)).fetchall()
            return [json.loads(d)["attrs"] for (d,) in rows if json.loads(d)["type"] == "update_refused"]

        wait_until(lambda: collector_sqlite.db_path.exists() and refused_events(), 20, message="the refusal event stored")
        assert refused_events()[0]["version"] == "0.0.9" and refused_events()[0]["reason"].startswith("downgrade")
    finally:
        ops.close()
        agent.stop()
