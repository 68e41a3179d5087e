"""Real releases of this checkout for the OTA tests: copies of the source with another version
(and, for the broken one, an import that fails at start-up), built into signed archives once per session."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.ota.release import build_release, sign_archive

REPO = Path(__file__).resolve().parent.parent
SOURCES = ("agent", "collector", "sim", "pyproject.toml", "README.md")
BROKEN_LINE = "\nimport telematics_module_that_does_not_exist  # a release that fails at start-up\n"


class ReleaseFactory:
    """Builds and signs releases on demand, each (version, broken) once."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.key = Ed25519PrivateKey.generate()
        self.public_key_path = workdir / "release.pub"
        self.public_key_path.write_bytes(self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        self._deps: Path | None = None
        self._built: dict[tuple[str, bool], Path] = {}

    def deps(self) -> Path:
        """Wheels of the project's dependencies (pip's cache makes this quick after the first time)."""
        if self._deps is None:
            dest = self.workdir / "deps"
            # With the build backend's own requirements, so releases build with --no-index.
            subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(dest), str(REPO),
                            "setuptools>=68", "wheel"], check=True, capture_output=True, timeout=600)
            self._deps = dest
        return self._deps

    def source(self, version: str, broken: bool = False) -> Path:
        """A copy of the checkout claiming ``version``."""
        dest = self.workdir / f"src-{version}{'-broken' if broken else ''}"
        if dest.exists():
            return dest
        dest.mkdir()
        for name in SOURCES:
            src = REPO / name
            if src.is_dir():
                shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
            elif src.exists():
                shutil.copy2(src, dest / name)
        init = dest / "agent" / "__init__.py"
        init.write_text(init.read_text().replace('__version__ = "', f'__version__ = "{version}"  # was "', 1))
        if broken:
            with open(dest / "agent" / "app.py", "a") as fh:
                fh.write(BROKEN_LINE)
        return dest

    def release(self, version: str, broken: bool = False, signed: bool = True) -> Path:
        """A signed (or unsigned) archive of ``version``; callers copy it before changing it."""
        key = (version, broken)
        if key not in self._built:
            out = self.workdir / f"out-{version}{'-broken' if broken else ''}"
            archive = build_release(self.source(version, broken), out,
                                    pip_args=["--no-index", "--find-links", str(self.deps())])
            unsigned = archive.with_name(archive.name.replace(".tar", ".unsigned.tar"))
            shutil.copy2(archive, unsigned)
            sign_archive(archive, self.key)
            self._built[key] = archive
        archive = self._built[key]
        return archive if signed else archive.with_name(archive.name.replace(".tar", ".unsigned.tar"))
