"""`kd eval`: held-out metrics of a student against the recipe's teacher, in one process, no DeepSpeed.

The teacher comes from the recipe, the student from an exported model directory, a checkpoint (consolidated in
memory with kd.export), or the recipe itself (the untrained baseline). The metrics and the loop over batches are
kd.eval_metrics, the same the trainer logs as `eval/*`.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from kd.errors import UserError
from kd.eval_metrics import SUM_FIELDS, evaluate_batches, finish
from kd.files import atomic_write


@dataclass(frozen=True)
class StudentSource:
    """Where `kd eval` takes the student from: kind is "hf" (model directory), "checkpoint" (tag of a checkpoints
    directory) or "untrained" (built from the recipe, as training starts)."""

    kind: str
    path: str = ""
    tag: str = ""

    def describe(self) -> str:
        if self.kind == "checkpoint":
            return os.path.join(self.path, self.tag)
        return self.path if self.kind == "hf" else "untrained student (built from the recipe)"


def find_student(spec: Optional[str], run_dir: str) -> StudentSource:
    """Resolve `--student` (or, when None, the newest complete checkpoint of the run) without loading anything.

    Accepts a Hugging Face model directory (`config.json`, what `kd export` writes), a run's `checkpoints/` directory
    (its newest complete tag), one `step_*` tag directory, or a run directory holding `checkpoints/`.
    """
    from kd import checkpoint

    hint = "pass --student (an exported model directory, a checkpoints/ directory or one step_* tag) or --untrained"
    if spec is None:
        ckpts = os.path.join(run_dir, "checkpoints")
        tag = checkpoint.find_latest(ckpts, log=_log)
        if tag is None:
            raise UserError(f"no complete checkpoint in {ckpts} to evaluate; {hint}")
        return StudentSource("checkpoint", ckpts, tag)
    path = os.path.abspath(os.path.expanduser(spec))
    if not os.path.exists(path):
        raise UserError(f"--student {spec} does not exist; {hint}")
    if os.path.isfile(os.path.join(path, "config.json")):
        return StudentSource("hf", path)
    if checkpoint.TAG_RE.match(os.path.basename(path)):
        ok, why = checkpoint.is_complete(path)
        if not ok:
            raise UserError(f"--student {spec}: checkpoint cannot be evaluated: {why}")
        return StudentSource("checkpoint", os.path.dirname(path), os.path.basename(path))
    for ckpts in (path, os.path.join(path, "checkpoints")):
        tag = checkpoint.find_latest(ckpts, log=_log)
        if tag is not None:
            return StudentSource("checkpoint", ckpts, tag)
    raise UserError(f"--student {spec} is neither a model directory (no config.json) nor a checkpoint directory "
                    f"(no complete step_* tag); {hint}")


def _load_student(source: StudentSource, recipe: Any, tokenizer: Any) -> Any:
    """The student in the recipe's student dtype, eval mode, no gradients."""
    from kd.assets import resolve
    from kd.models import check_same_tokenizer, load_student

    if source.kind == "untrained":
        # the trainer's own construction with its seed: the step-0 student of a run of this recipe
        model = load_student(recipe.student, teacher_cfg=recipe.teacher, seed=recipe.train.seed, zero3_config=None,
                             resolve_path=resolve)
    elif source.kind == "checkpoint":
        from pathlib import Path

        # kd export's consolidation (any ZeRO stage), kept in memory instead of written out
        from kd.export import META_DIR, build_model, load_student_state_dict

        ckpts = Path(source.path)
        model = build_model(ckpts / source.tag / META_DIR, load_student_state_dict(ckpts, source.tag),
                             recipe.student.dtype)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        has_tokenizer = any(os.path.isfile(os.path.join(source.path, n)) for n in ("tokenizer.json", "tokenizer_config.json"))
        if has_tokenizer:  # a model trained on other token ids would give meaningless numbers, not an error
            try:
                check_same_tokenizer(tokenizer, AutoTokenizer.from_pretrained(source.path), key="--student")
            except UserError as err:
                raise UserError(f"--student {source.path}: {err.message}") from None
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[recipe.student.dtype]
        try:
            model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype,
                                                         trust_remote_code=recipe.student.trust_remote_code)
        except (OSError, ValueError) as err:
            raise UserError(f"--student {source.path}: could not load the model: {err}") from err
    return model.eval().requires_grad_(False)


def _check_json_target(json_out: Optional[str]) -> None:
    if json_out is not None and (os.path.isdir(json_out) or json_out.endswith(os.sep)):
        raise UserError(f"--json {json_out} is a directory; give a file name")


