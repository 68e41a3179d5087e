"""Releases: the project's wheel plus its dependencies in one tar archive, with a signed manifest.

An archive holds ``manifest.json`` (name, version, and the sha256 and size of every file),
``manifest.sig`` (the Ed25519 signature of the manifest's exact bytes, RFC 8032) and ``wheels/*.whl``.
The tar is uncompressed (wheels are zip files already) so that :func:`sign_archive` can append the
signature to an archive that was built elsewhere. Only the fleet's operator holds the private key;
a device holds the public key (``update.public_key``) and checks everything with
:mod:`agent.ota.verify` before anything is installed.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Sequence

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
WHEELS = "wheels"
FORMAT = 1  # manifest format; verify.py refuses others
PROJECT = "telematics-agent"
CHUNK = 1 << 20


class ReleaseError(Exception):
    """A release cannot be built or signed; the message says why."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _pip(args: Sequence[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise ReleaseError(f"pip {args[0]} failed:\n{tail}")


def collect_wheels(source: Path, dest: Path, platform: str | None = None, python_version: str | None = None,
                   pip_args: Sequence[str] = ()) -> Path:
    """The project's wheel built from ``source`` and its dependencies' wheels, into ``dest``.

    With ``platform`` (e.g. ``manylinux2014_aarch64``) and ``python_version`` (e.g. ``3.11``) the
    dependencies are downloaded as binary wheels for the device (pip's cross-platform download);
    without, they are built or fetched for this machine. ``pip_args`` go to both pip calls
    (``--find-links DIR``, ``--no-index``). Returns the project's wheel.
    """
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        _pip(["wheel", "--quiet", "--no-deps", "--wheel-dir", tmp, str(source), *pip_args])
        built = sorted(Path(tmp).glob("*.whl"))
        if len(built) != 1:
            raise ReleaseError(f"expected one wheel of {source}, pip made {[p.name for p in built]}")
        project_wheel = dest / built[0].name
        os.replace(built[0], project_wheel)
    if platform:
        target = ["--only-binary=:all:", "--platform", platform, "--implementation", "cp"]
        if python_version:
            target += ["--python-version", python_version]
        _pip(["download", "--quiet", "--dest", str(dest), *target, str(project_wheel), *pip_args])
    else:
        _pip(["wheel", "--quiet", "--wheel-dir", str(dest), str(project_wheel), *pip_args])
    return project_wheel


def wheel_version(wheel: Path) -> str:
    """The version in a wheel's file name (PEP 427: name-version-...)."""
    return wheel.name.split("-")[1]


def make_manifest(wheels_dir: Path, version: str, platform: str | None, python_version: str | None) -> bytes:
    """manifest.json: what the archive holds, every file with its sha256 and size."""
    files = {
        f"{WHEELS}/{path.name}": {"sha256": sha256_file(path), "size": path.stat().st_size}
        for path in sorted(wheels_dir.glob("*.whl"))
    }
    doc = {
        "format": FORMAT,
        "name": PROJECT,
        "version": version,
        "platform": platform or "native",
        "python": python_version or f"{sys.version_info.major}.{sys.version_info.minor}",
        "created_utc": round(time.time(), 3),
        "files": files,
    }
    return json.dumps(doc, indent=1, sort_keys=True).encode()


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, int(time.time())
    tar.addfile(info, io.BytesIO(data))


def build_release(source: Path, out_dir: Path, platform: str | None = None, python_version: str | None = None,
                  pip_args: Sequence[str] = ()) -> Path:
    """Build ``{out_dir}/telematics-agent-{version}.tar`` (unsigned: see :func:`sign_archive`)."""
    with tempfile.TemporaryDirectory() as tmp:
        wheels = Path(tmp) / WHEELS
        project_wheel = collect_wheels(source, wheels, platform, python_version, pip_args)
        version = wheel_version(project_wheel)
        manifest = make_manifest(wheels, version, platform, python_version)
        out_dir.mkdir(parents=True, exist_ok=True)
        archive = out_dir / f"{PROJECT}-{version}.tar"
        partial = archive.with_name(archive.name + ".partial")
        with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
            _add_bytes(tar, MANIFEST, manifest)
            for path in sorted(wheels.glob("*.whl")):
                tar.add(path, arcname=f"{WHEELS}/{path.name}", recursive=False)
        os.replace(partial, archive)
    log.info("built release %s (%d wheels)", archive, len(json.loads(manifest)["files"]))
    return archive


def generate_key(private_path: Path, public_path: Path) -> None:
    """A new Ed25519 key pair: the private key PEM (mode 0600) and the public key PEM for devices."""
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private_pem)
    public_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo))


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ReleaseError(f"cannot load the signing key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ReleaseError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """The fleet's Ed25519 public key (PEM); ReleaseError when missing or of another type."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ReleaseError(f"cannot load the release public key {path}: {exc.strerror or exc}") from exc
    return parse_public_key(data, str(path))


def parse_public_key(data: bytes, source: str = "the release key") -> Ed25519PublicKey:
    """An Ed25519 public key from PEM bytes; ReleaseError names ``source`` when it is not one."""
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise ReleaseError(f"cannot load the release public key {source}: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ReleaseError(f"{source} is not an Ed25519 public key")
    return key


def sign_archive(archive: Path, key: Ed25519PrivateKey) -> bytes:
    """Append ``manifest.sig`` (the signature of manifest.json) to ``archive``; returns the signature."""
    with tarfile.open(archive, "r") as tar:
        names = tar.getnames()
        if SIGNATURE in names:
            raise ReleaseError(f"{archive} is signed already")
        member = tar.extractfile(MANIFEST) if MANIFEST in names else None
        if member is None:
            raise ReleaseError(f"{archive} has no {MANIFEST}: not a release archive")
        manifest = member.read()
    signature = key.sign(manifest)
    with tarfile.open(archive, "a", format=tarfile.PAX_FORMAT) as tar:
        _add_bytes(tar, SIGNATURE, signature)
    log.info("signed %s", archive)
    return signature
