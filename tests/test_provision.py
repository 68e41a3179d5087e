"""`telematics-agent provision`: identity, keys made on the box, certificate checks, broker verdicts, first boot."""

from __future__ import annotations

import os
import pwd
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from conftest import MosquittoBroker, free_port

from agent.commands.provision import parse_broker
from agent.config import load_config

AGENT = str(Path(sys.executable).parent / "telematics-agent")
USER = "nobody"  # stands in for the agent's user "telematics", which only install.sh creates
EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def openssl(*args: str | Path) -> str:
    proc = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def sign(ca: "Pki", csr: Path, out: Path, san: str | None = None) -> Path:
    extra: list[str | Path] = []
    if san:
        ext = out.with_suffix(".ext")
        ext.write_text(f"subjectAltName={san}\n")
        extra = ["-extfile", ext]
    openssl("x509", "-req", "-in", csr, "-CA", ca.cert, "-CAkey", ca.key, "-CAcreateserial", "-days", "2",
            "-out", out, *extra)
    return out


class Pki:
    """A throwaway CA with a device certificate and a broker certificate for 127.0.0.1."""

    def __init__(self, root: Path, name: str = "ca") -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.dir = root
        self.cert, self.key = root / f"{name}.pem", root / f"{name}.key"
        openssl("req", "-x509", *EC, "-keyout", self.key, "-out", self.cert, "-subj", f"/CN={name}", "-days", "2")

    def issue(self, cn: str, san: str | None = None) -> tuple[Path, Path]:
        key, csr = self.dir / f"{cn}.key", self.dir / f"{cn}.csr"
        openssl("req", "-new", *EC, "-keyout", key, "-out", csr, "-subj", f"/CN={cn}")
        return sign(self, csr, self.dir / f"{cn}.pem", san), key


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def provision(config: Path, *args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([AGENT, "provision", "--config", str(config), "--user", USER, *map(str, args)],
                          capture_output=True, text=True, timeout=60)


def owner_mode(path: Path) -> tuple[str, int]:
    st = path.stat()
    return pwd.getpwuid(st.st_uid).pw_name, stat.S_IMODE(st.st_mode)


as_root = pytest.mark.skipif(os.geteuid() != 0, reason="owners can only be set as root (install and CI run as root)")


@as_root
def test_identity_and_files_with_safe_owners_and_modes(tmp_path, pki):
    cert, key = pki.issue("truck-7")
    config = tmp_path / "etc/agent.yaml"
    proc = provision(config, "--device-id", "truck-7", "--broker", "mqtts://broker.example.com",
                     "--ca", pki.cert, "--cert", cert, "--key", key)
    assert proc.returncode == 0, proc.stderr
    loaded = load_config(config)
    assert loaded.device.id == "truck-7"
    assert (loaded.mqtt.host, loaded.mqtt.port) == ("broker.example.com", 8883)
    tls_dir = tmp_path / "etc/tls"
    assert loaded.mqtt.tls.ca_file == str(tls_dir / "ca.pem")
    assert loaded.mqtt.tls.cert_file == str(tls_dir / "client.pem")
    assert loaded.mqtt.tls.key_file == str(tls_dir / "client.key")
    nogroup = pwd.getpwnam(USER).pw_gid
    assert owner_mode(tls_dir / "client.key") == (USER, 0o600)  # the agent's own, unreadable by others
    assert owner_mode(tls_dir / "client.pem") == ("root", 0o644)
    assert owner_mode(config) == ("root", 0o640)
    assert config.stat().st_gid == nogroup and tls_dir.stat().st_gid == nogroup
    assert stat.S_IMODE(tls_dir.stat().st_mode) == 0o750
    assert (tls_dir / "client.key").read_bytes() == key.read_bytes()


def test_existing_settings_are_kept(tmp_path, pki):
    config = tmp_path / "agent.yaml"
    config.write_text("device:\n  id: old\ngps:\n  baud: 38400\n")
    proc = provision(config, "--device-id", "truck-8", "--broker", "mqtt://10.0.0.5:1884")
    assert proc.returncode == 0, proc.stderr
    loaded = load_config(config)
    assert (loaded.device.id, loaded.gps.baud, loaded.mqtt.host, loaded.mqtt.port) == ("truck-8", 38400, "10.0.0.5", 1884)
    assert loaded.mqtt.tls is None


@pytest.mark.parametrize(
    "args, message",
    [
        (["--device-id", "bad id"], "device.id"),
        (["--broker", "http://x"], "expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]"),
        (["--broker", "mqtts://x"], "add --ca"),
        (["--generate-key"], "--generate-key needs --device-id"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, args, message):
    config = tmp_path / "agent.yaml"
    proc = provision(config, *args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr


@as_root
def test_key_generated_on_the_box_then_signed_certificate(tmp_path, pki):
    config = tmp_path / "agent.yaml"
    proc = provision(config, "--device-id", "truck-9", "--generate-key")
    assert proc.returncode == 0, proc.stderr
    key, csr = tmp_path / "tls/client.key", tmp_path / "tls/client.csr"
    assert "-----BEGIN CERTIFICATE REQUEST-----" in proc.stdout
    assert owner_mode(key) == (USER, 0o600)
    assert "CN = truck-9" in openssl("req", "-in", csr, "-noout", "-subject")
    signed = sign(pki, csr, tmp_path / "signed.pem")

    # A certificate for some other key is refused and not installed.
    other_cert, _ = pki.issue("someone-else")
    proc = provision(config, "--cert", other_cert, "--ca", pki.cert)
    assert proc.returncode == 2
    assert "does not belong to the key" in proc.stderr
    assert not (tmp_path / "tls/client.pem").exists()

    proc = provision(config, "--cert", signed, "--ca", pki.cert)
    assert proc.returncode == 0, proc.stderr
    tls = load_config(config).mqtt.tls
    assert (tls.cert_file, tls.key_file) == (str(tmp_path / "tls/client.pem"), str(key))


def test_check_against_a_running_broker(tmp_path, mosquitto):
    config = tmp_path / "agent.yaml"
    assert provision(config, "--device-id", "truck-7", "--broker", f"mqtt://127.0.0.1:{mosquitto.port}").returncode == 0
    proc = provision(config, "--check")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"OK: connected to 127.0.0.1:{mosquitto.port} without TLS as device truck-7"


def test_check_without_a_broker(tmp_path):
    config = tmp_path / "agent.yaml"
    port = free_port()
    assert provision(config, "--device-id", "truck-7", "--broker", f"mqtt://127.0.0.1:{port}").returncode == 0
    proc = provision(config, "--check", "--timeout", "2")
    assert proc.returncode == 2
    assert proc.stdout.strip() == f"FAILED: 127.0.0.1:{port} without TLS: Connection refused"


@pytest.fixture
def tls_broker(tmp_path_factory, pki):
    """Mosquitto with a second listener: TLS, client certificates required."""
    server_cert, server_key = pki.issue("broker", san="IP:127.0.0.1")
    port = free_port()
    broker = MosquittoBroker(tmp_path_factory.mktemp("tls-broker"), extra_conf=(
        # Mosquitto started as root drops to user mosquitto, which cannot read pytest's 0700 directories.
        f"user {pwd.getpwuid(os.geteuid()).pw_name}\nlistener {port} 127.0.0.1\ncafile {pki.cert}\ncertfile {server_cert}\nkeyfile {server_key}\n"
        "require_certificate true\n"))
    broker.start()
    broker.tls_port = port
    yield broker
    broker.stop()


@as_root
def test_check_over_tls_with_a_client_certificate(tmp_path, pki, tls_broker):
    config = tmp_path / "agent.yaml"
    cert, key = pki.issue("truck-7")
    proc = provision(config, "--device-id", "truck-7", "--broker", f"mqtts://127.0.0.1:{tls_broker.tls_port}",
                     "--ca", pki.cert, "--cert", cert, "--key", key, "--check")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"OK: certificate {tmp_path}/tls/client.pem matches key {tmp_path}/tls/client.key" in proc.stdout
    assert f"OK: connected to 127.0.0.1:{tls_broker.tls_port} with TLS as device truck-7" in proc.stdout

    # The same broker checked against another CA: the verdict names the certificate problem.
    other = Pki(tmp_path / "other-ca", "other-ca")
    proc = provision(config, "--ca", other.cert, "--check")
    assert proc.returncode == 2
    assert f"FAILED: 127.0.0.1:{tls_broker.tls_port} with TLS: the broker's certificate was not accepted: " in proc.stdout


def test_first_boot_installs_and_removes_the_file(tmp_path, pki):
    boot = tmp_path / "boot-firmware"
    boot.mkdir()
    cert, key = pki.issue("truck-11")
    spec = {"device_id": "truck-11", "broker": "mqtts://broker.example.com:8883", "ca": pki.cert.read_text(),
            "cert": cert.read_text(), "key": key.read_text()}
    (boot / "telematics-provision.yaml").write_text(yaml.safe_dump(spec))
    config = tmp_path / "etc/agent.yaml"
    proc = provision(config, "--first-boot", tmp_path / "no-such-dir", "--first-boot", boot)
    assert proc.returncode == 0, proc.stderr
    assert not (boot / "telematics-provision.yaml").exists()
    assert list(boot.iterdir()) == []
    loaded = load_config(config)
    assert loaded.device.id == "truck-11" and loaded.mqtt.port == 8883
    key_file = Path(loaded.mqtt.tls.key_file)
    assert key_file.read_bytes() == key.read_bytes()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(config.stat().st_mode) == 0o640
    if os.geteuid() == 0:
        assert owner_mode(key_file)[0] == USER and owner_mode(config)[0] == "root"
    # Every later boot: nothing to do.
    again = provision(config, "--first-boot", boot)
    assert again.returncode == 0 and "nothing to do" in again.stdout


def test_a_bad_provisioning_file_stays_for_the_installer_to_fix(tmp_path):
    boot = tmp_path / "boot"
    boot.mkdir()
    (boot / "telematics-provision.yaml").write_text("device_id: truck-1\nbrokr: mqtt://x\n")
    proc = provision(tmp_path / "agent.yaml", "--first-boot", boot)
    assert proc.returncode == 2
    assert "unknown keys ['brokr']" in proc.stderr
    assert (boot / "telematics-provision.yaml").exists()
    assert not (tmp_path / "agent.yaml").exists()


hostnames = st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,20}){0,3}", fullmatch=True)


@given(host=hostnames, port=st.one_of(st.none(), st.integers(1, 65535)), tls=st.booleans())
def test_broker_urls_round_trip(host, port, tls):
    url = f"{'mqtts' if tls else 'mqtt'}://{host}" + (f":{port}" if port else "")
    assert parse_broker(url) == (host, port or (8883 if tls else 1883), tls)
