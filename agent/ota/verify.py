"""Checks on a downloaded release, all before anything is installed.

In order: the archive is the one the update command announced (size and sha256 of the whole
file); its manifest is signed by the fleet's Ed25519 key; every file in it is listed in the manifest
with the right sha256 and size, and nothing else is in it (no links, no paths outside the archive);
its version is not below the floor. Any failure raises :class:`UpdateRefused` with the reason
reported to the backend.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from packaging.version import InvalidVersion, Version

from agent.ota.release import CHUNK, FORMAT, MANIFEST, PROJECT, SIGNATURE, WHEELS, sha256_file


class UpdateRefused(Exception):
    """A release that must not be installed; ``reason`` is one word for the backend, the message the detail."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class Release:
    """A verified archive: its path and manifest."""

    path: Path
    manifest: dict[str, Any]

    @property
    def version(self) -> str:
        return self.manifest["version"]


def check_download(path: Path, size: int, sha256: str) -> None:
    """The file is exactly what the update command announced."""
    actual_size = path.stat().st_size
    if actual_size != size:
        raise UpdateRefused("hash", f"{path.name}: {actual_size} bytes, the update command said {size}")
    actual = sha256_file(path)
    if actual != sha256.lower():
        raise UpdateRefused("hash", f"{path.name}: sha256 {actual}, the update command said {sha256}")


def check_version(version: str, floor: str | None) -> None:
    """Refuse ``version`` below ``floor`` (PEP 440 ordering)."""
    try:
        new = Version(version)
        low = Version(floor) if floor else None
    except InvalidVersion as exc:
        raise UpdateRefused("version", f"not a version: {exc}") from exc
    if low is not None and new < low:
        raise UpdateRefused("downgrade", f"version {version} is below the floor {floor}")


def _members(tar: tarfile.TarFile) -> dict[str, tarfile.TarInfo]:
    members: dict[str, tarfile.TarInfo] = {}
    for info in tar.getmembers():
        path = PurePosixPath(info.name)
        if not info.isfile() or path.is_absolute() or ".." in path.parts:
            raise UpdateRefused("format", f"archive member {info.name!r} is not a plain file inside the archive")
        if info.name in members:
            raise UpdateRefused("format", f"archive member {info.name!r} appears twice")
        members[info.name] = info
    return members


def open_release(path: Path, public_key: Ed25519PublicKey, floor: str | None = None) -> Release:
    """Verify the signature, every file and the version of the release archive at ``path``."""
    try:
        tar = tarfile.open(path, "r:")
    except (tarfile.TarError, OSError) as exc:
        raise UpdateRefused("format", f"{path.name} is not a release archive: {exc}") from exc
    with tar:
        members = _members(tar)
        if MANIFEST not in members or SIGNATURE not in members:
            raise UpdateRefused("signature", f"{path.name} has no signed manifest")
        manifest_bytes = tar.extractfile(members[MANIFEST]).read()
        signature = tar.extractfile(members[SIGNATURE]).read()
        try:
            public_key.verify(signature, manifest_bytes)
        except InvalidSignature:
            raise UpdateRefused("signature", f"{path.name}: the manifest's signature does not verify "
                                             f"against the fleet's release key") from None
        manifest = json.loads(manifest_bytes)
        if manifest.get("format") != FORMAT or manifest.get("name") != PROJECT:
            raise UpdateRefused("format", f"{path.name}: manifest format {manifest.get('format')} "
                                          f"of {manifest.get('name')!r} is not a {PROJECT} release")
        files: dict[str, dict[str, Any]] = manifest["files"]
        extra = set(members) - set(files) - {MANIFEST, SIGNATURE}
        missing = set(files) - set(members)
        if extra or missing:
            raise UpdateRefused("format", f"{path.name}: files not in the manifest {sorted(extra)}, "
                                          f"missing {sorted(missing)}")
        for name, expected in files.items():
            if not name.startswith(f"{WHEELS}/"):
                raise UpdateRefused("format", f"{path.name}: unexpected file {name}")
            digest = hashlib.sha256()
            fh = tar.extractfile(members[name])
            while block := fh.read(CHUNK):
                digest.update(block)
            if digest.hexdigest() != expected["sha256"] or members[name].size != expected["size"]:
                raise UpdateRefused("hash", f"{path.name}: {name} does not match its sha256 in the manifest")
    check_version(manifest["version"], floor)
    return Release(path, manifest)


def extract_wheels(release: Release, dest: Path) -> Path:
    """Copy the verified wheels to ``dest/wheels`` (only files the manifest names)."""
    wheels = dest / WHEELS
    wheels.mkdir(parents=True, exist_ok=True)
    with tarfile.open(release.path, "r:") as tar:
        for name in release.manifest["files"]:
            with tar.extractfile(name) as src, open(dest / name, "wb") as out:
                shutil.copyfileobj(src, out, CHUNK)
    for name, expected in release.manifest["files"].items():
        # The archive may have changed on disk since it was verified: check what was written.
        if sha256_file(dest / name) != expected["sha256"]:
            raise UpdateRefused("hash", f"{name} changed after verification")
    return wheels
