"""Held-out metrics of a student against its teacher: the math the trainer logs, and `kd eval`.

Per loss token i (labels != -100) with student distribution q_i = softmax(z_s,i) and teacher p_i = softmax(z_t,i),
both at temperature 1 and over the shared vocabulary:

    student_nll = sum_i -log q_i[y_i] / N          student_ppl = exp(min(student_nll, PPL_CAP))
    teacher_nll = sum_i -log p_i[y_i] / N          teacher_ppl = exp(min(teacher_nll, PPL_CAP))
    kl          = sum_i KL(p_i || q_i) / N         KL(p || q) = sum_v p_v (log p_v - log q_v)
    top1        = sum_i [argmax q_i == argmax p_i] / N
    N           = number of loss tokens

`batch_sums` returns the five numerators-and-N of one batch as one fp64 tensor (no host sync), so sums add up over
micro-batches and ranks (one all-reduce) before `finish` divides once: never a mean of means. The per-token formulas
are those of `kd.losses.functional`, applied to blocks of rows so the fp32 temporaries of a 150k vocabulary stay
bounded (`block_elements`), whatever the batch size and the logits' dtype.

`run` is `kd eval`: one process, no DeepSpeed; the teacher from the recipe, the student from an exported model
directory, a checkpoint (consolidated in memory with kd.export), or the recipe itself (untrained baseline).
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch import Tensor

from kd.errors import UserError
from kd.files import atomic_write
from kd.losses import functional as F
from kd.losses.chunked import EAGER_BLOCK_ELEMENTS

SUM_FIELDS = ("student_nll", "teacher_nll", "kl", "top1_agreement", "tokens")
# exp(50) ~ 5e21: an untrained student's perplexity stays a finite, printable number (the trainer logs the same cap).
PPL_CAP = 50.0


def _blocks(batch: int, length: int, rows: int) -> Iterator[tuple[slice, slice]]:
    """(batch slice, position slice) pairs covering [batch, length] with at most ~`rows` positions each.

    Slicing (never reshaping) keeps every block a view: shifted logits `x[:, :-1]` are not flattenable without a copy.
    """
    if length <= rows:
        step = rows // length
        for b in range(0, batch, step):
            yield slice(b, b + step), slice(None)
    else:
        for b in range(batch):
            for pos in range(0, length, rows):
                yield slice(b, b + 1), slice(pos, pos + rows)


def batch_sums(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, *,
               block_elements: int = EAGER_BLOCK_ELEMENTS) -> Tensor:
    """fp64 tensor [5] in `SUM_FIELDS` order: sums over loss tokens of -log q[y], -log p[y], KL(p || q), top-1
    agreement, and the token count.

    Logits are `[B, L, V]` or `[N, V]` (any dtype; each block is upcast to fp32 by the functional formulas), already
    shifted so position i predicts labels[i] and cut to the shared vocabulary; labels `[B, L]` / `[N]`, -100 = not a
    loss token. Values at ignored positions are dropped with `where`, so NaN/inf logits there cannot leak into a sum.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.shape[:-1] != labels.shape:
        raise ValueError(f"batch_sums: student {tuple(student_logits.shape)}, teacher {tuple(teacher_logits.shape)} "
                         f"and labels {tuple(labels.shape)} do not fit [..., V] / [...]")
    if labels.dim() == 1:
        student_logits, teacher_logits, labels = student_logits[None], teacher_logits[None], labels[None]
    elif labels.dim() != 2:
        raise ValueError(f"batch_sums: expected [B, L, V] or [N, V] logits, got {tuple(student_logits.shape)}")
    batch, length, vocab = student_logits.shape
    sums = torch.zeros(len(SUM_FIELDS), dtype=torch.float64, device=student_logits.device)
    if labels.numel() == 0:
        return sums
    zero = student_logits.new_zeros((), dtype=torch.float32)
    for rows, cols in _blocks(batch, length, max(1, block_elements // max(vocab, 1))):
        s, t, y = student_logits[rows, cols], teacher_logits[rows, cols], labels[rows, cols]
        mask = y != F.IGNORE_INDEX
        sums += torch.stack([
            torch.where(mask, F.cross_entropy(s, y), zero).sum(dtype=torch.float64),
            torch.where(mask, F.cross_entropy(t, y), zero).sum(dtype=torch.float64),
            torch.where(mask, F.forward_kl(s, t), zero).sum(dtype=torch.float64),
            ((s.argmax(-1) == t.argmax(-1)) & mask).sum(dtype=torch.float64),
            mask.sum(dtype=torch.float64),
        ])
    return sums


def finish(sums: Tensor) -> dict[str, float]:
    """The named scalars (as the trainer logs them) from `batch_sums` totals, already summed over batches and ranks.

    This is the one host sync of an evaluation. With no loss token the means are 0 (and perplexities 1).
    """
    s_nll, t_nll, kl, agree, tokens = sums.double().tolist()
    n = max(tokens, 1.0)
    return {
        "eval/student_ppl": math.exp(min(s_nll / n, PPL_CAP)),
        "eval/teacher_ppl": math.exp(min(t_nll / n, PPL_CAP)),
        "eval/kl": kl / n,
        "eval/top1_agreement": agree / n,
        "eval/student_nll": s_nll / n,
        "eval/tokens": tokens,
    }


# ---------------------------------------------------------------------------------------------------- kd eval
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
    from kd.engine.student import shift
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
    model = _load_student(source, recipe, tokenizer).to(device)
    vocab = check_compatible(tokenizer, teacher.config, model.config, recipe.data.seq_len)

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sums = torch.zeros(len(SUM_FIELDS), dtype=torch.float64, device=device)
    batches = eval_batches(ds, rank=0, world_size=1, micro_batch_size=mbs, max_batches=max_batches)
    with torch.no_grad():
        for samples in tqdm(batches, total=total, desc="kd eval", unit="batch", file=sys.stderr,
                            disable=not recipe.run.progress_bar):
            batch = {k: v.to(device) for k, v in collate(samples, pad_id).items()}
            inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            sums += batch_sums(shift(model(**inputs).logits, vocab), shift(teacher(**inputs).logits, vocab),
                               batch["labels"][:, 1:])
    scalars = finish(sums)
    if scalars["eval/tokens"] == 0:
        raise UserError(f"the {split} split has no loss tokens (every label is masked)")

    print(format_table(scalars, student=source.describe(), split=split, batches=total))
    if json_out is not None:
        write_json(json_out, {"student": source.describe(), "teacher": recipe.teacher.path, "recipe": recipe_path,
                              "split": split, "batches": total, "micro_batch_size": mbs, "metrics": scalars})
        _log(f"kd eval: wrote {json_out}")
    return scalars


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
