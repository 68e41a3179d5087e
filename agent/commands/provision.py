"""``telematics-agent provision``: give a box its identity, keys and broker, and check them.

  provision --device-id ID --broker mqtts://HOST:8883 --ca ca.pem --cert dev.pem --key dev.key
  provision --release-key fleet-release.pub        # the public key updates are checked against (docs/ota.md)
  provision --device-id ID --generate-key          # key made here, never leaves the box; prints a CSR
  provision --cert signed.pem                      # install the signed certificate (checked against the key)
  provision --check                                # certificate matches key? broker reachable? a verdict
  provision --first-boot /boot/firmware            # install DIR/telematics-provision.yaml, then delete it

The identity goes into the agent's config (``device.id``, ``mqtt.host``/``port``/``tls``); keys and
certificates into ``{config dir}/tls/``. Owners and modes: the config root:telematics 0640, the CA
and certificate 0644, the private key telematics:telematics 0600 (the link refuses a key others can
read). Rewriting the config keeps its values but not its comments.
"""

from __future__ import annotations

import argparse
import os
import pwd
import ssl
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from agent.cli_base import CommandError
from agent.config import Config, ConfigError, parse_config

DEFAULT_CONFIG = "/etc/telematics-agent/agent.yaml"
PROVISION_FILE = "telematics-provision.yaml"
# Keys a provisioning file on the boot partition may carry.
PROVISION_KEYS = {"device_id", "broker", "ca", "cert", "key", "username", "password", "release_key"}
DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}  # IANA: MQTT and MQTT over TLS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"the agent's config (default {DEFAULT_CONFIG})")
    parser.add_argument("--tls-dir", help="where keys and certificates go (default: tls/ beside the config)")
    parser.add_argument("--user", default="telematics", help="the agent's user, owner of the private key (default telematics)")
    parser.add_argument("--device-id", help="this box's id (device.id; the certificate's CN)")
    parser.add_argument("--broker", help="mqtt://HOST[:1883] or mqtts://HOST[:8883]")
    parser.add_argument("--ca", help="the CA certificate (PEM) the broker's certificate is checked against")
    parser.add_argument("--cert", help="this device's client certificate (PEM)")
    parser.add_argument("--key", help="this device's private key (PEM), when made elsewhere")
    parser.add_argument("--release-key", help="the fleet's Ed25519 public key (PEM) that signs updates (docs/ota.md)")
    parser.add_argument("--generate-key", action="store_true",
                        help="make an EC P-256 key here and write a certificate signing request beside it")
    parser.add_argument("--check", action="store_true", help="check certificate and key, then connect to the broker")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the broker (default 10)")
    parser.add_argument("--first-boot", action="append", metavar="DIR", default=[],
                        help=f"install DIR/{PROVISION_FILE} if present and delete it (repeatable)")


def run(args: argparse.Namespace) -> int:
    target = Target(Path(args.config), Path(args.tls_dir) if args.tls_dir else None, args.user)
    if args.first_boot:
        return first_boot([Path(d) for d in args.first_boot], target)
    changed = False
    if args.generate_key:
        if not (args.device_id or target.current_device_id()):
            raise CommandError("--generate-key needs --device-id (the certificate's CN)")
        csr = target.generate_key(args.device_id or target.current_device_id())
        print(f"private key {target.key_path} (stays on this box)")
        print(f"certificate signing request {csr}: have it signed, then run: telematics-agent provision --cert SIGNED.pem")
        print(csr.read_text(), end="")
        changed = True
    files = {name: _read_pem(Path(path)) for name, path in (("ca", args.ca), ("cert", args.cert), ("key", args.key),
                                                             ("release_key", args.release_key)) if path}
    if args.device_id or args.broker or files:
        target.apply(device_id=args.device_id, broker=args.broker, pem=files, generated_key=args.generate_key)
        changed = True
    if changed:
        print(f"wrote {target.config_path}")
    if args.check or not changed:
        return 0 if check(target, args.timeout) else 2
    return 0


