"""The torch path of the sparse-target losses: loss and gradient of a block of rows in one pass, closed form.

A stored teacher gives per row k token ids, their log-probs and the log of the tail mass. The loss runs over K + 1
buckets (the eager spec: `kd.losses.functional.sparse_buckets`): with s = z_s / T, lse = logsumexp(s) and
lse_r = logsumexp of s off the k ids (the student's tail, from the entries it holds: no 1 - sum cancellation),

    log q_k = s_{id_k} - lse,     log q_tail = lse_r - lse,     log p = (stored log-probs, stored tail)

Gradient. The divergence is a function of the bucket masses q_b = sum_{v in b} q_v, with g_b = dD/dq_b, and the
softmax Jacobian dq_v/ds_u = q_v (delta_vu - q_u) gives, for a vocabulary entry u in bucket b(u),

    dD/ds_u = q_u (g_b(u) - c),   c = sum_b q_b g_b.

Write G_b = q_b (g_b - c), the gradient w.r.t. the bucket's own logit: the dense closed forms (kd.ops.row_math's
docstring) applied to the K + 1 buckets (`bucket_grad`). Then a stored id gets G_k, and a tail entry u gets
(q_u / q_tail) G_tail = exp(s_u - lse_r) G_tail: its share of the tail, well defined even when q_tail underflows.
With tail="renormalize" the buckets are the k ids renormalized (q_k / sum q_k, p_k / sum p_k), the tail entries get
no gradient at all (the renormalized distribution does not depend on them).

Forward KL: G = q P - p with P = sum_b p_b (1 for a store whose tail completes the mass; kept general so the closed
form is the gradient of the formula the eager spec computes). TAID replaces p by softmax_b((1 - t) log q_b + t log
p_b) (`kd.losses.functional.sparse_taid_kl`), forward KL to it: G = q - p_t. The hard-label CE adds
ce_weight (softmax(z_s) - onehot(label)) at T = 1. fp32 temporaries exist for one block only.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from kd.ops.spec import IGNORE_INDEX, DivergenceSpec, Scalar
from kd.ops.torch_path import _q_grad, row_blocks

# Logits per block of rows: ~2^18, larger than the dense path's 2^16 (a sparse block runs more small ops per row:
# gathers, scatters, the [r, K + 1] bucket math), still a few MiB of fp32 temporaries.
BLOCK_ELEMENTS = 1 << 18


def rows_per_block(vocab: int, rows: Optional[int] = None) -> int:
    return rows if rows is not None else max(1, BLOCK_ELEMENTS // max(vocab, 1))

NEG_INF = float("-inf")
# The log-mass given to a bucket empty on both sides (the tail when K = V): exp of it is an exact 0 in fp32, and the
# mixtures of jsd and the skews stay finite (as kd.losses.functional._EMPTY_LOG_MASS).
EMPTY_LOG_MASS = -1e4


def taid_bucket_target(lq: Tensor, lp: Tensor, t: Scalar) -> Tensor:
    """log p_t over the buckets: log_softmax of (1 - t) log q + t log p; a bucket empty on either side stays empty
    for 0 < t < 1, and the ends are the pure sides (t a float or a 0-dim tensor)."""
    empty = (lq == NEG_INF) | (lp == NEG_INF)
    if isinstance(t, Tensor):
        t = t.to(device=lq.device, dtype=torch.float32)
        inner = torch.where(empty, NEG_INF, (1.0 - t) * lq + t * lp)
        mixed = torch.where(t >= 1.0, lp, torch.where(t <= 0.0, lq, inner))
    elif t <= 0.0:
        mixed = lq
    elif t >= 1.0:
        mixed = lp
    else:
        mixed = torch.where(empty, NEG_INF, (1.0 - t) * lq + t * lp)
    return torch.log_softmax(mixed, -1)


def bucket_grad(spec: DivergenceSpec, lq: Tensor, lp: Tensor) -> tuple[Tensor, Tensor]:
    """(per-row divergence [r], G = dD/d(bucket logits) [r, B]) from bucket log-masses [r, B] (module docstring)."""
    if spec.taid_t is not None:
        lp = taid_bucket_target(lq, lp, spec.taid_t)
    empty = (lq == NEG_INF) & (lp == NEG_INF)
    lq, lp = torch.where(empty, EMPTY_LOG_MASS, lq), torch.where(empty, EMPTY_LOG_MASS, lp)
    q, p = lq.exp(), lp.exp()
    if spec.name == "forward_kl":
        loss = torch.where(p > 0, p * (lp - lq), 0.0).sum(-1)
        return loss, q * p.sum(-1, keepdim=True) - p
    loss, qg = _q_grad(spec, q, p, lq, lp)
    return loss, qg - q * qg.sum(-1, keepdim=True)


def sparse_block_step(student: Tensor, ids: Tensor, logprobs: Tensor, tail_logprob: Tensor, mask: Tensor,
                      labels: Tensor, spec: DivergenceSpec, tail: str, kd_weight: Scalar, ce_weight: float,
                      out: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Rows (kd [r], ce [r]) fp32 of one block ``student [r, V]``, ``ids``/``logprobs [r, K]``, ``tail_logprob [r]``;
    the gradient of ``kd_weight * sum(mask * kd) + ce_weight * sum(valid * ce)`` w.r.t. the block is written to
    ``out`` (default: over ``student``, in its dtype; it may alias it)."""
    out = student if out is None else out
    inv_t = 1.0 / spec.temperature
    z = student.float()
    s = z * inv_t if inv_t != 1.0 else z
    s_top = s.gather(-1, ids)
    lse_top = torch.logsumexp(s_top, -1)
    on = mask.unsqueeze(-1)  # rows off the mask are selected to 0, never multiplied (their loss may be inf)
    row_factor = kd_weight * inv_t
    if tail == "renormalize":
        lse = None
        kd, grad_b = bucket_grad(spec, s_top - lse_top.unsqueeze(-1), torch.log_softmax(logprobs.float(), -1))
        g = torch.zeros_like(s)
    else:
        # the tail's entries: e = exp(s - shift) off the ids, its sum, and later each entry's share e / sum of the
        # tail bucket's gradient, all from one exp pass (an empty tail, K = V: sum 0, share 0)
        e = s.scatter(-1, ids, NEG_INF)
        shift = e.amax(-1, keepdim=True)
        shift = torch.where(torch.isfinite(shift), shift, 0.0)
        e.sub_(shift).exp_()
        total = e.sum(-1)
        lse_rest = total.log() + shift.squeeze(-1)
        lse = torch.logaddexp(lse_rest, lse_top)  # two sums of positive terms: no cancellation
        lq = torch.cat([s_top - lse.unsqueeze(-1), (lse_rest - lse).unsqueeze(-1)], -1)
        lp = torch.cat([logprobs.float(), tail_logprob.float().unsqueeze(-1)], -1)
        kd, grad_b = bucket_grad(spec, lq, lp)
        share = torch.where(on & (total > 0).unsqueeze(-1), grad_b[:, -1:] * row_factor / total.unsqueeze(-1), 0.0)
        g = e.mul_(share)
        grad_b = grad_b[:, :-1]
    g.scatter_(-1, ids, torch.where(on, grad_b * row_factor, 0.0))
    kd = torch.where(mask, kd, 0.0)
    valid = labels != IGNORE_INDEX
    ce = torch.zeros_like(kd)
    if ce_weight > 0.0:
        lse_1 = lse if inv_t == 1.0 and lse is not None else torch.logsumexp(z, -1)
        safe_labels = labels.clamp(min=0).unsqueeze(-1)
        ce = torch.where(valid, lse_1 - z.gather(-1, safe_labels).squeeze(-1), 0.0)
        ce_row = (valid.to(torch.float32) * ce_weight).unsqueeze(-1)
        g.add_((z - lse_1.unsqueeze(-1)).exp_().mul_(ce_row))
        g.scatter_add_(-1, safe_labels, -ce_row)
    off = ~(mask | valid) if ce_weight > 0.0 else ~mask
    if student.device.type != "cpu" or bool(off.any()):  # CPU: the check is free; elsewhere select unconditionally
        g.masked_fill_(off.unsqueeze(-1), 0.0)  # a NaN in an ignored row must not survive its 0 factor
    out.copy_(g)
    return kd, ce


def sparse_pass(student: Tensor, ids: Tensor, logprobs: Tensor, tail_logprob: Tensor, mask: Tensor, labels: Tensor,
                spec: DivergenceSpec, tail: str, kd_weight: Scalar, ce_weight: float, grad: Tensor,
                rows: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """`sparse_block_step` over every block of ``[N, V]`` or ``[B, L, V]`` logits (the sparse tensors shaped alike,
    ``[..., K]`` and ``[...]``): fills ``grad``, returns (kd rows [N], ce rows [N])."""
    n = mask.numel()
    kd = torch.empty(n, dtype=torch.float32, device=student.device)
    ce = torch.empty_like(kd)
    for index, flat in row_blocks(student, rows_per_block(student.shape[-1], rows)):
        kd[flat], ce[flat] = sparse_block_step(student[index], ids[index], logprobs[index], tail_logprob[index],
                                               mask[flat], labels[flat], spec, tail, kd_weight, ce_weight,
                                               out=grad[index])
    return kd, ce
