"""Held-out metrics of a student against its teacher: the math the trainer logs and `kd eval` prints, and the one
loop both run.

Per loss token i (labels != IGNORE_INDEX) with student distribution q_i = softmax(z_s,i) and teacher
p_i = softmax(z_t,i), both at temperature 1 and over the shared vocabulary:

    student_nll = sum_i -log q_i[y_i] / N          student_ppl = exp(min(student_nll, PPL_CAP))
    teacher_nll = sum_i -log p_i[y_i] / N          teacher_ppl = exp(min(teacher_nll, PPL_CAP))
    kl          = sum_i KL(p_i || q_i) / N         KL(p || q) = sum_v p_v (log p_v - log q_v)
    top1        = sum_i [argmax q_i == argmax p_i] / N
    N           = number of loss tokens

`batch_sums` returns the five numerators-and-N of one batch as one fp64 tensor (no host sync), so sums add up over
micro-batches and ranks (one all-reduce) before `finish` divides once: never a mean of means. The per-token formulas
are those of `kd.losses.functional`, applied to blocks of rows so the fp32 temporaries of a 150k vocabulary stay
bounded (`block_elements`), whatever the batch size and the logits' dtype. `evaluate_batches` is the loop over a
split's micro-batches that the trainer and `kd eval` share.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Iterator, Optional

import torch
from torch import Tensor

from kd.labels import IGNORE_INDEX, shift
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
    shifted so position i predicts labels[i] and cut to the shared vocabulary; labels `[B, L]` / `[N]`, IGNORE_INDEX =
    not a loss token. Values at ignored positions are dropped with `where`, so NaN/inf logits there cannot leak into a
    sum.
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
        mask = y != IGNORE_INDEX
        sums += torch.stack([
            torch.where(mask, F.cross_entropy(s, y), zero).sum(dtype=torch.float64),
            torch.where(mask, F.cross_entropy(t, y), zero).sum(dtype=torch.float64),
            torch.where(mask, F.forward_kl(s, t), zero).sum(dtype=torch.float64),
            ((s.argmax(-1) == t.argmax(-1)) & mask).sum(dtype=torch.float64),
            mask.sum(dtype=torch.float64),
        ])
    return sums


def sparse_batch_sums(student_logits: Tensor, ids: Tensor, logprobs: Tensor, tail: Tensor, label_logprob: Tensor,
                      labels: Tensor) -> Tensor:
    """`batch_sums` against a stored top-k teacher (kd.teachers.store), shifted [B, L, K] / [B, L] like the logits.

    The student's NLL is exact; the teacher's NLL is its stored log-prob of each label; KL(teacher || student) is
    taken over the k + 1 buckets (the k ids and the tail), which by the data-processing inequality is at most the
    full-vocabulary KL (`kd eval` runs the real teacher for that); top-1 agreement compares with the stored top-1.
    """
    sums = torch.zeros(len(SUM_FIELDS), dtype=torch.float64, device=student_logits.device)
    zero = student_logits.new_zeros((), dtype=torch.float32)
    for b in range(student_logits.shape[0]):  # one sample of [L, V] fp32 at a time
        mask = labels[b] != IGNORE_INDEX
        log_q = torch.log_softmax(student_logits[b].float(), dim=-1)
        kl = F.sparse_divergence(student_logits[b], ids[b], logprobs[b], tail[b], divergence="forward_kl")
        teacher_top1 = ids[b].gather(-1, logprobs[b].argmax(-1, keepdim=True)).squeeze(-1)
        sums += torch.stack([
            torch.where(mask, -log_q.gather(-1, labels[b].clamp_min(0)[:, None]).squeeze(-1), zero).sum(dtype=torch.float64),
            torch.where(mask, -label_logprob[b].float(), zero).sum(dtype=torch.float64),
            torch.where(mask, kl, zero).sum(dtype=torch.float64),
            ((log_q.argmax(-1) == teacher_top1) & mask).sum(dtype=torch.float64),
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


def evaluate_batches(batches: Iterable[dict[str, Tensor]], *, student: Callable[[dict[str, Tensor]], Tensor],
                     teacher: Callable[[dict[str, Tensor]], Tensor], vocab_size: int,
                     sums: Optional[Tensor] = None) -> Tensor:
    """The `batch_sums` totals (fp64 [5], `SUM_FIELDS` order) of `batches`, added to `sums` when given.

    Each batch is already on the device, with `input_ids`, `attention_mask` and unshifted `labels` (as `collate`
    makes them); `student(batch)` and `teacher(batch)` return its unshifted logits [B, L, V'] in the model dtype
    (`batch_sums` upcasts one bounded block of rows at a time). Logits are shifted and cut to `vocab_size`
    (kd.labels.shift) against `labels[:, 1:]`.

    Sums, not means: a mean per batch (or per rank) weighs a batch of 10 loss tokens like one of 10,000. The caller
    adds the sums over ranks (one all-reduce) and calls `finish`, which divides once by the global token count. No
    host sync and no collective here, so the loop never waits on the device between batches. A caller whose share
    of batches may be empty passes `sums` (zeros on its device): with neither a batch nor `sums` the result is on
    the CPU.
    """
    with torch.no_grad():
        for batch in batches:
            student_logits, teacher_out = student(batch), teacher(batch)
            if isinstance(teacher_out, torch.Tensor):
                part = batch_sums(shift(student_logits, vocab_size), shift(teacher_out, vocab_size),
                                  batch["labels"][:, 1:])
            else:  # a sparse teacher (kd.teachers.store)
                part = sparse_batch_sums(shift(student_logits, vocab_size), shift(teacher_out.topk_ids),
                                         shift(teacher_out.topk_logprobs), shift(teacher_out.tail_logprob),
                                         shift(teacher_out.label_logprob), batch["labels"][:, 1:])
            sums = part if sums is None else sums + part
    if sums is None:  # no batch and no `sums`: nothing tells the device
        sums = torch.zeros(len(SUM_FIELDS), dtype=torch.float64)
    return sums
