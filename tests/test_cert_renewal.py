"""Certificate renewal against a test CA and a Mosquitto that requires client certificates: a
certificate close to expiry is replaced without a gap in delivery (the broker restarted after the
old one expired still lets the device in); a bad answer from the signing service leaves the device
on its old pair; the signing service's own checks and its hook for a fleet's CA."""

from __future__ import annotations

import datetime as dt
import json
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from agent.certs.renew import POINTER, CertRenewer, effective_mqtt, not_after
from agent.clock import SystemClock
from agent.config import TlsConfig, parse_config
from collector.signing import CommandCa, LocalCa, SigningService
from conftest import wait_until
from test_publish_tls import pki, tls_broker  # noqa: F401  (fixtures: test CA, Mosquitto requiring client certs)
from transport_helpers import Device, assert_exactly_once_in_order, count

DEVICE = "truck-1"


def csr_for(cn: str, key=None) -> tuple[x509.CertificateSigningRequest, object]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
           .sign(key, hashes.SHA256()))
    return csr, key


def write_key(path: Path, key) -> str:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    return str(path)


@pytest.fixture(scope="module")
def ca_files(pki, tmp_path_factory) -> tuple[str, str]:  # noqa: F811
    """(certificate, key) of the CA that signed the broker's certificate, as the signing service holds them."""
    ca = pki["ca"]
    return ca.ca_file, write_key(tmp_path_factory.mktemp("ca") / "ca.key", ca.key)


@pytest.fixture(scope="module")
def fleet_ca(ca_files) -> LocalCa:
    return LocalCa(*ca_files)  # 90-day certificates


def provisioned(tmp_path: Path, ca_files: tuple[str, str], lifetime: dt.timedelta) -> TlsConfig:
    """A device pair as provisioning leaves it (under /etc in real life), valid for ``lifetime``."""
    csr, key = csr_for(DEVICE)
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "client.pem").write_bytes(LocalCa(*ca_files, lifetime=lifetime).sign(csr, DEVICE))
    return TlsConfig(ca_file=ca_files[0], cert_file=str(etc / "client.pem"), key_file=write_key(etc / "client.key", key))


def agent_config(data_dir: Path, port: int, tls: TlsConfig, **certificates):
    raw = {"device": {"id": DEVICE, "data_dir": str(data_dir)},
           "mqtt": {"port": port, "tls": {"ca_file": tls.ca_file, "cert_file": tls.cert_file, "key_file": tls.key_file}},
           "certificates": {"renew_before_days": 1.0, "check_interval_s": 0.5, "response_timeout_s": 10.0, **certificates}}
    return parse_config(yaml.safe_dump(raw))


class Rig:
    """Device (buffer + link over mutual TLS), collector and signing service on the plain listener,
    a renewer, and a driver appending records all the time while sampling the link's state."""

    def __init__(self, data_dir: Path, broker, tls: TlsConfig, signer, collector_db: Path) -> None:
        from collector.service import Collector

        self.config = agent_config(data_dir, broker.port, tls)
        self.device = Device(data_dir, broker.port, tls=tls)
        self.collector = Collector("127.0.0.1", broker.plain_port, "telematics", collector_db)
        self.signing = SigningService("127.0.0.1", broker.plain_port, "telematics", signer)
        self.emitted: list = []
        self.renewer = CertRenewer(self.config, self.device.link, self.emitted.append, SystemClock())
        self.down_streaks: list[float] = []
        self._stop = threading.Event()
        self._driver = threading.Thread(target=self._drive, daemon=True)

    def start(self) -> "Rig":
        self.collector.start()
        self.signing.start()
        self.device.start()
        wait_until(lambda: self.device.link.stats()["connected"], 15, message="the device connected")
        self._driver.start()
        return self

    def _drive(self) -> None:
        down_since = None
        while not self._stop.wait(0.02):
            self.device.drive(2, events_every=0)
            connected = self.device.link.stats()["connected"]
            if not connected and down_since is None:
                down_since = time.monotonic()
            elif connected and down_since is not None:
                self.down_streaks.append(time.monotonic() - down_since)
                down_since = None

    def types(self) -> list[str]:
        return [r.data.type for r in self.emitted]

    def stop_driving(self) -> None:
        self._stop.set()
        self._driver.join(5)

    def close(self) -> None:
        self.stop_driving()
        self.renewer.close()
        self.device.stop()
        self.signing.stop()
        self.collector.stop()


