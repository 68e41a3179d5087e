"""``telematics-agent release``: build, sign and check over-the-air update archives (docs/ota.md).

  release keygen --out fleet-release            # fleet-release.key (0600, the operator's) + .pub (devices')
  release build [--source .] [--out dist] [--platform manylinux2014_aarch64 --python-version 3.11]
  release sign --key fleet-release.key dist/telematics-agent-1.2.0.tar
  release verify --public-key fleet-release.pub dist/telematics-agent-1.2.0.tar

``sign`` and ``verify`` print the archive's version, size and sha256 as JSON: the update command's fields.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from agent.cli_base import CommandError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    keygen = sub.add_parser("keygen", help="make the fleet's Ed25519 release key pair")
    keygen.add_argument("--out", required=True, help="OUT.key (private, mode 0600) and OUT.pub are written")
    build = sub.add_parser("build", help="the project's wheel and its dependencies in one archive with a manifest")
    build.add_argument("--source", default=".", help="the project checkout (default .)")
    build.add_argument("--out", default="dist", help="where the archive goes (default dist)")
    build.add_argument("--platform", help="the device's wheel platform, e.g. manylinux2014_aarch64 (default: this machine)")
    build.add_argument("--python-version", help="the device's Python, e.g. 3.11 (with --platform)")
    build.add_argument("--find-links", action="append", default=[], metavar="DIR", help="extra wheels for pip")
    build.add_argument("--no-index", action="store_true", help="do not use PyPI (only --find-links)")
    sign = sub.add_parser("sign", help="sign an archive's manifest with the fleet's private key")
    sign.add_argument("--key", required=True, help="the Ed25519 private key (PEM)")
    sign.add_argument("archive")
    verify = sub.add_parser("verify", help="check an archive as a device would")
    verify.add_argument("--public-key", required=True, help="the Ed25519 public key (PEM)")
    verify.add_argument("--floor", help="refuse versions below this")
    verify.add_argument("archive")


def run(args: argparse.Namespace) -> int:
    from agent.ota import release
    from agent.ota.verify import UpdateRefused, open_release

    try:
        if args.action == "keygen":
            private, public = Path(f"{args.out}.key"), Path(f"{args.out}.pub")
            if private.exists():
                raise CommandError(f"{private} exists: not overwriting a signing key")
            release.generate_key(private, public)
            print(f"private key {private} (keep it off the devices), public key {public} (install on devices)")
        elif args.action == "build":
            pip_args = [arg for d in args.find_links for arg in ("--find-links", d)]
            pip_args += ["--no-index"] if args.no_index else []
            archive = release.build_release(Path(args.source), Path(args.out), args.platform, args.python_version, pip_args)
            print(archive)
        elif args.action == "sign":
            archive = _existing(args.archive)
            release.sign_archive(archive, release.load_private_key(Path(args.key)))
            _describe(archive)
        else:
            archive = _existing(args.archive)
            verified = open_release(archive, release.load_public_key(args.public_key), args.floor)
            _describe(archive, verified.version)
    except release.ReleaseError as exc:
        raise CommandError(str(exc)) from exc
    except UpdateRefused as exc:
        raise CommandError(f"refused ({exc.reason}): {exc}") from exc
    except OSError as exc:
        raise CommandError(f"{exc.filename or ''}: {exc.strerror or exc}") from exc
    return 0


def _existing(path: str) -> Path:
    archive = Path(path)
    if not archive.is_file():
        raise CommandError(f"no archive {archive}")
    return archive


def _describe(archive: Path, version: str | None = None) -> None:
    import tarfile

    from agent.ota.release import MANIFEST, sha256_file

    if version is None:
        with tarfile.open(archive, "r:") as tar:
            version = json.loads(tar.extractfile(MANIFEST).read())["version"]
    print(json.dumps({"version": version, "size": archive.stat().st_size, "sha256": sha256_file(archive),
                      "archive": str(archive)}))
