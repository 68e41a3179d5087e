"""The whole agent (agent.app.Agent, in-process) over mutual TLS: it renews its certificate by
itself, the renewal reaches the collector as a status record, and a restarted agent starts on the
renewed pair."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from pathlib import Path

import yaml

from agent.app import Agent
from agent.certs.renew import POINTER
from agent.config import load_config
from collector.signing import LocalCa, SigningService
from conftest import wait_until
from test_cert_renewal import DEVICE, ca_files, provisioned  # noqa: F401  (fixture)
from test_publish_tls import pki, tls_broker  # noqa: F401  (fixtures: test CA, Mosquitto requiring client certs)


def status_types(db: Path) -> list[str]:
    if not db.exists():
        return []
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        rows = conn.execute("SELECT data FROM records WHERE device = ? AND kind IN ('status', 'event') ORDER BY seq",
                            (DEVICE,)).fetchall()
    return [json.loads(data)["type"] for (data,) in rows]


def test_the_agent_renews_and_restarts_on_the_renewed_pair(tmp_path, tls_broker, ca_files, data_dir):  # noqa: F811
    from collector.service import Collector

    old = provisioned(tmp_path, ca_files, lifetime=dt.timedelta(days=10))
    config_path = tmp_path / "agent.yaml"
    config_path.write_text(yaml.safe_dump({
        "device": {"id": DEVICE, "data_dir": str(data_dir)},
        "gps": {"enabled": False},
        "mqtt": {"port": tls_broker.port, "batch_max_wait_s": 0.1, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0,
                 "tls": {"ca_file": old.ca_file, "cert_file": old.cert_file, "key_file": old.key_file}},
        "certificates": {"renew_before_days": 30.0, "check_interval_s": 3600.0, "response_timeout_s": 10.0},
    }))
    config = load_config(config_path)
    collector = Collector("127.0.0.1", tls_broker.plain_port, "telematics", tmp_path / "c.sqlite").start()
    signing = SigningService("127.0.0.1", tls_broker.plain_port, "telematics", LocalCa(*ca_files)).start()
    agent = Agent(config, config_path=config_path)
    try:
        agent.start()  # 10 days left, a 30-day margin: due at the first look
        wait_until(lambda: "certificate_renewed" in status_types(collector.db_path), 30,
                   message="the renewal reported through the agent's own telemetry")
        renewed = json.loads((data_dir / "tls" / POINTER).read_text())
        assert agent.link.tls.cert_file == renewed["cert_file"] != old.cert_file
        agent.stop()

        agent = Agent(config, config_path=config_path)
        agent.start()
        assert agent.link.tls.cert_file == renewed["cert_file"]  # not the provisioned one any more
        wait_until(lambda: agent.link.stats()["connected"], 15, message="connected on the renewed pair")
    finally:
        agent.stop()
        signing.stop()
        collector.stop()
