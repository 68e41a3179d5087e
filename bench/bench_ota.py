"""Figures of over-the-air updates and certificate renewal; medians go to BENCHMARKS.md.

    .venv/bin/python bench/bench_ota.py            # all of them, one JSON line each

- ``release``: build a release of this checkout (wheels from a local wheelhouse, offline) and sign it;
- ``verify``: what a device does before installing: sha256 of the archive, signature, every file;
- ``mqtt``: a release in 256 KiB chunks through a local Mosquitto into the device's assembler;
- ``install``: one A/B install (a venv plus pip install --no-index of the release's wheels);
- ``renew``: key + CSR on the device, signed by the local CA, checked (no broker).
"""

from __future__ import annotations

import json
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from agent.ota.download import ByteRate, download_mqtt, iter_chunks  # noqa: E402
from agent.ota.install import Layout, install_version  # noqa: E402
from agent.ota.release import build_release, sha256_file, sign_archive  # noqa: E402
from agent.ota.verify import check_download, open_release  # noqa: E402


def timed(fn, runs: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    from conftest import MosquittoBroker  # the tests' real broker on a free port

    work = Path(tempfile.mkdtemp(prefix="bench-ota-"))
    try:
        deps = work / "deps"
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "-w", str(deps), str(REPO), "setuptools>=68",
                        "wheel"], check=True, capture_output=True)
        key = Ed25519PrivateKey.generate()

        def build() -> Path:
            out = work / f"out-{uuid.uuid4().hex[:6]}"
            archive = build_release(REPO, out, pip_args=["--no-index", "--find-links", str(deps)])
            sign_archive(archive, key)
            return archive

        seconds, archive = timed(build, 3)
        size = archive.stat().st_size
        print(json.dumps({"bench": "release", "median_s": round(seconds, 2), "archive_mb": round(size / 1e6, 1)}))

        sha = sha256_file(archive)

        def verify():
            check_download(archive, size, sha)
            return open_release(archive, key.public_key())

        seconds, release = timed(verify, 5)
        print(json.dumps({"bench": "verify", "median_s": round(seconds, 3), "mb_per_s": round(size / 1e6 / seconds, 1)}))

        broker = MosquittoBroker(work)
        broker.start()
        try:
            seconds = statistics.median(mqtt_transfer(broker.port, archive, work, run) for run in range(3))
        finally:
            broker.stop()
        print(json.dumps({"bench": "mqtt", "chunk_kib": 256, "median_s": round(seconds, 2),
                          "mb_per_s": round(size / 1e6 / seconds, 1)}))

        def install():
            root = work / f"opt-{uuid.uuid4().hex[:6]}"
            return install_version(release, Layout(root), sys.executable)

        seconds, _ = timed(install, 2)
        print(json.dumps({"bench": "install", "median_s": round(seconds, 1)}))

        seconds = renew_median(work)
        print(json.dumps({"bench": "renew", "median_ms": round(seconds * 1000, 1)}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def mqtt_transfer(port: int, archive: Path, work: Path, run: int) -> float:
    """Seconds for the device to fetch ``archive`` in chunks (the backend answers each request)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    chunk_size = 256 * 1024
    chunks = dict(iter_chunks(archive, "9.9.9", chunk_size))
    backend = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"backend-{run}")

    def answer(client, userdata, message):
        for first, last in json.loads(message.payload)["chunks"]:
            for i in range(first, last + 1):
                client.publish("telematics/b/update/chunk", chunks[i], qos=1)

    backend.on_message = answer
    backend.connect("127.0.0.1", port)
    backend.subscribe("telematics/b/update/request", qos=1)
    backend.loop_start()
    inbox: queue.Queue[bytes] = queue.Queue()
    device = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"device-{run}")
    device.on_message = lambda c, u, m: inbox.put(m.payload)
    device.connect("127.0.0.1", port)
    device.subscribe("telematics/b/update/chunk", qos=1)
    device.loop_start()
    time.sleep(0.3)
    try:
        start = time.perf_counter()
        dest = work / f"dl-{run}.tar"
        download_mqtt(dest, "9.9.9", archive.stat().st_size, chunk_size,
                      request=lambda p: device.publish("telematics/b/update/request", p, qos=1).rc == 0,
                      inbox=inbox, rate=ByteRate(0, threading.Event()), stop=threading.Event(), idle_s=5.0)
        elapsed = time.perf_counter() - start
        assert sha256_file(dest) == sha256_file(archive)
        return elapsed
    finally:
        for client in (backend, device):
            client.loop_stop()
            client.disconnect()


def renew_median(work: Path) -> float:
    """Key + CSR + signature by the local CA + the device's checks, without the network."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from collector.signing import LocalCa, check_request

    ca_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench-ca")])
    now = dt.datetime.now(dt.timezone.utc)
    ca_cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(ca_key.public_key())
               .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
               .sign(ca_key, hashes.SHA256()))
    (work / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    (work / "ca.key").write_bytes(ca_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    ca = LocalCa(work / "ca.pem", work / "ca.key")

    def once():
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "truck-1")]))
               .sign(key, hashes.SHA256()))
        pem = ca.sign(check_request(csr.public_bytes(serialization.Encoding.PEM), "truck-1"), "truck-1")
        x509.load_pem_x509_certificate(pem).verify_directly_issued_by(ca_cert)

    return timed(once, 50)[0]


if __name__ == "__main__":
    main()
