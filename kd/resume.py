"""Deciding what to resume from, before the engine is built.

`plan_resume` finds the checkpoint (`resume: auto | never | PATH`), refuses one written for a different model,
tokenizer, loss or data, and notices a changed world size: DeepSpeed's ZeRO shards are laid out per rank, so a
checkpoint from N ranks is first converted (once, by rank 0) to DeepSpeed's universal format, which any number of
ranks can load. The sampler position is a global sample index, so the data order continues exactly either way.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

import yaml

from kd import checkpoint
from kd.config.schema import Recipe
from kd.engine import dist
from kd.engine.safe_load import check_tree
from kd.errors import UserError

# Recipe keys whose change makes a checkpoint the wrong one to continue from: the models, the tokens, the loss, and
# train.seed (it decides the sample order: a new seed would repeat some samples and skip others). Everything else
# (run, train schedule and batch shape, eval, checkpoint, resume, deepspeed tuning) may change on resumption.
IDENTITY_KEYS = ("teacher", "student", "tokenizer", "data", "loss", "train.seed")
# Inside those: knobs that change only the speed or the numerics of the same computation, never what is computed.
NOT_IDENTITY = ("loss.kernel", "loss.fused_linear", "data.num_proc")
META_FILE = checkpoint.META_FILE


@dataclass
class ResumePlan:
    ckpt_dir: str  # directory holding the tag DeepSpeed loads (the universal copy when converting)
    tag: str
    source_dir: str  # the original tag directory (per-rank RNG files, manifest)
    meta: dict[str, Any]
    universal: bool  # load with DeepSpeed's load_universal (world size changed)


def read_meta(tag_dir: str) -> dict[str, Any]:
    path = os.path.join(tag_dir, "kd_meta", META_FILE)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"checkpoint {tag_dir} has no readable {os.path.join('kd_meta', META_FILE)} ({e}); "
                        "it was not written by kd or is damaged", key="resume") from None


def find_checkpoint(recipe: Recipe, run_ckpt_dir: str, log: Callable[[str], None]) -> Optional[tuple[str, str]]:
    """(checkpoints dir, tag) to resume from, or None to start fresh."""
    choice = recipe.resume
    if choice == "never":
        return None
    if choice == "auto":
        tag = checkpoint.find_latest(run_ckpt_dir, log=log)
        return (run_ckpt_dir, tag) if tag else None
    path = os.path.abspath(os.path.expanduser(choice))
    if not os.path.isdir(path):
        raise UserError(f"{path} does not exist", key="resume")
    if checkpoint.TAG_RE.match(os.path.basename(path)):
        ok, why = checkpoint.is_complete(path)
        if not ok:
            raise UserError(f"checkpoint {path} cannot be resumed: {why}", key="resume")
        return os.path.dirname(path), os.path.basename(path)
    tag = checkpoint.find_latest(path, log=log)
    if tag is None:
        raise UserError(f"{path} holds no complete checkpoint (no step_* directory with a manifest); point resume at "
                        "a run's checkpoints/ directory or one of its step_* tags", key="resume")
    return path, tag


def schema_default(dotted: str) -> Any:
    """The recipe schema's default for a dotted key, as it is written to recipe.yaml; None when the key has no
    default or is not a schema field."""
    from pydantic import BaseModel

    model: Any = Recipe
    field = None
    for part in dotted.split("."):
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return None
        field = fields[part]
        annotation = field.annotation
        # Optional[Section] -> Section: walk into the model a value of this key would be.
        args = [a for a in getattr(annotation, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
        model = args[0] if args else annotation
    if field is None or field.is_required():
        return None
    value = field.get_default(call_default_factory=True)
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


def recipe_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted keys under IDENTITY_KEYS whose values differ between two resolved recipes."""
    out: list[str] = []
    missing = object()

    def walk(a: Any, b: Any, key: str) -> None:
        # A knob one side's kd did not have yet: that kd computed what the knob's default computes (new knobs are
        # added with the old behaviour as their default), so a run recorded before it existed is the same run.
        a = schema_default(key) if a is missing else a
        b = schema_default(key) if b is missing else b
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k, missing), b.get(k, missing), f"{key}.{k}")
        elif a != b:
            out.append(f"{key}: {a!r} -> {b!r}")

    def get(tree: dict[str, Any], dotted: str) -> Any:
        for part in dotted.split("."):
            tree = tree.get(part) if isinstance(tree, dict) else None
        return tree

    for key in IDENTITY_KEYS:
        walk(get(saved, key), get(current, key), key)
    return [d for d in out if not d.split(":")[0].startswith(NOT_IDENTITY)]


