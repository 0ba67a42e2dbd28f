"""The jane-austen asset (a second real corpus for the fusion experts): the Debian-package source (download checked
against its pinned SHA-256, .deb unpacked without dpkg, a clear error when apt-get or the package is missing) and the
chapter split, on inputs built here; the real package end to end under -m slow."""
from __future__ import annotations

import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from kd.assets import ASSETS, prepare
from kd.assets.builders import austen_chapters
from kd.assets.sources import DebianPackage
from kd.errors import UserError


def make_deb(path: Path, files: dict[str, bytes]) -> bytes:
    """A minimal .deb: an ar archive with debian-binary, control.tar.gz and data.tar.gz (odd sizes: ar pads)."""
    def tar(members: dict[str, bytes]) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tf:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    out = b"!<arch>\n"
    for name, body in (("debian-binary", b"2.0\n"), ("control.tar.gz", tar({"./control": b"Package: x\n"})),
                       ("data.tar.gz", tar(files))):
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode() + body + b"\n" * (len(body) % 2)
    path.write_bytes(out)
    return out


def fake_apt(monkeypatch, deb_bytes: bytes | None, returncode: int = 0):
    def run(cmd, cwd=None, **kw):
        assert cmd[:2] == ["apt-get", "download"]
        if deb_bytes is not None:
            (Path(cwd) / "pkg_1.0_all.deb").write_bytes(deb_bytes)
        return subprocess.CompletedProcess(cmd, returncode, "", "E: Unable to locate package pkg")
    monkeypatch.setattr(subprocess, "run", run)


def test_debian_source_checks_the_hash_and_unpacks(tmp_path, monkeypatch):
    import hashlib

    deb = make_deb(tmp_path / "x.deb", {"./usr/share/pkg/data.txt": b"hello austen"})
    fake_apt(monkeypatch, deb)
    src = DebianPackage("pkg", "1.0", hashlib.sha256(deb).hexdigest())
    unpacked = src.fetch(tmp_path / "ok")
    assert (unpacked / "usr/share/pkg/data.txt").read_bytes() == b"hello austen"
    with pytest.raises(UserError, match="expected 0000.*not the pinned package"):
        DebianPackage("pkg", "1.0", "0" * 64).fetch(tmp_path / "bad")


def test_debian_source_errors_say_what_to_do(tmp_path, monkeypatch):
    fake_apt(monkeypatch, None, returncode=100)
    with pytest.raises(UserError, match="Unable to locate package pkg.*apt-get update.*KD_CACHE"):
        DebianPackage("pkg", "1.0", "0" * 64).fetch(tmp_path / "a")

    def no_apt(cmd, **kw):
        raise FileNotFoundError(2, "No such file or directory")
    monkeypatch.setattr(subprocess, "run", no_apt)
    with pytest.raises(UserError, match="could not run apt-get.*Debian-based system"):
        DebianPackage("pkg", "1.0", "0" * 64).fetch(tmp_path / "b")


def test_chapters_split_on_headings_without_front_matter_or_volumes():
    lines = ["EMMA", "", "By Jane Austen", "", "VOLUME I", "", "CHAPTER I", "", "Emma Woodhouse, handsome,",
             "clever, and rich.", "", "She was the youngest.", "", "", "CHAPTER II", "", "Mr. Weston  was a native",
             "of Highbury.", "", "VOLUME II", "", "Chapter 3.", "", "The end."]
    docs = austen_chapters("Emma", lines)
    assert docs == [
        {"text": "Emma, Chapter 1\nEmma Woodhouse, handsome, clever, and rich.\nShe was the youngest.", "book": "Emma",
         "chapter": 1},
        {"text": "Emma, Chapter 2\nMr. Weston was a native of Highbury.", "book": "Emma", "chapter": 2},
        {"text": "Emma, Chapter 3\nThe end.", "book": "Emma", "chapter": 3},
    ]


@pytest.mark.slow
def test_the_real_package_builds_the_six_novels(tmp_path):
    """Needs apt sources with r-cran-janeaustenr (Debian) and the rdata package."""
    pytest.importorskip("rdata")
    root = prepare(ASSETS["jane-austen"], root=tmp_path, log=lambda m: None)
    docs = [json.loads(line) for line in (root / "austen.jsonl").read_text().splitlines()]
    per_book = {}
    for d in docs:
        per_book[d["book"]] = per_book.get(d["book"], 0) + 1
    assert per_book == {"Sense and Sensibility": 50, "Pride and Prejudice": 61, "Mansfield Park": 48, "Emma": 55,
                        "Northanger Abbey": 31, "Persuasion": 24}
    assert docs[0]["text"].startswith("Sense and Sensibility, Chapter 1\nThe family of Dashwood had long been settled")
    assert sum(len(d["text"]) for d in docs) > 3.5e6