def _read_pem(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CommandError(f"cannot read {path}: {exc.strerror}") from exc


class Target:
    """The config file and TLS directory being provisioned, with the owners and modes they need."""

    def __init__(self, config_path: Path, tls_dir: Path | None, user: str) -> None:
        self.config_path = config_path
        self.tls_dir = tls_dir or config_path.parent / "tls"
        self.user = user
        self.ca_path = self.tls_dir / "ca.pem"
        self.cert_path = self.tls_dir / "client.pem"
        self.key_path = self.tls_dir / "client.key"
        self.csr_path = self.tls_dir / "client.csr"
        self.release_key_path = config_path.parent / "release.pub"

    def ids(self) -> tuple[int, int]:
        """(uid, gid) of the agent's user; files are only chowned when running as root."""
        try:
            entry = pwd.getpwnam(self.user)
        except KeyError:
            raise CommandError(f"no user {self.user!r} here: run install.sh first, or pass --user") from None
        return entry.pw_uid, entry.pw_gid

    def raw_config(self) -> dict[str, Any]:
        if not self.config_path.exists():
            return {}
        try:
            raw = yaml.safe_load(self.config_path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise CommandError(f"cannot read {self.config_path}: {exc}") from exc
        if not isinstance(raw, dict):
            raise CommandError(f"{self.config_path}: not a mapping of sections")
        return raw

    def current_device_id(self) -> str | None:
        return (self.raw_config().get("device") or {}).get("id")

    def load(self) -> Config:
        try:
            return parse_config(self.config_path.read_text(), source=str(self.config_path))
        except (OSError, ConfigError) as exc:
            raise CommandError(str(exc)) from exc

    def generate_key(self, device_id: str) -> Path:
        """An EC P-256 key and a CSR with CN=device_id, made with openssl on this box."""
        self._mkdir_tls()
        with tempfile.TemporaryDirectory(dir=self.tls_dir) as tmp:
            key, csr = Path(tmp) / "key", Path(tmp) / "csr"
            proc = subprocess.run(
                ["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", str(key), "-subj", f"/CN={device_id}", "-out", str(csr)],
                capture_output=True, text=True,
            )
            if proc.returncode != 0:
                raise CommandError(f"openssl could not make a key: {proc.stderr.strip()}")
            self._install(self.key_path, key.read_bytes(), 0o600, key_owner=True)
            self._install(self.csr_path, csr.read_bytes(), 0o644)
        return self.csr_path

    def apply(self, device_id: str | None, broker: str | None, pem: dict[str, bytes], generated_key: bool = False,
              username: str | None = None, password: str | None = None) -> None:
        """Install the PEM files and write the identity into the config, validated, atomically."""
        raw = self.raw_config()
        pem = dict(pem)
        release_key = pem.pop("release_key", None)
        if release_key is not None:  # over-the-air updates (docs/ota.md)
            from agent.ota.release import ReleaseError, parse_public_key

            try:
                parse_public_key(release_key, "--release-key")
            except ReleaseError as exc:
                raise CommandError(str(exc)) from exc
            self._install(self.release_key_path, release_key, 0o644)
            raw.setdefault("update", {})["public_key"] = str(self.release_key_path)
        device = raw.setdefault("device", {})
        mqtt = raw.setdefault("mqtt", {})
        if device_id:
            device["id"] = device_id
        if broker:
            host, port, use_tls = parse_broker(broker)
            mqtt["host"], mqtt["port"] = host, port
            if not use_tls:
                mqtt["tls"] = None
        if username is not None:
            mqtt["username"], mqtt["password"] = username, password
        if pem:
            self._mkdir_tls()
        if "ca" in pem:
            self._install(self.ca_path, _pem(pem["ca"], "ca", "CERTIFICATE"), 0o644)
        if "key" in pem:
            self._install(self.key_path, _pem(pem["key"], "key", "PRIVATE KEY"), 0o600, key_owner=True)
        if "cert" in pem:
            cert = _pem(pem["cert"], "cert", "CERTIFICATE")
            if self.key_path.exists():
                check_pair_bytes(cert, self.key_path)
            self._install(self.cert_path, cert, 0o644)
        wants_tls = bool(pem) or generated_key or (broker is not None and parse_broker(broker)[2])
        if wants_tls and self.ca_path.exists():
            tls = mqtt.get("tls") or {}
            tls["ca_file"] = str(self.ca_path)
            if self.cert_path.exists() and self.key_path.exists():
                tls["cert_file"], tls["key_file"] = str(self.cert_path), str(self.key_path)
            mqtt["tls"] = tls
        elif broker is not None and parse_broker(broker)[2]:
            raise CommandError(f"{broker}: TLS needs the CA certificate that signed the broker's: add --ca")
        if not mqtt:
            raw.pop("mqtt")
        text = yaml.safe_dump(raw, sort_keys=False)
        try:
            parse_config(text, source=str(self.config_path))
        except ConfigError as exc:
            raise CommandError(f"the provisioned config would not be valid: {exc}") from exc
        self._install(self.config_path, text.encode(), 0o640)

    def _mkdir_tls(self) -> None:
        self.tls_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
        if os.geteuid() == 0:
            os.chown(self.tls_dir, 0, self.ids()[1])
        os.chmod(self.tls_dir, 0o750)

    def _install(self, path: Path, data: bytes, mode: int, key_owner: bool = False) -> None:
        """Write ``path`` atomically with ``mode`` from the first byte: a temp file, fsync, rename.

        Owner root and the agent's group, or the agent's user for its private key (as root only).
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            os.fchmod(fd, mode)
            if os.geteuid() == 0:
                uid, gid = self.ids()
                os.fchown(fd, uid if key_owner else 0, gid)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _pem(data: bytes, what: str, kind: str) -> bytes:
    if b"-----BEGIN " not in data or kind.encode() not in data:
        raise CommandError(f"the {what} is not a PEM {kind.lower()}")
    return data


def parse_broker(url: str) -> tuple[str, int, bool]:
    """mqtt[s]://host[:port] -> (host, port, tls)."""
    parts = urlsplit(url if "://" in url else f"mqtts://{url}")
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        raise CommandError(f"broker {url!r}: expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")
    try:
        port = parts.port or DEFAULT_PORTS[parts.scheme]
    except ValueError as exc:
        raise CommandError(f"broker {url!r}: {exc}") from exc
    return parts.hostname, port, parts.scheme == "mqtts"


def check_pair_bytes(cert: bytes, key_path: Path) -> None:
    """Raise CommandError unless ``cert`` (PEM) belongs to the private key at ``key_path``."""
    with tempfile.NamedTemporaryFile(suffix=".pem") as tmp:
        tmp.write(cert)
        tmp.flush()
        check_pair(Path(tmp.name), key_path)


def check_pair(cert_path: Path, key_path: Path) -> None:
    """Raise CommandError unless the certificate belongs to the key (OpenSSL compares the public keys)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_cert_chain(str(cert_path), str(key_path))
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in str(exc):
            raise CommandError(f"the certificate {cert_path} does not belong to the key {key_path}") from exc
        raise CommandError(f"cannot use certificate {cert_path} with key {key_path}: {exc.reason or exc}") from exc
    except OSError as exc:
        raise CommandError(f"cannot read {exc.filename or cert_path}: {exc.strerror}") from exc


def check(target: Target, timeout: float) -> bool:
    """Print a verdict for the certificate/key pair and for a connection to the broker."""
    config = target.load()
    tls = config.mqtt.tls
    if tls is not None and tls.cert_file and tls.key_file:
        check_pair(Path(tls.cert_file), Path(tls.key_file))
        print(f"OK: certificate {tls.cert_file} matches key {tls.key_file}")
    verdict = broker_verdict(config, timeout)
    print(verdict)
    return verdict.startswith("OK")


def broker_verdict(config: Config, timeout: float) -> str:
    """Connect once as the agent would (same id, credentials, TLS) and say what happened."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    cfg = config.mqtt
    where = f"{cfg.host}:{cfg.port}" + (" with TLS" if cfg.tls else " without TLS")
    done = threading.Event()
    result: dict[str, Any] = {}

    def on_connect(client, userdata, flags, reason_code, properties):
        result["rc"] = reason_code
        done.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{cfg.client_id or config.device.id}-provision")
    client.on_connect = on_connect
    if cfg.username is not None:
        client.username_pw_set(cfg.username, cfg.password)
    try:
        if cfg.tls is not None:
            client.tls_set(ca_certs=cfg.tls.ca_file, certfile=cfg.tls.cert_file, keyfile=cfg.tls.key_file,
                           cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        client.connect(cfg.host, cfg.port, keepalive=max(5, int(timeout)))
    except ssl.SSLCertVerificationError as exc:
        return f"FAILED: {where}: the broker's certificate was not accepted: {exc.verify_message}"
    except (ssl.SSLError, OSError, ValueError) as exc:
        return f"FAILED: {where}: {getattr(exc, 'strerror', None) or getattr(exc, 'reason', None) or exc}"
    client.loop_start()
    try:
        if not done.wait(timeout):
            return f"FAILED: {where}: no answer to CONNECT within {timeout:g} s"
    finally:
        client.disconnect()
        client.loop_stop()
    if result["rc"].is_failure:
        return f"FAILED: {where}: the broker refused device {config.device.id}: {result['rc']}"
    return f"OK: connected to {where} as device {config.device.id}"


def first_boot(dirs: list[Path], target: Target) -> int:
    """Install the first provisioning file found in ``dirs``, then remove it from the boot partition."""
    for directory in dirs:
        path = directory / PROVISION_FILE
        if not path.exists():
            continue
        try:
            spec = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise CommandError(f"{path}: cannot read: {exc}") from exc
        if not isinstance(spec, dict) or not spec.get("device_id"):
            raise CommandError(f"{path}: expected a mapping with at least device_id")
        unknown = set(spec) - PROVISION_KEYS
        if unknown:
            raise CommandError(f"{path}: unknown keys {sorted(unknown)} (known: {sorted(PROVISION_KEYS)})")
        pem = {name: str(spec[name]).encode() for name in ("ca", "cert", "key", "release_key") if spec.get(name)}
        target.apply(device_id=str(spec["device_id"]), broker=spec.get("broker"), pem=pem,
                     username=spec.get("username"), password=spec.get("password"))
        shred(path)
        print(f"installed {path} into {target.config_path} and removed it from {directory}")
        return 0
    print(f"no {PROVISION_FILE} in {', '.join(map(str, dirs))}: nothing to do")
    return 0


def shred(path: Path) -> None:
    """Overwrite with zeros, then delete: the FAT boot partition is readable by anyone with the card.

    Best effort: flash wear levelling may keep old blocks, so the secrets should be short-lived
    (a key generated on the box with --generate-key never touches the card at all).
    """
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.write(b"\0" * size)
        fh.flush()
        os.fsync(fh.fileno())
    path.unlink()
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass  # some FAT drivers refuse fsync on a directory; the unlink is done either way
