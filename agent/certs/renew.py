"""Client certificate renewal: a new key made here, a CSR over MQTT, the signed certificate back.

Before the certificate in use expires (``certificates.renew_before_days``), or on the
``renew_certificate`` command, the renewer:

1. makes a new EC P-256 key and a CSR (CN = device id) in ``{data_dir}/tls/`` (the key never leaves
   the box; /etc stays read-only for the agent);
2. publishes ``{"id", "csr"}`` on ``{prefix}/{device}/cert/request`` and waits for ``{"id",
   "certificate"}`` (or ``"error"``) on ``cert/response`` (collector/signing.py answers);
3. checks the certificate: it is for the new key and this device, valid now, and not shorter-lived
   than the one in use;
4. opens a separate trial connection to the broker with the new pair; only if the broker accepts
   it, switches the link over (it reconnects at once; the buffer re-sends what was unconfirmed);
5. once the link is up with the new pair, records it in ``{data_dir}/tls/current.json`` (used from
   then on, also after restarts) and only then deletes the old pair, if it was a renewed one (the
   provisioned pair under /etc is read-only for the agent and simply no longer used).

Any failure leaves the device on its old pair and is reported: a ``certificate_renewal_failed``
event with the reason; success is a ``certificate_renewed`` status with the new expiry.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import queue
import ssl
import threading
import uuid
from pathlib import Path
from typing import Any, Callable

import msgspec
import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from agent.clock import Clock
from agent.config import Config, MqttConfig, TlsConfig
from agent.record import Event, Record, Status

log = logging.getLogger(__name__)

POINTER = "current.json"  # {data_dir}/tls/current.json: the renewed pair in use
TRIAL_TIMEOUT_S = 10.0


class RenewalFailed(Exception):
    """This attempt failed; the device stays on its old pair. The message is reported."""


def tls_dir(config: Config) -> Path:
    return Path(config.device.data_dir) / "tls"


def not_after(cert_file: str | Path) -> dt.datetime:
    return x509.load_pem_x509_certificate(Path(cert_file).read_bytes()).not_valid_after_utc


def _pair_matches(cert_file: Path, key_file: Path) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    except (OSError, ValueError):
        return False
    return _public(cert.public_key()) == _public(key.public_key())


def _public(key: Any) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def effective_mqtt(config: Config) -> MqttConfig:
    """``config.mqtt`` with the renewed pair (``{data_dir}/tls/current.json``) when there is a usable one."""
    tls = config.mqtt.tls
    if tls is None or tls.cert_file is None:
        return config.mqtt
    try:
        pointer = json.loads((tls_dir(config) / POINTER).read_text())
        cert, key = Path(pointer["cert_file"]), Path(pointer["key_file"])
    except (OSError, ValueError, KeyError, TypeError):
        return config.mqtt
    if not _pair_matches(cert, key):
        log.error("ignoring the renewed certificate %s: it does not match its key; using %s", cert, tls.cert_file)
        return config.mqtt
    return msgspec.structs.replace(config.mqtt, tls=msgspec.structs.replace(tls, cert_file=str(cert), key_file=str(key)))


def trial_connect(mqtt_config: MqttConfig, tls: TlsConfig, client_id: str, timeout_s: float = TRIAL_TIMEOUT_S) -> str | None:
    """Connect once with ``tls`` under another client id (the live session stays); None if the broker
    accepted it, else why not."""
    protocol = MQTTProtocolVersion.MQTTv5 if mqtt_config.protocol == "5" else MQTTProtocolVersion.MQTTv311
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
    outcome: queue.Queue[str | None] = queue.Queue()
    client.on_connect = lambda c, u, f, rc, p: outcome.put(str(rc) if rc.is_failure else None)
    client.on_disconnect = lambda c, u, f, rc, p: outcome.put(f"disconnected: {rc}")
    if mqtt_config.username is not None:
        client.username_pw_set(mqtt_config.username, mqtt_config.password)
    try:
        client.tls_set(ca_certs=tls.ca_file, certfile=tls.cert_file, keyfile=tls.key_file, cert_reqs=ssl.CERT_REQUIRED)
        client.connect(mqtt_config.host, mqtt_config.port, keepalive=30)
    except (OSError, ssl.SSLError, ValueError) as exc:
        return f"the broker refused the new certificate: {exc}"
    client.loop_start()
    try:
        result = outcome.get(timeout=timeout_s)
    except queue.Empty:
        result = f"no answer from the broker within {timeout_s:g} s"
    finally:
        client.disconnect()
        client.loop_stop()
    return None if result is None else f"the broker refused the new certificate: {result}"


class CertRenewer:
    """Renews the link's client certificate before it expires; ``link`` is the agent's MqttLink."""

    def __init__(self, config: Config, link: Any, emit: Callable[[Record], None], clock: Clock) -> None:
        self.config = config
        self.settings = config.certificates
        self.link = link
        self.emit = emit
        self.clock = clock
        self.dir = tls_dir(config)
        self._responses: queue.Queue[dict] = queue.Queue(maxsize=16)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self.link.subscribe("cert/response", self._on_response)
        self._thread = threading.Thread(target=self._run, name="cert-renewal", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        """Look at the expiry once the link is up, then every ``check_interval_s``."""
        while not self._stop.wait(0.5):
            if self.link.stats()["connected"]:
                break
        unreadable = False
        while not self._stop.is_set():
            try:
                due = self.due()
                unreadable = False
            except (OSError, ValueError) as exc:
                if not unreadable:
                    log.error("cannot read the client certificate %s: %s", self.link.tls.cert_file, exc)
                unreadable, due = True, False
            if due:
                self.renew("expires within the renewal margin")
            self._stop.wait(self.settings.check_interval_s)

    def _on_response(self, payload: bytes) -> None:
        try:
            doc = json.loads(payload)
        except ValueError:
            log.warning("ignoring a certificate response that is not JSON")
            return
        if isinstance(doc, dict):
            try:
                self._responses.put_nowait(doc)
            except queue.Full:
                pass

    def due(self) -> bool:
        """The certificate in use expires within ``renew_before_days``."""
        tls = self.link.tls
        if tls is None or tls.cert_file is None:
            return False
        left = not_after(tls.cert_file) - dt.datetime.fromtimestamp(self.clock.wall(), dt.timezone.utc)
        return left < dt.timedelta(days=self.settings.renew_before_days)

    def handle(self, args: dict[str, Any]) -> dict[str, Any]:
        """The ``renew_certificate`` command: renew now, in the background."""
        tls = self.link.tls
        if tls is None or tls.cert_file is None:
            raise ValueError("this device does not use a client certificate")
        if self._lock.locked():
            raise ValueError("a renewal is already in progress")
        threading.Thread(target=self.renew, args=("requested",), name="cert-renewal-now", daemon=True).start()
        return {"renewing": True, "expires_utc": not_after(tls.cert_file).timestamp()}

    # -- one renewal --------------------------------------------------------------------------

    def renew(self, why: str) -> bool:
        """One attempt; True when the link runs on a new certificate."""
        if not self._lock.acquire(blocking=False):
            return False
        old = self.link.tls
        try:
            log.info("renewing the client certificate (%s)", why)
            new = self._attempt(old)
        except RenewalFailed as exc:
            log.warning("certificate renewal failed, staying on %s: %s", old.cert_file, exc)
            self._emit(Event(type="certificate_renewal_failed", attrs={"reason": str(exc)}))
            return False
        finally:
            self._lock.release()
        expires = not_after(new.cert_file)
        log.info("client certificate renewed: %s, valid until %s", new.cert_file, expires.isoformat())
        self._emit(Status(type="certificate_renewed", attrs={"expires_utc": expires.timestamp(), "file": new.cert_file}))
        return True

    def _attempt(self, old: TlsConfig) -> TlsConfig:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        name = uuid.uuid4().hex[:12]
        key_path, cert_path = self.dir / f"client-{name}.key", self.dir / f"client-{name}.pem"
        try:
            key = ec.generate_private_key(ec.SECP256R1())  # as provisioning makes them
            _write(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()), 0o600)
            csr = (x509.CertificateSigningRequestBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.config.device.id)]))
                   .sign(key, hashes.SHA256()))
            certificate = self._request(csr.public_bytes(serialization.Encoding.PEM).decode())
            self._check(certificate, key, old)
            _write(cert_path, certificate, 0o644)
            new = msgspec.structs.replace(old, cert_file=str(cert_path), key_file=str(key_path))
            client_id = f"{self.config.mqtt.client_id or self.config.device.id}-renewal"
            refused = trial_connect(self.config.mqtt, new, client_id)
            if refused:
                raise RenewalFailed(refused)
            self._switch(old, new)
        except BaseException:
            key_path.unlink(missing_ok=True)
            cert_path.unlink(missing_ok=True)
            raise
        self._discard(old)
        return new

    def _request(self, csr_pem: str) -> bytes:
        request_id = uuid.uuid4().hex
        while not self._responses.empty():
            self._responses.get_nowait()  # answers to earlier attempts
        payload = json.dumps({"id": request_id, "csr": csr_pem}).encode()
        if not self.link.publish_message("cert/request", payload, qos=1):
            raise RenewalFailed("the broker is not connected: the request could not be sent")
        deadline = self.clock.monotonic() + self.settings.response_timeout_s
        while (left := deadline - self.clock.monotonic()) > 0:
            try:
                response = self._responses.get(timeout=min(left, 0.5))
            except queue.Empty:
                if self._stop.is_set():
                    raise RenewalFailed("stopped") from None
                continue
            if response.get("id") != request_id:
                continue
            if "error" in response:
                raise RenewalFailed(f"the signing service refused: {response['error']}")
            if not isinstance(response.get("certificate"), str):
                raise RenewalFailed("the signing service's answer holds no certificate")
            return response["certificate"].encode()
        raise RenewalFailed(f"no answer from the signing service within {self.settings.response_timeout_s:g} s")

    def _check(self, pem: bytes, key: ec.EllipticCurvePrivateKey, old: TlsConfig) -> None:
        try:
            cert = x509.load_pem_x509_certificate(pem)
        except ValueError as exc:
            raise RenewalFailed(f"the answer is not a PEM certificate: {exc}") from exc
        if _public(cert.public_key()) != _public(key.public_key()):
            raise RenewalFailed("the certificate is not for the key made for it")
        names = [n.value for n in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        if names != [self.config.device.id]:
            raise RenewalFailed(f"the certificate names {names}, not this device {self.config.device.id!r}")
        now = dt.datetime.fromtimestamp(self.clock.wall(), dt.timezone.utc)
        if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
            raise RenewalFailed(f"the certificate is not valid now ({cert.not_valid_before_utc} to {cert.not_valid_after_utc})")
        if cert.not_valid_after_utc < not_after(old.cert_file):
            raise RenewalFailed("the certificate expires before the one in use")

    def _switch(self, old: TlsConfig, new: TlsConfig) -> None:
        """Move the live link to ``new``; back to ``old`` (RenewalFailed) if it does not come up with it."""
        connects = self.link.stats()["connects"]
        self.link.use_tls(new)
        deadline = self.clock.monotonic() + self.settings.response_timeout_s
        while self.clock.monotonic() < deadline and not self._stop.is_set():
            stats = self.link.stats()
            if stats["connected"] and stats["connects"] > connects:
                _write(self.dir / POINTER, json.dumps({"cert_file": new.cert_file, "key_file": new.key_file}).encode(), 0o644)
                return
            self._stop.wait(0.1)
        self.link.use_tls(old)
        raise RenewalFailed(f"the link did not come up with the new certificate within {self.settings.response_timeout_s:g} s")

    def _discard(self, old: TlsConfig) -> None:
        """Delete the old pair if it was a renewed one (the provisioned pair under /etc is not ours)."""
        for path in (old.cert_file, old.key_file):
            if path and Path(path).parent == self.dir:
                Path(path).unlink(missing_ok=True)

    def _emit(self, payload: Event | Status) -> None:
        self.emit(Record(utc=self.clock.wall(), mono=self.clock.monotonic(), data=payload))


def _write(path: Path, data: bytes, mode: int) -> None:
    """Atomically, with ``mode`` from the first byte, fsynced (a power cut leaves old or new)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
