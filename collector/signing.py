"""The certificate signing service: answers devices' renewal requests over MQTT (docs/certificates.md).

A device publishes ``{"id": ..., "csr": PEM}`` on ``{prefix}/{device}/cert/request``; the service
checks the request (its signature, CN = the device id of the topic, an acceptable key) and answers
on ``{prefix}/{device}/cert/response`` with ``{"id": ..., "certificate": PEM}`` or
``{"id": ..., "error": reason}``. The broker's ACL (firmware_config/) lets a device publish only
below its own id, so the topic vouches for who asks.

Who signs is pluggable: :class:`LocalCa` holds a CA certificate and key (tests, the demo, a small
fleet); :class:`CommandCa` is the hook for the fleet's own CA: any command that reads the CSR (PEM)
on stdin, finds the device id in ``$TELEMATICS_DEVICE_ID`` and writes the certificate (PEM) on stdout.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import subprocess
import threading
import uuid
from pathlib import Path
from typing import Protocol

import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from paho.mqtt.enums import CallbackAPIVersion

from collector.broker_auth import apply_credentials
from agent.config import TlsConfig

log = logging.getLogger(__name__)

# Keys a device may ask a certificate for: EC P-256/P-384, or RSA of at least 2048 bits (NIST SP 800-57).
EC_CURVES = (ec.SECP256R1, ec.SECP384R1)
MIN_RSA_BITS = 2048
# Backdating covers devices whose clocks run a little behind the CA's.
BACKDATE = dt.timedelta(minutes=5)


class SigningRefused(Exception):
    """A request that is not signed; the message goes back to the device."""


class Signer(Protocol):
    def sign(self, csr: x509.CertificateSigningRequest, device_id: str) -> bytes: ...


class LocalCa:
    """Signs with a CA certificate and private key (PEM files); certificates live ``lifetime`` long."""

    def __init__(self, cert_path: str | Path, key_path: str | Path, lifetime: dt.timedelta = dt.timedelta(days=90)) -> None:
        self.cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
        self.key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
        self.lifetime = lifetime

    def sign(self, csr: x509.CertificateSigningRequest, device_id: str) -> bytes:
        now = dt.datetime.now(dt.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
            .issuer_name(self.cert.subject)
            .public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + self.lifetime)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM)


class CommandCa:
    """The fleet's own CA behind a command: CSR on stdin, certificate on stdout, ``$TELEMATICS_DEVICE_ID`` set."""

    def __init__(self, argv: list[str], timeout_s: float = 30.0) -> None:
        self.argv, self.timeout_s = argv, timeout_s

    def sign(self, csr: x509.CertificateSigningRequest, device_id: str) -> bytes:
        proc = subprocess.run(self.argv, input=csr.public_bytes(serialization.Encoding.PEM), capture_output=True,
                              timeout=self.timeout_s, env=dict(os.environ, TELEMATICS_DEVICE_ID=device_id))
        if proc.returncode != 0:
            raise SigningRefused(f"the CA command failed: {proc.stderr.decode(errors='replace').strip()[-200:]}")
        return proc.stdout


def check_request(csr_pem: bytes, device_id: str) -> x509.CertificateSigningRequest:
    """The CSR, if it is one the service signs for ``device_id``; SigningRefused says why not."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise SigningRefused(f"not a PEM certificate signing request: {exc}") from exc
    if not csr.is_signature_valid:
        raise SigningRefused("the request's signature does not verify (not made with the key it names)")
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if [n.value for n in names] != [device_id]:
        raise SigningRefused(f"the request's CN must be the device id {device_id!r}")
    key = csr.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, EC_CURVES):
            raise SigningRefused(f"EC curve {key.curve.name} is not accepted (P-256 or P-384)")
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise SigningRefused(f"RSA keys need at least {MIN_RSA_BITS} bits")
    else:
        raise SigningRefused(f"{type(key).__name__} keys are not accepted")
    return csr


class SigningService:
    """Subscribes to every device's ``cert/request`` and answers on its ``cert/response``."""

    def __init__(self, host: str, port: int, topic_prefix: str, signer: Signer, *, tls: TlsConfig | None = None,
                 client_id: str | None = None) -> None:
        self.host, self.port, self.prefix = host, port, topic_prefix
        self.signer = signer
        self._tls = tls
        self._client_id = client_id or f"telematics-signing-{uuid.uuid4().hex[:8]}"
        self._client: mqtt.Client | None = None
        self._connected = threading.Event()
        self.counts = {"signed": 0, "refused": 0}

    def handle(self, device_id: str, payload: bytes) -> dict:
        """The response to one request."""
        request_id = None
        try:
            try:
                request = json.loads(payload)
            except ValueError as exc:
                raise SigningRefused(f"not JSON: {exc}") from exc
            if not isinstance(request, dict) or not isinstance(request.get("csr"), str):
                raise SigningRefused('expected {"id": ..., "csr": PEM}')
            request_id = request.get("id")
            csr = check_request(request["csr"].encode(), device_id)
            certificate = self.signer.sign(csr, device_id)
        except SigningRefused as exc:
            self.counts["refused"] += 1
            log.warning("certificate request %s of %s refused: %s", request_id, device_id, exc)
            return {"id": request_id, "error": str(exc)}
        self.counts["signed"] += 1
        log.info("signed a certificate for %s (request %s)", device_id, request_id)
        return {"id": request_id, "certificate": certificate.decode()}

    def start(self, wait_connected: float = 10.0) -> "SigningService":
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self._client_id)
        client.on_connect = self._on_connect
        client.on_disconnect = lambda *a: self._connected.clear()
        client.on_message = self._on_message
        apply_credentials(client, self._tls)
        client.connect_async(self.host, self.port, keepalive=30)
        client.loop_start()
        self._client = client
        if wait_connected and not self._connected.wait(wait_connected):
            log.warning("signing service: broker %s:%d not reachable yet", self.host, self.port)
        return self

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("signing service: the broker refused the connection: %s", reason_code)
            return
        client.subscribe(f"{self.prefix}/+/cert/request", qos=1)
        self._connected.set()

    def _on_message(self, client, userdata, message) -> None:
        device_id = message.topic[len(self.prefix) + 1:].split("/", 1)[0]
        response = self.handle(device_id, bytes(message.payload))
        client.publish(f"{self.prefix}/{device_id}/cert/response", json.dumps(response).encode(), qos=1)

    def stop(self) -> None:
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None