def write_json(path: str, payload: dict[str, Any]) -> None:
    """Write `payload` to `path` atomically (kd.files.atomic_write), creating its directory."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(os.path.abspath(path), json.dumps(payload, indent=1) + "\n")


def run(recipe_path: str, overrides: list[str], *, student: Optional[str] = None, untrained: bool = False,
        json_out: Optional[str] = None, max_batches: Optional[int] = None, split: str = "eval") -> dict[str, float]:
    """`kd eval`: evaluate a student against the recipe's teacher on one data split; prints a table, returns it."""
    from tqdm import tqdm

    from kd.assets import resolve
    from kd.data import build_datasets, collate, eval_batches, num_eval_batches
    from kd.models import load_teacher
    from kd.preflight import check_compatible, check_recipe, load_recipe_tokenizer, prepare_assets

    if split not in ("eval", "train"):
        raise UserError(f"--split must be eval or train, got {split!r}")
    if max_batches is not None and max_batches < 1:
        raise UserError(f"--max-batches must be at least 1, got {max_batches}")
    if untrained and student is not None:
        raise UserError("give either --student or --untrained, not both")
    recipe = check_recipe(recipe_path, overrides)
    _check_json_target(json_out)
    source = StudentSource("untrained") if untrained else find_student(student, recipe.run.output_dir)

    prepare_assets(recipe)
    tokenizer = load_recipe_tokenizer(recipe)
    train_ds, eval_ds = build_datasets(recipe.data, tokenizer, seed=recipe.train.seed, resolve_path=resolve)
    ds = eval_ds if split == "eval" else train_ds
    if ds is None:
        raise UserError("the recipe holds out no eval data (data.eval unset, data.eval_fraction 0); set one of them "
                        "or evaluate on the training data with --split train", key="data.eval_fraction")
    if len(ds) == 0:
        raise UserError(f"the {split} split has no samples", key="data.eval" if split == "eval" else "data.train")

    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    mbs = recipe.train.micro_batch_size
    total = num_eval_batches(len(ds), world_size=1, micro_batch_size=mbs, max_batches=max_batches)
    _log(f"kd eval: teacher {recipe.teacher.path or 'inline config'}, student {source.describe()}, {split} split: "
         f"{total} batch(es) of up to {mbs} samples on {device}")
    teacher = load_teacher(recipe.teacher, zero3_config=None, resolve_path=resolve).to(device)
    student_model = _load_student(source, recipe, tokenizer).to(device)
    vocab = check_compatible(tokenizer, teacher.config, student_model.config, recipe.data.seq_len)

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    samples = eval_batches(ds, rank=0, world_size=1, micro_batch_size=mbs, max_batches=max_batches)
    batches = ({k: v.to(device) for k, v in collate(s, pad_id).items()}
               for s in tqdm(samples, total=total, desc="kd eval", unit="batch", file=sys.stderr,
                             disable=not recipe.run.progress_bar))
    sums = evaluate_batches(batches, student=_logits_of(student_model), teacher=_logits_of(teacher), vocab_size=vocab,
                            sums=torch.zeros(len(SUM_FIELDS), dtype=torch.float64, device=device))
    scalars = finish(sums)
    if scalars["eval/tokens"] == 0:
        raise UserError(f"the {split} split has no loss tokens (every label is masked)")

    print(format_table(scalars, student=source.describe(), split=split, batches=total))
    if json_out is not None:
        write_json(json_out, {"student": source.describe(), "teacher": recipe.teacher.path, "recipe": recipe_path,
                              "split": split, "batches": total, "micro_batch_size": mbs, "metrics": scalars})
        _log(f"kd eval: wrote {json_out}")
    return scalars


def _logits_of(model: Any) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """A Hugging Face causal LM as `evaluate_batches` calls it: batch in, unshifted logits out."""
    return lambda batch: model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               use_cache=False).logits


def format_table(scalars: dict[str, float], *, student: str, split: str, batches: int) -> str:
    rows = [("student perplexity", f"{scalars['eval/student_ppl']:.4f}"),
            ("teacher perplexity", f"{scalars['eval/teacher_ppl']:.4f}"),
            ("KL(teacher || student)", f"{scalars['eval/kl']:.6f}"),
            ("top-1 agreement", f"{scalars['eval/top1_agreement']:.4f}"),
            ("student NLL", f"{scalars['eval/student_nll']:.6f}"),
            ("loss tokens", f"{int(scalars['eval/tokens'])}")]
    width = max(len(name) for name, _ in rows)
    lines = [f"kd eval: {student} on the {split} split ({batches} batches)"]
    lines += [f"  {name:<{width}}  {value:>14}" for name, value in rows]
    return "\n".join(lines)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
