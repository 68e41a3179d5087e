"""Mutual TLS against a real Mosquitto: the test makes its own CA, server and client certificates."""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.config import TlsConfig
from conftest import MosquittoBroker, free_port, wait_until
from transport_helpers import Device, assert_exactly_once_in_order, count

LOG = "agent.publish.mqtt_link"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class Pki:
    """A throw-away CA issuing certificates into ``directory`` (keys mode 600)."""

    def __init__(self, directory: Path, name: str) -> None:
        self.dir = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        self.cert = (
            x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.ca_file = self._write_cert(f"{name}.pem", self.cert)

    def issue(self, cn: str, server: bool = False, expired: bool = False) -> tuple[str, str]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        start, end = (now - dt.timedelta(days=10), now - dt.timedelta(days=1)) if expired else (now - dt.timedelta(days=1), now + dt.timedelta(days=30))
        builder = (
            x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(self.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
                critical=False,
            )
        cert = builder.sign(self.key, hashes.SHA256())
        key_path = self.dir / f"{cn}.key"
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        os.chmod(key_path, 0o600)
        return self._write_cert(f"{cn}.pem", cert), str(key_path)

    def _write_cert(self, name: str, cert: x509.Certificate) -> str:
        path = self.dir / name
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return str(path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    ca = Pki(directory, "fleet-ca")
    return {
        "ca": ca,
        "other_ca": Pki(directory, "other-ca"),
        "server": ca.issue("broker", server=True),
        "client": ca.issue("truck-1"),
        "expired": ca.issue("truck-expired", expired=True),
    }


@pytest.fixture
def tls_broker(tmp_path_factory, pki):
    """Mosquitto with a TLS listener requiring client certificates, plus a plain one for the collector."""
    cert, key = pki["server"]
    plain_port = free_port()
    broker = MosquittoBroker(
        tmp_path_factory.mktemp("tls-broker"),
        extra_conf=(
            # Mosquitto started as root drops to the mosquitto user, which cannot read pytest's 0700 dirs.
            ("user root\n" if os.geteuid() == 0 else "")
            + f"cafile {pki['ca'].ca_file}\ncertfile {cert}\nkeyfile {key}\nrequire_certificate true\n"
            f"listener {plain_port} 127.0.0.1\n"
        ),
    )
    broker.start()
    broker.plain_port = plain_port
    yield broker
    broker.stop()


def test_mutual_tls_connects_and_delivers(data_dir, tls_broker, pki, tmp_path):
    from collector.service import Collector

    cert, key = pki["client"]
    device = Device(data_dir, tls_broker.port, tls=TlsConfig(ca_file=pki["ca"].ca_file, cert_file=cert, key_file=key))
    with Collector("127.0.0.1", tls_broker.plain_port, "telematics", tmp_path / "c.sqlite") as collector:
        device.start()
        try:
            device.drive(100)
            wait_until(lambda: count(collector.db_path) == len(device.appended), 15, message="delivery over TLS")
            assert_exactly_once_in_order(collector.db_path, device.appended)
        finally:
            device.stop()


@pytest.mark.parametrize(
    "case, expected",
    [
        ("wrong_ca", "TLS: the broker's certificate was not accepted: "),
        ("expired_client", "certificate expired"),
        ("no_client_cert", "certificate required"),
        ("world_readable_key", "refusing the TLS key file"),
    ],
)
def test_tls_failures_give_one_clear_line_and_keep_buffering(data_dir, tls_broker, pki, caplog, case, expected):
    caplog.set_level(logging.INFO, LOG)
    cert, key = pki["client"]
    tls = TlsConfig(ca_file=pki["ca"].ca_file, cert_file=cert, key_file=key)
    if case == "wrong_ca":
        tls = TlsConfig(ca_file=pki["other_ca"].ca_file, cert_file=cert, key_file=key)
    elif case == "expired_client":
        tls = TlsConfig(ca_file=pki["ca"].ca_file, cert_file=pki["expired"][0], key_file=pki["expired"][1])
    elif case == "no_client_cert":
        tls = TlsConfig(ca_file=pki["ca"].ca_file)
    elif case == "world_readable_key":
        readable = data_dir.parent / "readable.key"
        readable.write_bytes(Path(key).read_bytes())
        os.chmod(readable, 0o644)
        tls = TlsConfig(ca_file=pki["ca"].ca_file, cert_file=cert, key_file=str(readable))
    device = Device(data_dir, tls_broker.port, tls=tls)
    device.start()
    try:
        device.drive(50)
        wait_until(lambda: expected in caplog.text, 10, message=f"a log line saying {expected!r}")
        lines = [r for r in caplog.records if expected in r.getMessage()]
        assert len(lines) == 1 and not lines[0].exc_info
        if case == "world_readable_key":
            assert "chmod 600" in lines[0].getMessage()
        assert not device.link.stats()["connected"]
        wait_until(lambda: device.buffer.stats()["depth"] == len(device.appended), 5, message="records kept")
    finally:
        device.stop()


def test_tls_waits_for_a_plausible_clock(data_dir, tls_broker, pki, tmp_path, caplog):
    """A Pi without a real-time clock boots in 1970: every certificate would be "not yet valid".
    The link holds TLS (one line saying why), keeps buffering, and connects once the clock is set."""
    from collector.service import Collector

    caplog.set_level(logging.INFO, LOG)
    clock_set = threading.Event()
    cert, key = pki["client"]
    device = Device(data_dir, tls_broker.port, clock_plausible=clock_set.is_set,
                    tls=TlsConfig(ca_file=pki["ca"].ca_file, cert_file=cert, key_file=key))
    with Collector("127.0.0.1", tls_broker.plain_port, "telematics", tmp_path / "c.sqlite") as collector:
        device.start()
        try:
            device.drive(40)
            wait_until(lambda: "holding the TLS connection" in caplog.text, 10, message="the hold explained")
            time.sleep(1.0)  # several retries meanwhile: still one line, nothing sent
            assert len([r for r in caplog.records if "holding the TLS connection" in r.getMessage()]) == 1
            assert not device.link.stats()["connected"] and count(collector.db_path) == 0
            clock_set.set()  # GPS time or NTP arrived
            wait_until(lambda: count(collector.db_path) == len(device.appended), 20, message="delivery after the clock was set")
            assert_exactly_once_in_order(collector.db_path, device.appended)
        finally:
            device.stop()
