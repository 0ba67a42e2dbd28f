"""DeepSpeed checkpoints with kd's client state, a manifest, an atomic `latest` pointer and retention.

Layout of `checkpoints/`:
    step_00000100/            one DeepSpeed tag (model/optimizer shards in DeepSpeed's own format, so
                              zero_to_fp32 and the universal-checkpoint tools read it)
        kd_rank_00000.pt      per-rank state DeepSpeed does not keep: RNG states (one file per rank)
        kd_meta/              student config + tokenizer + recipe.yaml (what export needs, human readable)
        kd_manifest.json      every file of the tag with its size, written last: its presence marks a complete tag
    latest                    name of the newest complete tag; replaced atomically after all ranks finished
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from typing import Any, Callable, Optional

import numpy as np
import torch

from kd.engine import dist
from kd.errors import UserError
from kd.files import atomic_write

TAG_RE = re.compile(r"^step_(\d{8})$")
MANIFEST = "kd_manifest.json"
META_FILE = "kd_checkpoint.json"  # in kd_meta/: step, world size, lineage, recipe (human readable; resume reads it)


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict[str, Any]:
    """Every RNG a rank uses, as tensors and plain values (so it loads with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointWriteError(Exception):
    """Saving failed on some rank (disk full, permissions); the tag was removed and `latest` left untouched.
    ``local``: only this rank knows (it reports the error itself; the launcher then stops the others)."""

    def __init__(self, message: str, *, local: bool = False):
        super().__init__(message)
        self.local = local


class _WriteGuard:
    """Catches every failure of a DeepSpeed checkpoint engine's writes while a save runs, instead of letting it escape.

    DeepSpeed's `save_checkpoint` has barriers between its writes. A write that raises on one rank would leave that
    rank outside them while the others wait inside, so kd's agreement on the failure could never be reached. With the
    guard, a failed write is recorded and the rank carries on through DeepSpeed's remaining collectives (its files are
    simply missing or partial); after the save every rank holds its own verdict and they agree collectively.
    """

    def __init__(self, engine):
        self.engine = getattr(engine, "checkpoint_engine", None)
        self.error: Optional[BaseException] = None

    def __enter__(self) -> "_WriteGuard":
        if self.engine is not None:
            for name in ("save", "makedirs"):
                original = getattr(self.engine, name, None)
                if original is not None:
                    setattr(self.engine, name, self._guarded(original))
        return self

    def _guarded(self, write):
        def guarded(*args, **kwargs):
            if self.error is not None:
                return None  # the tag is lost anyway; spend no more time (or disk) on it
            try:
                return write(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - torch.save's "file write failed" is a RuntimeError, not OSError
                self.error = e
                return None

        return guarded

    def __exit__(self, *exc) -> None:
        if self.engine is not None:
            for name in ("save", "makedirs"):
                self.engine.__dict__.pop(name, None)  # back to the class's own methods


def _describe_write_error(e: BaseException) -> str:
    if isinstance(e, OSError):
        return f"{e.strerror or e}" + (f" ({e.filename})" if e.filename else "")
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def save(engine, ckpt_dir: str, *, step: int, client_state: dict[str, Any], write_meta: Callable[[str], None],
         keep_last: int, lineage: Optional[str] = None, rank_state: Optional[dict[str, Any]] = None) -> str:
    """Collective: every rank calls it. Returns the tag written.

    Order matters for crash safety: shards (all ranks) -> kd_meta (rank 0) -> agreement -> manifest -> `latest` ->
    pruning. A crash at any point before the manifest leaves a tag that resume recognises as incomplete and skips;
    `latest` still names the previous complete tag. ``rank_state``: this rank's own state besides its RNGs (e.g. a
    generation sampler), stored in its kd_rank file and handed back by `load`. A failure on any rank, of any kind (disk full inside torch.save
    is a RuntimeError), is agreed on by all ranks: the partial tag is removed and `CheckpointWriteError` raised
    everywhere with the failing rank's message, so no rank waits forever in a barrier. Pruning removes only complete
    tags of the same `lineage` (the run id kd writes into every tag's meta), never the tag just written.
    """
    tag = tag_for(step)
    tag_dir = os.path.join(ckpt_dir, tag)

    def clear_earlier_attempt() -> None:
        if os.path.isdir(tag_dir):
            shutil.rmtree(tag_dir)  # an incomplete earlier attempt at the same step, or a stale future of a resume

    dist.run_on_main(clear_earlier_attempt)
    error: Optional[BaseException] = None
    with _WriteGuard(engine) as guard:
        try:
            engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state, save_latest=False)
        except Exception as e:  # noqa: BLE001
            # Not one of the engine's writes (those the guard catches): this rank left DeepSpeed's save somewhere
            # between its barriers, so no collective can be trusted to pair up. It reports and exits on its own; the
            # launcher stops the other ranks. The tag has no manifest, so resume skips it.
            if dist.world_size() > 1:
                raise CheckpointWriteError(f"writing checkpoint {tag_dir} failed on rank {dist.rank()} inside "
                                           f"DeepSpeed's save: {_describe_write_error(e)}. The newest complete "
                                           f"checkpoint is still {read_latest(ckpt_dir) or 'none'}",
                                           local=True) from e
            error = e
    error = error or guard.error
    if error is None:
        try:
            rank_file = os.path.join(tag_dir, f"kd_rank_{dist.rank():05d}.pt")
            torch.save({**rng_state(), "extra": rank_state or {}}, rank_file)
            _test_save_delay(step)
            if dist.is_main():
                write_meta(os.path.join(tag_dir, "kd_meta"))
        except Exception as e:  # noqa: BLE001
            error = e
    verdicts = dist.all_gather_object(None if error is None else _describe_write_error(error))
    failed = [(r, v) for r, v in enumerate(verdicts) if v is not None]
    if failed:
        def remove_partial() -> None:
            shutil.rmtree(tag_dir, ignore_errors=True)

        dist.run_on_main(remove_partial)
        rank, why = failed[0]
        where = f" on rank {rank}" if dist.world_size() > 1 else ""
        raise CheckpointWriteError(f"writing checkpoint {tag_dir} failed{where}: {why}. It was removed; the newest "
                                   f"complete checkpoint is still {read_latest(ckpt_dir) or 'none'}. Free space (or "
                                   "fix permissions) and resume")

    def publish() -> None:
        try:
            _write_manifest(tag_dir)
            atomic_write(os.path.join(ckpt_dir, "latest"), tag)
            prune(ckpt_dir, keep_last, lineage=lineage, keep=tag)
        except OSError as e:
            raise CheckpointWriteError(f"finishing checkpoint {tag_dir} failed: {_describe_write_error(e)}. `latest` "
                                       f"names {read_latest(ckpt_dir) or 'nothing'}; resume skips a tag without a "
                                       "complete manifest. Free space (or fix permissions) and resume") from e

    dist.run_on_main(publish)
    return tag


def _test_save_delay(step: int) -> None:
    """Test hook: KD_TEST_SAVE_DELAY="SECONDS[@STEP]" lingers between the shards and the manifest (of that step's
    save only, when given), widening the window in which a crash leaves a partial checkpoint."""
    setting = os.environ.get("KD_TEST_SAVE_DELAY")
    if setting:
        seconds, _, only_step = setting.partition("@")
        if not only_step or int(only_step) == step:
            time.sleep(float(seconds))


def read_latest(ckpt_dir: str) -> Optional[str]:
    try:
        with open(os.path.join(ckpt_dir, "latest")) as f:
            return f.read().strip() or None
    except OSError:
        return None


def _write_manifest(tag_dir: str) -> None:
    files = {}
    for root, _, names in os.walk(tag_dir):
        for name in names:
            full = os.path.join(root, name)
            files[os.path.relpath(full, tag_dir)] = os.path.getsize(full)
    atomic_write(os.path.join(tag_dir, MANIFEST), json.dumps({"files": files}, indent=1, sort_keys=True))


def is_complete(tag_dir: str) -> tuple[bool, str]:
    """A tag is complete when its manifest exists and every listed file has the listed size."""
    path = os.path.join(tag_dir, MANIFEST)
    if not os.path.isfile(path):
        return False, "no manifest (the save did not finish)"
    try:
        with open(path) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError):
        return False, "unreadable manifest"
    for rel, size in files.items():
        full = os.path.join(tag_dir, rel)
        if not os.path.isfile(full):
            return False, f"missing file {rel}"
        if os.path.getsize(full) != size:
            return False, f"file {rel} has {os.path.getsize(full)} bytes, manifest says {size}"
    return True, ""