def test_a_certificate_close_to_expiry_is_replaced_without_a_gap(tmp_path, tls_broker, ca_files, fleet_ca, data_dir):  # noqa: F811
    old = provisioned(tmp_path, ca_files, lifetime=dt.timedelta(seconds=15))
    rig = Rig(data_dir, tls_broker, old, fleet_ca, tmp_path / "c.sqlite").start()
    try:
        rig.renewer.start()
        wait_until(lambda: "certificate_renewed" in rig.types(), 30, message="the renewal")
        first = rig.device.link.tls
        assert Path(first.cert_file).parent == data_dir / "tls" and first.ca_file == old.ca_file
        assert not_after(first.cert_file) - not_after(old.cert_file) > dt.timedelta(days=80)
        assert json.loads((data_dir / "tls" / POINTER).read_text()) == {"cert_file": first.cert_file,
                                                                          "key_file": first.key_file}
        assert Path(first.key_file).stat().st_mode & 0o077 == 0  # the link refuses keys others can read
        assert Path(old.cert_file).exists()  # the provisioned pair is not the agent's to delete
        assert effective_mqtt(rig.config).tls == first  # and after a restart, the agent starts on the new pair

        # A second renewal (the command): the first renewed pair is discarded once the new one is in use.
        assert rig.renewer.handle({})["renewing"] is True
        wait_until(lambda: rig.types().count("certificate_renewed") == 2, 30, message="the second renewal")
        second = rig.device.link.tls
        assert second.cert_file != first.cert_file and Path(second.cert_file).exists()
        assert not Path(first.cert_file).exists() and not Path(first.key_file).exists()

        # Once the old certificate has expired, a reconnect proves the link runs on the new one.
        wait_until(lambda: dt.datetime.now(dt.timezone.utc) > not_after(old.cert_file) + dt.timedelta(seconds=1), 40,
                   interval=0.5, message="the old certificate expired")
        streaks_before_restart = list(rig.down_streaks)
        tls_broker.restart()
        connects = rig.device.link.stats()["connects"]
        wait_until(lambda: rig.device.link.stats()["connects"] > connects and rig.device.link.stats()["connected"], 30,
                   message="the link back after the broker restart")
        rig.stop_driving()
        wait_until(lambda: count(rig.collector.db_path) == len(rig.device.appended), 30, message="every record stored")
        assert_exactly_once_in_order(rig.collector.db_path, rig.device.appended)
        # No gap: each switch of certificate cost one quick reconnect.
        assert streaks_before_restart and max(streaks_before_restart) < 2.0, streaks_before_restart
        assert "certificate_renewal_failed" not in rig.types()
    finally:
        rig.close()


class OtherKeySigner:
    """A signing service gone wrong: signs a certificate for a key the device never made."""

    def __init__(self, ca: LocalCa) -> None:
        self.ca = ca

    def sign(self, csr, device_id):
        return self.ca.sign(csr_for(device_id)[0], device_id)


