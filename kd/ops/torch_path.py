"""The torch path (CPU, or ``backend="torch"``): loss and gradient of a block of rows in one pass, closed form.

`block_step` takes a block of student and teacher logits ``[r, V]`` and returns the per-row divergence and CE while
it writes, into a gradient block (which may be the student block itself: the fused-linear path works in place),

    G = kd_weight * mask * dD/dz_s + ce_weight * (label != -100) * (softmax(z_s) - onehot(label))

with the same closed forms as the Triton kernels (kd.ops.row_math's docstring): with q = softmax(z_s / T),
p = softmax(z_t / T) (or TAID's target), g_v = dD/dq_v and c = sum_v q_v g_v, dD/dz_s = (q g - q c) / T, and for
forward KL simply (q - p) / T. No autograd: the fp32 temporaries (log-probabilities of both sides, q, p, a few
products) exist for one block of rows, small enough to stay in cache, and each is touched a handful of times.
`dense_pass` runs it over every block of ``[N, V]`` or ``[B, L, V]`` logits (the trainer's shifted, vocab-cut
view is used as it is, no copy). Inputs may be bf16/fp16/fp32; every reduction is fp32.

The spec is kd.losses.functional (tests/kernels/test_chunked.py compares every divergence, TAID, CE, T != 1).
"""
from __future__ import annotations

import math
from typing import Iterator, Optional

import torch
from torch import Tensor

from kd.ops.spec import IGNORE_INDEX, DivergenceSpec, Scalar

# Logits per block of rows: 2^16 fp32 = 256 KiB per temporary, ~6 live at once: the block stays in L2 while its
# handful of elementwise passes run (at 2^23 each pass streamed from memory and the CPU loss took ~3x longer).
BLOCK_ELEMENTS = 1 << 16


def rows_per_block(vocab: int, rows: Optional[int] = None) -> int:
    return rows if rows is not None else max(1, BLOCK_ELEMENTS // max(vocab, 1))


def taid_logits(student_logits: Tensor, teacher_logits: Tensor, t: Scalar) -> Tensor:
    """fp32 logits ``(1 - t) * stopgrad(z_s) + t * z_t`` whose softmax at temperature T is the TAID target.

    The ends return one side untouched: ``0 * (-inf)`` would be NaN where the teacher masks an entry.
    """
    z_s, z_t = student_logits.detach().float(), teacher_logits.detach().float()
    if isinstance(t, Tensor):
        t = t.to(device=z_s.device, dtype=torch.float32)
        return torch.where(t >= 1.0, z_t, torch.where(t <= 0.0, z_s, (1.0 - t) * z_s + t * z_t))
    if t <= 0.0:
        return z_s
    if t >= 1.0:
        return z_t
    return (1.0 - t) * z_s + t * z_t


def _log_mix(log_a: Tensor, log_b: Tensor, w: float) -> Tensor:
    """log(w a + (1 - w) b); the pure ends return one side exactly (no log 0)."""
    if w <= 0.0:
        return log_b
    if w >= 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(w), log_b + math.log1p(-w))


def _q_grad(spec: DivergenceSpec, q: Tensor, p: Tensor, lq: Tensor, lp: Tensor) -> tuple[Tensor, Tensor]:
    """(per-row loss, q * dD/dq) of the divergences whose gradient needs the row scalar c (not forward KL)."""
    zero = torch.zeros((), dtype=q.dtype, device=q.device)
    name = spec.name
    if name == "reverse_kl":
        qg = torch.where(q > 0, q * (lq - lp), zero)
        return qg.sum(-1), qg
    if name == "jsd":  # d = log(m / q), e = log(m / p), each one logaddexp (precise near beta = 0 and 1)
        log_b, log_1mb = spec.log_beta
        x = lp - lq
        d = torch.logaddexp(torch.full_like(x, log_1mb), x + log_b)
        e = torch.logaddexp(torch.full_like(x, log_b), log_1mb - x)
        qg = q * d * -(1.0 - spec.beta)
        loss = torch.where(p > 0, p * e, zero).sum(-1) * -spec.beta + qg.sum(-1)
        return loss, qg
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1), 0.5 * q * torch.sign(q - p)
    a = spec.alpha
    if name == "skew_kl":
        m = a * p + (1.0 - a) * q
        loss = torch.where(p > 0, p * (lp - _log_mix(lp, lq, a)), zero).sum(-1)
        return loss, torch.where(m > 0, -(1.0 - a) * p * q / m, zero)
    # skew_reverse_kl
    m = a * q + (1.0 - a) * p
    kl = torch.where(q > 0, q * (lq - _log_mix(lq, lp, a)), zero)
    return kl.sum(-1), kl - torch.where(m > 0, a * q * q / m, zero)