def complete_tags(ckpt_dir: str) -> list[str]:
    """Complete tags, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    tags = sorted(t for t in os.listdir(ckpt_dir) if TAG_RE.match(t))
    return [t for t in tags if is_complete(os.path.join(ckpt_dir, t))[0]]


def read_tag_meta(tag_dir: str) -> Optional[dict[str, Any]]:
    """The tag's kd_meta/kd_checkpoint.json (step, world size, run lineage, ...), or None when unreadable."""
    try:
        with open(os.path.join(tag_dir, "kd_meta", META_FILE)) as f:
            meta = json.load(f)
        return meta if isinstance(meta, dict) else None
    except (OSError, ValueError):
        return None


def prune(ckpt_dir: str, keep_last: int, *, lineage: Optional[str], keep: str) -> list[str]:
    """Remove the oldest complete tags of `lineage` so that `keep_last` remain, counting `keep` (the tag just
    written, never removed). "Oldest" is by the order of saving, not by step: after a resume from an earlier tag,
    the tags of the abandoned future have higher steps but are older. Tags of another run (another lineage, or no
    readable meta) and incomplete tags are left alone. Returns the removed tags."""
    ours = []
    for tag in complete_tags(ckpt_dir):
        meta = read_tag_meta(os.path.join(ckpt_dir, tag))
        if tag != keep and meta is not None and meta.get("lineage") == lineage:
            ours.append((float(meta.get("saved_unix", 0.0)), tag))
    ours.sort()
    removed = [tag for _, tag in ours[:max(0, len(ours) - (keep_last - 1))]]
    for tag in removed:
        shutil.rmtree(os.path.join(ckpt_dir, tag), ignore_errors=True)
    return removed