@pytest.mark.parametrize("case, reason", [
    ("other_key", "the certificate is not for the key made for it"),
    ("untrusted_ca", "the broker refused the new certificate"),
    ("ca_command_fails", "the signing service refused: the CA command failed"),
])
def test_a_bad_certificate_leaves_the_device_on_its_old_one(tmp_path, tls_broker, ca_files, fleet_ca, pki, data_dir, case, reason):  # noqa: F811
    old = provisioned(tmp_path, ca_files, lifetime=dt.timedelta(days=10))
    if case == "other_key":
        signer = OtherKeySigner(fleet_ca)
    elif case == "untrusted_ca":
        other = pki["other_ca"]
        signer = LocalCa(other.ca_file, write_key(tmp_path / "other.key", other.key))
    else:
        signer = CommandCa(["/bin/sh", "-c", "echo 'CA offline' >&2; exit 3"])
    rig = Rig(data_dir, tls_broker, old, signer, tmp_path / "c.sqlite").start()
    try:
        rig.renewer.start()  # subscribes to the answers; not due yet (10 days left, 1 day margin)
        assert rig.renewer.renew("test") is False
        assert rig.types() == ["certificate_renewal_failed"]
        assert rig.emitted[0].data.attrs["reason"].startswith(reason), rig.emitted[0].data.attrs
        assert rig.device.link.tls == old
        assert not (data_dir / "tls" / POINTER).exists()
        assert sorted(p.name for p in (data_dir / "tls").iterdir()) == []  # the new key is gone too
        assert effective_mqtt(rig.config).tls == rig.config.mqtt.tls
        rig.stop_driving()
        wait_until(lambda: count(rig.collector.db_path) == len(rig.device.appended), 30, message="delivery goes on")
        assert_exactly_once_in_order(rig.collector.db_path, rig.device.appended)
    finally:
        rig.close()


def test_no_answer_is_reported_and_the_old_pair_stays(tmp_path, tls_broker, ca_files, fleet_ca, data_dir):  # noqa: F811
    old = provisioned(tmp_path, ca_files, lifetime=dt.timedelta(days=10))
    rig = Rig(data_dir, tls_broker, old, fleet_ca, tmp_path / "c.sqlite")
    rig.config = agent_config(data_dir, tls_broker.port, old, response_timeout_s=1.0)
    rig.renewer = CertRenewer(rig.config, rig.device.link, rig.emitted.append, SystemClock())
    rig.collector.start()
    rig.device.start()  # no signing service
    try:
        wait_until(lambda: rig.device.link.stats()["connected"], 15, message="the device connected")
        assert rig.renewer.renew("test") is False
        assert rig.emitted[0].data.attrs["reason"] == "no answer from the signing service within 1 s"
        assert rig.device.link.tls == old
    finally:
        rig.renewer.close()
        rig.device.stop()
        rig.collector.stop()


def test_not_due_while_far_from_expiry(tmp_path, ca_files, data_dir):
    old = provisioned(tmp_path, ca_files, lifetime=dt.timedelta(days=40))

    class Link:
        tls = old

    config = agent_config(data_dir, 1883, old, renew_before_days=30.0)
    assert not CertRenewer(config, Link(), list().append, SystemClock()).due()
    config = agent_config(data_dir, 1883, old, renew_before_days=41.0)
    assert CertRenewer(config, Link(), list().append, SystemClock()).due()


def test_a_renewed_pair_that_does_not_match_is_not_used(tmp_path, ca_files, fleet_ca, data_dir):
    old = provisioned(tmp_path, ca_files, lifetime=dt.timedelta(days=10))
    config = agent_config(data_dir, 1883, old)
    (data_dir / "tls").mkdir()
    csr, key = csr_for(DEVICE)
    cert = data_dir / "tls" / "client-x.pem"
    cert.write_bytes(fleet_ca.sign(csr, DEVICE))
    other_key = write_key(data_dir / "tls" / "client-x.key", ec.generate_private_key(ec.SECP256R1()))
    (data_dir / "tls" / POINTER).write_text(json.dumps({"cert_file": str(cert), "key_file": other_key}))
    assert effective_mqtt(config).tls == config.mqtt.tls
    write_key(Path(other_key), key)
    assert effective_mqtt(config).tls.cert_file == str(cert)


# -- the signing service's checks -------------------------------------------------------------------


