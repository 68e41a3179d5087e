"""Release archives: build and sign real releases of this checkout, then everything a device refuses
before install: a wrong signature, a flipped byte, an unsigned or tampered archive, a downgrade."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.ota.release import MANIFEST, SIGNATURE, ReleaseError, load_public_key, sha256_file, sign_archive
from agent.ota.verify import UpdateRefused, check_download, check_version, extract_wheels, open_release


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture
def good(ota_releases, tmp_path) -> Path:
    """A private copy of the signed 0.2.0 release (tests change bytes in it)."""
    copy = tmp_path / "telematics-agent-0.2.0.tar"
    shutil.copy2(ota_releases.release("0.2.0"), copy)
    return copy


def test_a_release_holds_the_project_wheel_and_its_dependencies_with_a_signed_manifest(good, ota_releases, tmp_path):
    release = open_release(good, load_public_key(ota_releases.public_key_path), floor="0.1.0")
    assert release.version == "0.2.0"
    files = release.manifest["files"]
    names = {Path(n).name.split("-")[0].lower() for n in files}
    # The project and the dependencies a device cannot run without.
    assert {"telematics_agent", "paho_mqtt", "msgspec", "shapely", "cryptography"} <= names
    wheels = extract_wheels(release, tmp_path / "x")
    for name, expected in files.items():
        path = tmp_path / "x" / name
        assert sha256_file(path) == expected["sha256"] and path.stat().st_size == expected["size"]
    assert sorted(p.name for p in wheels.iterdir()) == sorted(Path(n).name for n in files)


def test_signed_by_another_key_is_refused(ota_releases, tmp_path):
    archive = shutil.copy2(ota_releases.release("0.2.0", signed=False), tmp_path / "other.tar")
    sign_archive(Path(archive), Ed25519PrivateKey.generate())
    with pytest.raises(UpdateRefused) as refused:
        open_release(Path(archive), load_public_key(ota_releases.public_key_path))
    assert refused.value.reason == "signature"


def test_an_unsigned_archive_is_refused(ota_releases):
    with pytest.raises(UpdateRefused) as refused:
        open_release(ota_releases.release("0.2.0", signed=False), load_public_key(ota_releases.public_key_path))
    assert refused.value.reason == "signature"


def _flip_byte_in(archive: Path, member: str, at: int = 100) -> None:
    with tarfile.open(archive) as tar:
        offset = tar.getmember(member).offset_data + at
    with open(archive, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0x01]))


def test_a_flipped_byte_in_a_wheel_is_refused(good, ota_releases):
    sha_before = sha256_file(good)
    size = good.stat().st_size
    wheel = next(n for n in json.loads(tarfile.open(good).extractfile(MANIFEST).read())["files"] if "telematics_agent" in n)
    _flip_byte_in(good, wheel)
    # The announced hash catches it first ...
    with pytest.raises(UpdateRefused) as refused:
        check_download(good, size, sha_before)
    assert refused.value.reason == "hash"
    # ... and the signed manifest catches it without one.
    with pytest.raises(UpdateRefused) as refused:
        open_release(good, load_public_key(ota_releases.public_key_path))
    assert refused.value.reason == "hash"
    assert wheel in str(refused.value)


def test_a_flipped_byte_in_the_manifest_breaks_the_signature(good, ota_releases):
    _flip_byte_in(good, MANIFEST, at=5)
    with pytest.raises(UpdateRefused) as refused:
        open_release(good, load_public_key(ota_releases.public_key_path))
    assert refused.value.reason == "signature"


def test_a_file_added_to_a_signed_archive_is_refused(good, ota_releases, tmp_path):
    extra = tmp_path / "evil.pth"
    extra.write_text("import os\n")
    with tarfile.open(good, "a") as tar:
        tar.add(extra, arcname="wheels/evil.pth")
    with pytest.raises(UpdateRefused) as refused:
        open_release(good, load_public_key(ota_releases.public_key_path))
    assert refused.value.reason == "format" and "evil.pth" in str(refused.value)


def test_a_path_outside_the_archive_is_refused(good, ota_releases, tmp_path):
    extra = tmp_path / "x"
    extra.write_text("x")
    with tarfile.open(good, "a") as tar:
        tar.add(extra, arcname="../../etc/cron.d/x")
    with pytest.raises(UpdateRefused) as refused:
        open_release(good, load_public_key(ota_releases.public_key_path))
    assert refused.value.reason == "format"


def test_a_downgrade_below_the_floor_is_refused(good, ota_releases):
    key = load_public_key(ota_releases.public_key_path)
    with pytest.raises(UpdateRefused) as refused:
        open_release(good, key, floor="0.3.0")
    assert refused.value.reason == "downgrade" and "0.2.0" in str(refused.value)
    assert open_release(good, key, floor="0.2.0").version == "0.2.0"


@pytest.mark.parametrize("version, floor, refused", [
    ("1.10.0", "1.9.0", False),  # PEP 440 order, not string order
    ("1.9.0", "1.10.0", True),
    ("2.0.0rc1", "2.0.0", True),  # a pre-release comes before its release
    ("2.0.0", "2.0.0", False),
    ("1.0.0", None, False),
])
def test_version_floor_uses_pep440_order(version, floor, refused):
    if refused:
        with pytest.raises(UpdateRefused):
            check_version(version, floor)
    else:
        check_version(version, floor)


def test_signing_twice_is_an_error(good, ota_releases):
    with pytest.raises(ReleaseError, match="signed already"):
        sign_archive(good, ota_releases.key)


def test_cli_keygen_sign_verify(ota_releases, tmp_path):
    keys = tmp_path / "fleet"
    assert cli("release", "keygen", "--out", str(keys)).returncode == 0
    assert (tmp_path / "fleet.key").stat().st_mode & 0o777 == 0o600
    again = cli("release", "keygen", "--out", str(keys))
    assert again.returncode == 2 and "not overwriting" in again.stderr
    archive = Path(shutil.copy2(ota_releases.release("0.2.0", signed=False), tmp_path / "a.tar"))
    signed = cli("release", "sign", "--key", str(tmp_path / "fleet.key"), str(archive))
    assert signed.returncode == 0, signed.stderr
    doc = json.loads(signed.stdout)
    assert doc == {"version": "0.2.0", "size": archive.stat().st_size, "sha256": sha256_file(archive), "archive": str(archive)}
    ok = cli("release", "verify", "--public-key", str(tmp_path / "fleet.pub"), str(archive))
    assert ok.returncode == 0 and json.loads(ok.stdout)["sha256"] == doc["sha256"]
    wrong = cli("release", "verify", "--public-key", str(ota_releases.public_key_path), str(archive))
    assert wrong.returncode == 2 and "refused (signature)" in wrong.stderr and "Traceback" not in wrong.stderr
    low = cli("release", "verify", "--public-key", str(tmp_path / "fleet.pub"), "--floor", "1.0", str(archive))
    assert low.returncode == 2 and "refused (downgrade)" in low.stderr


def test_cli_build_makes_an_unsigned_archive(ota_releases, tmp_path):
    built = cli("release", "build", "--source", str(ota_releases.source("0.4.0")), "--out", str(tmp_path),
                "--no-index", "--find-links", str(ota_releases.deps()))
    assert built.returncode == 0, built.stderr
    archive = Path(built.stdout.strip())
    assert archive.name == "telematics-agent-0.4.0.tar"
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert MANIFEST in names and SIGNATURE not in names


def test_cli_missing_key_is_one_line(tmp_path):
    archive = tmp_path / "a.tar"
    archive.write_bytes(b"")
    proc = cli("release", "sign", "--key", str(tmp_path / "nope.key"), str(archive))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "cannot load the signing key" in proc.stderr


def test_provisioning_installs_the_release_key(ota_releases, tmp_path):
    from agent.config import load_config

    config = tmp_path / "etc" / "agent.yaml"
    done = cli("provision", "--config", str(config), "--user", "root", "--device-id", "truck-7",
               "--release-key", str(ota_releases.public_key_path))
    assert done.returncode == 0, done.stderr
    public_key = load_config(config).update.public_key
    assert public_key == str(tmp_path / "etc" / "release.pub") and (Path(public_key).stat().st_mode & 0o777) == 0o644
    open_release(ota_releases.release("0.2.0"), load_public_key(public_key))  # what the device checks with
    wrong = tmp_path / "ca.pem"
    wrong.write_bytes(Path(ota_releases.public_key_path).read_bytes().replace(b"MCow", b"MCox"))
    bad = cli("provision", "--config", str(config), "--user", "root", "--release-key", str(wrong))
    assert bad.returncode == 2 and "--release-key" in bad.stderr and "Traceback" not in bad.stderr


# -- any damage is refused (hypothesis) ----------------------------------------------------------


def _small_signed_archive(directory: Path, key: Ed25519PrivateKey) -> tuple[Path, dict[str, bytes]]:
    """A release-shaped archive of two small files (verification does not look inside wheels)."""
    from agent.ota.release import WHEELS, _add_bytes, make_manifest

    wheels = directory / WHEELS
    wheels.mkdir(parents=True)
    files = {"a-1.0-py3-none-any.whl": bytes(range(256)) * 3, "b-2.0-py3-none-any.whl": b"PK" + b"\x07" * 900}
    for name, data in files.items():
        (wheels / name).write_bytes(data)
    archive = directory / "telematics-agent-1.0.0.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        _add_bytes(tar, MANIFEST, make_manifest(wheels, "1.0.0", None, None))
        for name, data in files.items():
            _add_bytes(tar, f"{WHEELS}/{name}", data)
    sign_archive(archive, key)
    return archive, files


def test_any_flipped_byte_is_refused_or_harmless(tmp_path_factory):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    key = Ed25519PrivateKey.generate()
    base, files = _small_signed_archive(tmp_path_factory.mktemp("small"), key)
    original = base.read_bytes()

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(offset=st.integers(0, len(original) - 1), mask=st.integers(1, 255))
    def flip(offset, mask):
        damaged = bytearray(original)
        damaged[offset] ^= mask
        path = tmp_path_factory.mktemp("flip") / base.name
        path.write_bytes(bytes(damaged))
        try:
            release = open_release(path, key.public_key())
        except UpdateRefused:
            return
        # Accepted: then only bytes that carry nothing were hit (tar padding, unused header fields),
        # and what would be installed is exactly what was signed.
        out = extract_wheels(release, path.parent / "x")
        assert {p.name: p.read_bytes() for p in out.iterdir()} == files

    flip()
