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
from typing import Any, Callable, Optional

import numpy as np
import torch

from kd.engine import dist

TAG_RE = re.compile(r"^step_(\d{8})$")
MANIFEST = "kd_manifest.json"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine, ckpt_dir: str, *, step: int, client_state: dict[str, Any], write_meta: Callable[[str], None], keep_last: int) -> str:
    """Collective: every rank calls it. Returns the tag written."""
    tag = tag_for(step)
    tag_dir = os.path.join(ckpt_dir, tag)
    if dist.is_main() and os.path.isdir(tag_dir):
        shutil.rmtree(tag_dir)  # an incomplete earlier attempt at the same step
    dist.barrier()
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state, save_latest=False)
    torch.save(rng_state(), os.path.join(tag_dir, f"kd_rank_{dist.rank():05d}.pt"))
    dist.barrier()  # every rank's shards are on disk before the tag is declared complete
    if dist.is_main():
        write_meta(os.path.join(tag_dir, "kd_meta"))
        _write_manifest(tag_dir)
        _atomic_write(os.path.join(ckpt_dir, "latest"), tag)
        _prune(ckpt_dir, keep_last)
    dist.barrier()
    return tag


def _write_manifest(tag_dir: str) -> None:
    files = {}
    for root, _, names in os.walk(tag_dir):
        for name in names:
            full = os.path.join(root, name)
            files[os.path.relpath(full, tag_dir)] = os.path.getsize(full)
    _atomic_write(os.path.join(tag_dir, MANIFEST), json.dumps({"files": files}, indent=1, sort_keys=True))


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    """The newest complete tag, preferring what `latest` names; says which tags were skipped and why."""
    if not os.path.isdir(ckpt_dir):
        return None
    tags = sorted((t for t in os.listdir(ckpt_dir) if TAG_RE.match(t)), reverse=True)
    for tag in tags:
        ok, why = is_complete(os.path.join(ckpt_dir, tag))
        if ok:
            return tag
        log(f"kd: skipping checkpoint {tag}: {why}")
    return None


def load(engine, ckpt_dir: str, tag: str) -> dict[str, Any]:
    """Collective: restores module, optimizer, scheduler and this rank's RNG; returns the client state."""
    path, client_state = engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {os.path.join(ckpt_dir, tag)}")
    rank_file = os.path.join(ckpt_dir, tag, f"kd_rank_{dist.rank():05d}.pt")
    if os.path.isfile(rank_file):
        # numpy's RNG state is not loadable with weights_only=True; this file is written by kd next to the shards
        set_rng_state(torch.load(rank_file, weights_only=False))
    return client_state