def test_the_signing_service_signs_only_sound_requests_for_the_asking_device(fleet_ca):
    service = SigningService("127.0.0.1", 1, "telematics", fleet_ca)
    csr, key = csr_for(DEVICE)
    ok = service.handle(DEVICE, json.dumps({"id": "r1", "csr": csr.public_bytes(serialization.Encoding.PEM).decode()}).encode())
    cert = x509.load_pem_x509_certificate(ok["certificate"].encode())
    assert ok["id"] == "r1" and cert.subject.rfc4514_string() == f"CN={DEVICE}"
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    cert.verify_directly_issued_by(fleet_ca.cert)
    # Another device's name, a weak key, not JSON, no CSR:
    other, _ = csr_for("truck-2")
    weak, _ = csr_for(DEVICE, rsa.generate_private_key(public_exponent=65537, key_size=1024))
    cases = {
        json.dumps({"id": "r2", "csr": other.public_bytes(serialization.Encoding.PEM).decode()}): "CN must be the device id",
        json.dumps({"id": "r3", "csr": weak.public_bytes(serialization.Encoding.PEM).decode()}): "at least 2048 bits",
        "nope": "not JSON",
        json.dumps({"id": "r5"}): "expected",
        json.dumps({"id": "r6", "csr": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"}): "not a PEM",
    }
    for payload, error in cases.items():
        response = service.handle(DEVICE, payload.encode())
        assert error in response["error"] and "certificate" not in response
    assert service.counts == {"signed": 1, "refused": 5}


def test_the_fleets_own_ca_behind_a_command(ca_files):
    """The hook: CSR on stdin, device id in the environment, certificate on stdout."""
    script = (
        "import os, sys; from cryptography import x509; from collector.signing import LocalCa; "
        f"ca = LocalCa({ca_files[0]!r}, {ca_files[1]!r}); "
        "sys.stdout.buffer.write(ca.sign(x509.load_pem_x509_csr(sys.stdin.buffer.read()), os.environ['TELEMATICS_DEVICE_ID']))"
    )
    csr, _ = csr_for(DEVICE)
    pem = CommandCa([sys.executable, "-c", script]).sign(csr, DEVICE)
    assert x509.load_pem_x509_certificate(pem).subject.rfc4514_string() == f"CN={DEVICE}"


def test_sign_certs_command_answers_over_mqtt(ca_files, mosquitto):
    import queue
    import signal
    import subprocess

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    exe = str(Path(sys.executable).parent / "telematics-collector")
    bad = subprocess.run([exe, "sign-certs", "--ca-cert", ca_files[0]],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip() == "telematics-collector sign-certs: --ca-cert needs --ca-key (and the other way round)"
    proc = subprocess.Popen([exe, "sign-certs", "--port", str(mosquitto.port),
                             "--ca-cert", ca_files[0], "--ca-key", ca_files[1], "--days", "7"])
    answers: queue.Queue = queue.Queue()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="truck-1-test")
    client.on_message = lambda c, u, m: answers.put(json.loads(m.payload))
    client.connect("127.0.0.1", mosquitto.port)
    client.subscribe(f"telematics/{DEVICE}/cert/response", qos=1)
    client.loop_start()
    try:
        csr, _ = csr_for(DEVICE)
        request = json.dumps({"id": "q1", "csr": csr.public_bytes(serialization.Encoding.PEM).decode()})
        deadline = time.monotonic() + 20
        while answers.empty() and time.monotonic() < deadline:  # until the service has subscribed
            client.publish(f"telematics/{DEVICE}/cert/request", request, qos=1)
            time.sleep(0.5)
        answer = answers.get(timeout=5)
        cert = x509.load_pem_x509_certificate(answer["certificate"].encode())
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        assert answer["id"] == "q1" and dt.timedelta(days=7) < lifetime <= dt.timedelta(days=7, minutes=6)
    finally:
        client.loop_stop()
        client.disconnect()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
