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
    """Saving failed on some rank (disk full, permissions); the tag was removed and `latest` left untouched."""


def save(engine, ckpt_dir: str, *, step: int, client_state: dict[str, Any], write_meta: Callable[[str], None], keep_last: int) -> str:
    """Collective: every rank calls it. Returns the tag written.

    Order matters for crash safety: shards (all ranks) -> barrier -> kd_meta -> manifest -> `latest`. A crash at
    any point before the manifest leaves a tag that resume recognises as incomplete and skips; `latest` still names
    the previous complete tag. A write error on any rank (e.g. disk full) is agreed on by all ranks, the partial tag
    is removed and `CheckpointWriteError` raised everywhere, so no rank waits forever in a barrier.
    """
    tag = tag_for(step)
    tag_dir = os.path.join(ckpt_dir, tag)
    if dist.is_main() and os.path.isdir(tag_dir):
        shutil.rmtree(tag_dir)  # an incomplete earlier attempt at the same step
    dist.barrier()
    error = ""
    try:
        engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state, save_latest=False)
        torch.save(rng_state(), os.path.join(tag_dir, f"kd_rank_{dist.rank():05d}.pt"))
        _test_save_delay(step)
        if dist.is_main():
            write_meta(os.path.join(tag_dir, "kd_meta"))
    except OSError as e:
        error = f"{e.strerror or e}" + (f" ({e.filename})" if e.filename else "")
    failed = dist.all_reduce_max(torch.tensor([1.0 if error else 0.0]))
    if float(failed[0]) > 0:
        if dist.is_main():
            shutil.rmtree(tag_dir, ignore_errors=True)
        dist.barrier()
        raise CheckpointWriteError(f"writing checkpoint {tag_dir} failed: {error or 'on another rank'}. It was removed; "
                                   f"the newest complete checkpoint is still {read_latest(ckpt_dir) or 'none'}. "
                                   "Free space (or fix permissions) and resume")
    if dist.is_main():
        _write_manifest(tag_dir)
        atomic_write(os.path.join(ckpt_dir, "latest"), tag)
        _prune(ckpt_dir, keep_last)
    dist.barrier()
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


def _prune(ckpt_dir: str, keep_last: int) -> None:
    keep = set(complete_tags(ckpt_dir)[-keep_last:])
    for tag in os.listdir(ckpt_dir):
        if TAG_RE.match(tag) and tag not in keep:
            shutil.rmtree(os.path.join(ckpt_dir, tag), ignore_errors=True)


def find_latest(ckpt_dir: str, log: Callable[[str], None] = print) -> Optional[str]:
    """The newest complete tag; says which newer tags were skipped and why. (`latest` always names a complete tag
    when kd wrote it; scanning the tags also recovers when `latest` itself was lost.)"""
    if not os.path.isdir(ckpt_dir):
        return None
    tags = sorted((t for t in os.listdir(ckpt_dir) if TAG_RE.match(t)), reverse=True)
    for tag in tags:
        ok, why = is_complete(os.path.join(ckpt_dir, tag))
        if ok:
            return tag
        log(f"kd: skipping checkpoint {tag}: {why}")
    return None


def load(engine, ckpt_dir: str, tag: str, *, rng_dir: str) -> dict[str, Any]:
    """Collective: restores module, optimizer, scheduler and this rank's RNG; returns the client state.

    `rng_dir` is the original tag directory (a universal copy of the tag has no per-rank files). A rank with no RNG
    file of its own (the world grew) keeps its freshly seeded RNG.
    """
    from kd.engine.safe_load import safe_load

    path, client_state = engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise UserError(f"DeepSpeed found no loadable checkpoint at {os.path.join(ckpt_dir, tag)}", key="resume")
    rank_file = os.path.join(rng_dir, f"kd_rank_{dist.rank():05d}.pt")
    if os.path.isfile(rank_file):
        set_rng_state(safe_load(rank_file))
    return client_state