def find_latest(ckpt_dir: str, log: Callable[[str], None] = print) -> Optional[str]:
    """The newest complete tag: the one `latest` names when it is complete (kd moves `latest` only after a save
    completed on every rank, so it is the truth, also after a resume from an earlier tag left higher-numbered ones),
    else the highest complete step (recovers a lost or damaged `latest`). Says which newer tags were skipped and why.
    Used by resume, `kd eval` and `kd export` alike."""
    if not os.path.isdir(ckpt_dir):
        return None
    named = read_latest(ckpt_dir)
    tags = sorted((t for t in os.listdir(ckpt_dir) if TAG_RE.match(t)), reverse=True)
    if named in tags and is_complete(os.path.join(ckpt_dir, named))[0]:
        for tag in tags:
            if tag > named and not is_complete(os.path.join(ckpt_dir, tag))[0]:
                log(f"kd: skipping checkpoint {tag}: {is_complete(os.path.join(ckpt_dir, tag))[1]}")
        return named
    for tag in tags:
        ok, why = is_complete(os.path.join(ckpt_dir, tag))
        if ok:
            return tag
        log(f"kd: skipping checkpoint {tag}: {why}")
    return None


def move_aside(ckpt_dir: str) -> Optional[str]:
    """Rename a `checkpoints/` directory holding tags of an earlier run to `checkpoints.before-UTCTIME/` so a fresh
    run starts clean (and an old run's later steps can never be mistaken for the new run's); returns the new path,
    or None when there was nothing to move."""
    if not os.path.isdir(ckpt_dir) or not any(TAG_RE.match(t) for t in os.listdir(ckpt_dir)):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target, n = f"{ckpt_dir}.before-{stamp}", 1
    while os.path.exists(target):
        n += 1
        target = f"{ckpt_dir}.before-{stamp}-{n}"
    os.replace(ckpt_dir, target)
    return target


def load(engine, ckpt_dir: str, tag: str, *, rng_dir: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Collective: restores module, optimizer, scheduler and this rank's RNG; returns the client state and this
    rank's `rank_state` as saved (empty for a rank the checkpoint did not have).

    `rng_dir` is the original tag directory (a universal copy of the tag has no per-rank files). A rank with no RNG
    file of its own (the world grew) keeps its freshly seeded RNG.
    """
    from kd.engine.safe_load import safe_load

    path, client_state = engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise UserError(f"DeepSpeed found no loadable checkpoint at {os.path.join(ckpt_dir, tag)}", key="resume")
    rank_file = os.path.join(rng_dir, f"kd_rank_{dist.rank():05d}.pt")
    extra: dict[str, Any] = {}
    if os.path.isfile(rank_file):
        saved = safe_load(rank_file)
        set_rng_state(saved)
        extra = saved.get("extra", {})
    return client_state, extra