def block_step(student: Tensor, teacher: Tensor, mask: Tensor, labels: Tensor, spec: DivergenceSpec,
               kd_weight: Scalar, ce_weight: float, out: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Rows (kd [r], ce [r]) fp32 of one block, and its gradient G (module docstring) written to ``out`` (default:
    over ``student``, in its dtype). ``ce_weight == 0`` skips the CE (ce rows are 0)."""
    out = student if out is None else out
    inv_t = 1.0 / spec.temperature
    z_s = student.float()
    lq = torch.log_softmax(z_s * inv_t if inv_t != 1.0 else z_s, -1)
    z_t = teacher.float() if spec.taid_t is None else taid_logits(z_s, teacher, spec.taid_t)
    lp = torch.log_softmax(z_t * inv_t if inv_t != 1.0 else z_t, -1)
    use_ce = ce_weight > 0.0
    valid = labels != IGNORE_INDEX
    ce = torch.zeros(student.shape[0], dtype=torch.float32, device=student.device)
    if use_ce:  # before G overwrites the student block; log_softmax at T = 1 only when T != 1
        l1 = lq if inv_t == 1.0 else torch.log_softmax(z_s, -1)
        picked = l1.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        ce = torch.where(valid, -picked, 0.0)
    q, p = lq.exp(), lp.exp()
    if spec.name == "forward_kl":
        # p log p - p log q: 0 * (-inf) = NaN where the teacher masks an entry (p = 0); nansum counts it as 0
        kd = (lp - lq).mul_(p).nansum(-1)
        ds = torch.sub(q, p, out=out if out.dtype == torch.float32 else p)  # z_s is not read again: out may alias it
    else:
        kd, qg = _q_grad(spec, q, p, lq, lp)
        ds = qg.sub_(q * qg.sum(-1, keepdim=True))
    kd = torch.where(mask, kd, 0.0)
    kd_row = mask.to(torch.float32) * (kd_weight * inv_t)  # per-row factor (0 on ignored rows)
    ds.mul_(kd_row.unsqueeze(-1))
    if use_ce:
        sm = q if inv_t == 1.0 else l1.exp()
        ce_row = valid.to(torch.float32) * ce_weight
        ds.add_(sm.mul_(ce_row.unsqueeze(-1)))
        ds.scatter_add_(-1, labels.clamp(min=0).unsqueeze(-1), -ce_row.unsqueeze(-1))
    off = ~(mask | valid) if use_ce else ~mask
    if student.device.type != "cpu" or bool(off.any()):  # CPU: the check is free; elsewhere select unconditionally
        ds.masked_fill_(off.unsqueeze(-1), 0.0)  # a NaN in an ignored row must not survive the 0 factor
    if ds is not out:
        out.copy_(ds)
    return kd, ce


def row_blocks(x: Tensor, rows: int) -> Iterator[tuple[tuple, slice]]:
    """(index into ``x``, flat row slice) per block of ``rows`` rows of a 2-D ``[N, V]`` or 3-D ``[B, L, V]`` tensor;
    in 3-D a block never crosses a sequence, so each block is a view."""
    if x.dim() == 2:
        for r in range(0, x.shape[0], rows):
            yield (slice(r, r + rows),), slice(r, min(r + rows, x.shape[0]))
        return
    length = x.shape[1]
    for b in range(x.shape[0]):
        for r in range(0, length, rows):
            stop = min(r + rows, length)
            yield (b, slice(r, stop)), slice(b * length + r, b * length + stop)


def dense_pass(student: Tensor, teacher: Tensor, mask: Tensor, labels: Tensor, spec: DivergenceSpec,
               kd_weight: Scalar, ce_weight: float, grad: Tensor, rows: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """`block_step` over every block: fills ``grad`` (shape of ``student``), returns (kd rows [N], ce rows [N])."""
    n = mask.numel()
    kd = torch.empty(n, dtype=torch.float32, device=student.device)
    ce = torch.empty_like(kd)
    for index, flat in row_blocks(student, rows_per_block(student.shape[-1], rows)):
        kd[flat], ce[flat] = block_step(student[index], teacher[index], mask[flat], labels[flat], spec, kd_weight,
                                        ce_weight, out=grad[index])
    return kd, ce
