"""Export a student checkpoint (DeepSpeed format, any ZeRO stage) as a Hugging Face model directory.

A kd checkpoint directory holds one folder per tag (`step_00000100/`) and a `latest` file naming the newest. Each tag
folder has DeepSpeed's files and `kd_meta/` (the student's `config.json` and tokenizer files). Without `--tag`, the
export is of the newest complete tag as resume and `kd eval` find it (kd.checkpoint.find_latest). The trained module
wraps the student, so its parameters are named `student.<hf name>`; other prefixes (`loss.` ...) are loss parameters
and are not exported.

ZeRO 1-3 checkpoints are consolidated with DeepSpeed's own `zero_to_fp32` (fp32 master weights, all shards), which
unpickles without weights_only: the tag's files are first checked against kd's allowlist (kd.engine.safe_load, the one
resume uses). ZeRO 0 writes no optimizer shards, so `zero_to_fp32` does not apply; its `mp_rank_00_model_states.pt`
holds the full module state dict, which we read with kd.engine.safe_load.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

from kd.errors import EXIT_USER_ERROR, UserError

STUDENT_PREFIX = "student."
META_DIR = "kd_meta"
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def list_tags(checkpoint_dir: Path) -> list[str]:
    """Tag folders in a checkpoint directory (those holding DeepSpeed model states), sorted by name."""
    return sorted(p.name for p in checkpoint_dir.iterdir() if p.is_dir() and any(p.glob("*model_states.pt")))


def resolve_tag(checkpoint_dir: Path, tag: str | None) -> str:
    """Return `tag`, or the newest complete one (kd.checkpoint.find_latest: what `latest` names when that tag is
    complete, else the highest complete step; newer tags it skips are noted on stderr). UserError when the directory
    or the tag is missing, or no tag is complete."""
    from kd import checkpoint

    if not checkpoint_dir.is_dir():
        raise UserError(f"checkpoint directory {checkpoint_dir} does not exist (pass RUN_DIR/checkpoints)")
    tags = list_tags(checkpoint_dir)
    if tag is None:
        skipped: list[str] = []
        tag = checkpoint.find_latest(str(checkpoint_dir), log=skipped.append)
        if tag is None:
            named = checkpoint.read_latest(str(checkpoint_dir))
            why = ([f"`latest` names {named}"] if named else []) + [s.removeprefix("kd: skipping checkpoint ")
                                                                    for s in skipped]
            hint = f"pass --tag, one of: {', '.join(tags)}" if tags else "it holds no checkpoints"
            detail = f" ({'; '.join(why)})" if why else ""
            raise UserError(f"no complete checkpoint in {checkpoint_dir}{detail}; {hint}")
        for line in skipped:
            print(line, file=sys.stderr)
    if not (checkpoint_dir / tag).is_dir():
        raise UserError(f"no checkpoint tag {tag!r} in {checkpoint_dir}; available: {', '.join(tags) or 'none'}")
    return tag


def _load_stage0_module(tag_dir: Path) -> dict:
    """The `module` state dict of a ZeRO-0 checkpoint, loaded without unpickling arbitrary objects (safe_load: the
    allowlist resume uses, refused with its message), memory-mapped."""
    from kd.engine.safe_load import safe_load

    path = tag_dir / "mp_rank_00_model_states.pt"
    if not path.is_file():
        raise UserError(f"{tag_dir} has neither ZeRO optimizer shards nor {path.name}: not a complete DeepSpeed checkpoint")
    return safe_load(str(path), map_location="cpu", mmap=True)["module"]


def load_student_state_dict(checkpoint_dir: Path, tag: str) -> dict:
    """The student's consolidated state dict (HF parameter names, `student.` prefix removed)."""
    tag_dir = checkpoint_dir / tag
    if any(tag_dir.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        from kd.engine.safe_load import check_tree

        check_tree(str(tag_dir))  # zero_to_fp32 unpickles with weights_only=False: nothing unchecked may reach it
        # zero_to_fp32 prints progress on stdout; keep stdout for the command's own output.
        with contextlib.redirect_stdout(sys.stderr):
            try:
                full = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
            except (FileNotFoundError, ValueError) as err:
                raise UserError(f"cannot consolidate ZeRO checkpoint {tag_dir}: {err}") from err
    else:
        full = _load_stage0_module(tag_dir)
    student = {k[len(STUDENT_PREFIX):]: v for k, v in full.items() if k.startswith(STUDENT_PREFIX)}
    if not student:
        prefixes = sorted({k.split(".")[0] for k in full})
        raise UserError(f"{tag_dir} holds no parameters under `{STUDENT_PREFIX}` (found prefixes: {', '.join(prefixes)})")
    return student


def build_model(meta: Path, state: dict, dtype: str | None):
    """Instantiate the student from its config and load `state` strictly; returns the model in the export dtype."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(meta)
    target = getattr(torch, DTYPES[dtype]) if dtype else _config_dtype(config)
    model = AutoModelForCausalLM.from_config(config)
    # Tied embeddings: both names are one parameter, so their checkpoint values must agree; if the checkpoint
    # carries only the embedding (some consolidations drop the alias), fill the alias from it.
    for alias, source in _tied_pairs(model):
        if alias not in state and source in state:
            state[alias] = state[source]
        elif alias in state and source in state and not torch.equal(state[alias], state[source]):
            raise UserError(f"checkpoint has different values for tied parameters {alias} and {source}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:400]
        raise UserError(f"checkpoint does not match the student config in {meta}: {detail}") from err
    model.to(target)
    model.config.dtype = target
    if (meta / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(meta)
    return model


def _config_dtype(config):
    """The dtype the student config declares (a torch.dtype or its name), fp32 when it declares none."""
    import torch

    # transformers 5 calls it `dtype`, 4.x `torch_dtype`.
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(declared, str):
        declared = getattr(torch, declared, None)
    return declared if isinstance(declared, torch.dtype) else torch.float32


def _tied_pairs(model) -> list[tuple[str, str]]:
    """(alias, source) names of parameters that are the same tensor (e.g. lm_head.weight -> embed_tokens.weight)."""
    seen: dict[int, str] = {}
    pairs = []
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            pairs.append((name, seen[id(param)]))
        else:
            seen[id(param)] = name
    return pairs


def export_checkpoint(checkpoint_dir: str, out_dir: str, *, tag: str | None = None, dtype: str | None = None,
                      overwrite: bool = False) -> str:
    """Write the student of `checkpoint_dir` (tag `tag`, or the newest complete one) to `out_dir` as a HF model;
    returns `out_dir`.

    `dtype` is "fp32" or "bf16" (default: the student config's dtype). The model is written to a temp dir beside
    `out_dir` and renamed into place, so `out_dir` never holds a partial export.
    """
    ckpt, out = Path(checkpoint_dir).expanduser(), Path(out_dir).expanduser()
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    occupied = out.is_file() or (out.is_dir() and any(out.iterdir()))
    if occupied and not overwrite:
        raise UserError(f"{out} already exists and is not empty; choose another output or pass --overwrite")
    tag = resolve_tag(ckpt, tag)
    meta = ckpt / tag / META_DIR
    if not (meta / "config.json").is_file():
        raise UserError(f"{meta} has no config.json: this checkpoint was not written by kd, cannot rebuild the student")
    model = build_model(meta, load_student_state_dict(ckpt, tag), dtype)

    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(work)
        _save_tokenizer(meta, work)
        info = {"source_checkpoint": str(ckpt.resolve()), "tag": tag, "dtype": str(model.dtype).replace("torch.", "")}
        (work / "kd_export.json").write_text(json.dumps(info, indent=2) + "\n")
        _publish(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return str(out)


export = export_checkpoint  # the name `kd export` (kd/cli.py) calls


def _publish(work: Path, out: Path) -> None:
    """Move `work` to `out`; an existing `out` is first renamed aside, so `out` is always absent or complete."""
    if not out.exists():
        work.rename(out)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    out.rename(trash / out.name)
    work.rename(out)
    shutil.rmtree(trash, ignore_errors=True)


def _save_tokenizer(meta: Path, dest: Path) -> None:
    """Round-trip the tokenizer through transformers (validates it); warn when the checkpoint has none."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(meta)
    except (OSError, ValueError) as err:
        print(f"kd export: warning: no usable tokenizer in {meta} ({err}); exporting the model only", file=sys.stderr)
        return
    tokenizer.save_pretrained(dest)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Arguments of `kd export` / tools/export_hf.py (pass a subparser to add them there)."""
    parser = parser or argparse.ArgumentParser(prog="export_hf.py", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint_dir", help="RUN_DIR/checkpoints (holds tag folders and `latest`)")
    parser.add_argument("out_dir", help="directory to write the Hugging Face model into")
    parser.add_argument("--tag", help="checkpoint tag to export (default: the newest complete one)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="weights dtype (default: the student config's)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI entry: export, print the output path; a UserError becomes one line on stderr and exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint_dir, args.out_dir, tag=args.tag, dtype=args.dtype, overwrite=args.overwrite)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(out)
    return 0