def plan_resume(recipe: Recipe, run_ckpt_dir: str, *, world_size: int, log: Callable[[str], None]) -> Optional[ResumePlan]:
    """Collective: rank 0 decides (and converts, moves aside) while the others wait; every rank gets the same plan, or
    the same error (an error on rank 0 never leaves the others in a barrier)."""
    return dist.run_on_main(lambda: _plan(recipe, run_ckpt_dir, world_size=world_size, log=log), share_result=True)


def _plan(recipe: Recipe, run_ckpt_dir: str, *, world_size: int, log: Callable[[str], None]) -> Optional[ResumePlan]:
    found = find_checkpoint(recipe, run_ckpt_dir, log)
    if found is None or os.path.realpath(found[0]) != os.path.realpath(run_ckpt_dir):
        # A fresh run (or one continuing another directory's run) into a directory holding checkpoints: those are
        # an earlier run's. Left in place, `resume: auto` after a crash could continue the old run from its later
        # steps; they are moved aside (never deleted) and the message says where.
        moved = checkpoint.move_aside(run_ckpt_dir)
        if moved is not None:
            log(f"kd: {run_ckpt_dir} held checkpoints of an earlier run; moved them to {moved} (this run starts its "
                "own; delete that directory when you no longer need it)")
    if found is None:
        return None
    ckpt_dir, tag = found
    tag_dir = os.path.join(ckpt_dir, tag)
    meta = read_meta(tag_dir)
    diffs = recipe_differences(yaml.safe_load(meta["recipe"]), recipe.model_dump(mode="json"))
    if diffs and not recipe.checkpoint.allow_recipe_change:
        shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
        raise UserError(f"checkpoint {tag_dir} was written for a different recipe ({shown}). Resume with the "
                        "original recipe, start a new run (another run.output_dir or resume: never), or set "
                        "checkpoint.allow_recipe_change: true to continue anyway", key="resume")
    if diffs:
        log(f"kd: resuming despite recipe changes (checkpoint.allow_recipe_change): {'; '.join(diffs)}")
    if meta["world_size"] == world_size:
        return ResumePlan(ckpt_dir, tag, tag_dir, meta, universal=False)
    log(f"kd: checkpoint {tag} was written by {meta['world_size']} rank(s), resuming on {world_size}: "
        "loading it through DeepSpeed's universal checkpoint format")
    universal_dir = os.path.join(ckpt_dir, "universal")
    to_universal(tag_dir, os.path.join(universal_dir, tag))
    check_universal(os.path.join(universal_dir, tag))
    return ResumePlan(universal_dir, tag, tag_dir, meta, universal=True)


def to_universal(tag_dir: str, out_dir: str) -> None:
    """Convert one tag with DeepSpeed's own ds_to_universal (once; the result is kept next to the checkpoints)."""
    done = os.path.join(out_dir, ".kd_complete")
    if os.path.isfile(done):
        return
    tmp = out_dir + ".tmp"
    if os.path.isdir(tmp):
        shutil.rmtree(tmp)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    check_tree(tag_dir)  # ds_to_universal unpickles with weights_only=False: nothing unchecked may reach it
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", tag_dir,
           "--output_folder", tmp, "--num_extract_workers", "1", "--num_merge_workers", "1", "--inject_missing_state"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"converting {tag_dir} to a universal checkpoint failed: {tail[0]}", key="resume")
    # kd's own per-tag files travel along so the converted tag is complete on its own
    shutil.copytree(os.path.join(tag_dir, "kd_meta"), os.path.join(tmp, "kd_meta"))
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    open(done, "w").close()


def check_universal(out_dir: str) -> None:
    """Every file of a converted tag against the allowlist, right before `load_universal` (which unpickles without
    weights_only) reads it, also when the conversion was done by an earlier launch."""
    check_tree(out_dir)
