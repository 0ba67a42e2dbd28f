"""The sparse row kernel: loss and gradient of one row of student logits against a stored top-k teacher per program.

Per row (the math is kd.ops.sparse_torch's docstring; the eager spec kd.losses.functional.sparse_divergence):

    pass A   online logsumexp (log2 domain) of s = z_s / T over the entries *off* the k ids: lse_r, the student's tail
             from the mass it holds (no 1 - sum cancellation); with CE at T != 1 also the T = 1 normalizer.
    buckets  the k stored entries are gathered (k loads), lse = logaddexp(lse_r, lse_top); the K + 1 bucket
             log-masses sit in one vector of KB = next_pow2(K + 1) lanes (tail in lane K, empty padding lanes), and
             the loss and the bucket gradients G_b = dD/d(bucket logit) come from the dense closed forms
             (kd.ops.row_math.terms) on that vector.
    pass C   every entry gets its share of the tail's gradient, exp(s_u - lse_r) G_tail (0 with tail="renormalize"),
             plus the CE term; after a barrier the k stored entries are overwritten with G_k (+ CE).

Which entries are stored: the host sorts each row's ids (and log-probs with them), so the ids inside a block of BLOCK
vocabulary entries are a contiguous run of the sorted list, found by counting; the block's lanes are compared with
those ids only (picked out of the id vector in registers), K x BLOCK compares per row in all. The gradient goes to
``g`` in the student dtype (a separate buffer, or the student block itself on the fused-linear path: what pass C
overwrites is never read again; the stored entries' logits were gathered before). Every reduction is fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kd.ops import row_math as rm
from kd.ops.dense_kl import Launch, _as_rows, _row_offset, _rows, launch_config, tau_tensor
from kd.ops.spec import DivergenceSpec

NO_ID: tl.constexpr = tl.constexpr(1 << 30)  # padding lanes of the id vector: never inside a block
EMPTY: tl.constexpr = tl.constexpr(-1e4)  # log-mass of a bucket empty on both sides (kd.ops.sparse_torch)


@triton.jit
def _stored_lanes(idv, offs, lo, j0, BLOCK: tl.constexpr):
    """(Boolean [BLOCK]: which lanes ``offs`` = lo .. lo + BLOCK are among the row's sorted stored ids ``idv``, j1).
    ``j0``: how many ids lie before ``lo`` (the previous block's j1); the block's ids are idv[j0:j1], each picked out
    of the vector in registers (no load inside the block loop)."""
    j1 = tl.sum((idv < lo + BLOCK).to(tl.int32), axis=0)
    lanes = tl.arange(0, idv.shape[0])
    hit = offs < 0
    for j in range(j0, j1):
        hit = hit | (offs == tl.sum(tl.where(lanes == j, idv, 0), axis=0))
    return hit, j1


@triton.jit
def _rest_block(m_r, z_r, m_1, z_1, j, s_row, idv, lo, V, scale, CE_SEPARATE: tl.constexpr,
                MASKED: tl.constexpr, BLOCK: tl.constexpr):
    offs = lo + tl.arange(0, BLOCK)
    if MASKED:
        zs = tl.load(s_row + offs, mask=offs < V, other=0.0).to(tl.float32)
    else:
        zs = tl.load(s_row + offs).to(tl.float32)
    stored, j = _stored_lanes(idv, offs, lo, j, BLOCK)
    r2 = tl.where(stored, float("-inf"), zs * scale)
    if MASKED:
        r2 = tl.where(offs < V, r2, float("-inf"))
    new_r = tl.maximum(m_r, tl.max(r2, axis=0))
    z_r = z_r * tl.exp2(m_r - new_r) + tl.sum(tl.exp2(r2 - new_r), axis=0)
    if CE_SEPARATE:
        x1 = zs * rm.LOG2E
        if MASKED:
            x1 = tl.where(offs < V, x1, float("-inf"))
        new_1 = tl.maximum(m_1, tl.max(x1, axis=0))
        z_1 = z_1 * tl.exp2(m_1 - new_1) + tl.sum(tl.exp2(x1 - new_1), axis=0)
        m_1 = new_1
    return new_r, z_r, m_1, z_1, j


@triton.jit
def _grad_block(s_row, g_row, lo, V, scale, lse_r, tail_g, label, lse_1, ce_w, CE: tl.constexpr,
                CE_SEPARATE: tl.constexpr, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    """Pass C on one block: tail share + CE (the stored lanes are overwritten afterwards)."""
    offs = lo + tl.arange(0, BLOCK)
    if MASKED:
        zs = tl.load(s_row + offs, mask=offs < V, other=0.0).to(tl.float32)
    else:
        zs = tl.load(s_row + offs).to(tl.float32)
    s2 = zs * scale
    # off the stored ids s <= lse_r, so the clamp only touches stored lanes (overwritten later): never inf * 0
    g = tail_g * tl.exp2(tl.minimum(s2 - lse_r, 0.0))
    if CE:
        x1 = s2
        if CE_SEPARATE:
            x1 = zs * rm.LOG2E
        g += ce_w * (tl.exp2(x1 - lse_1) - tl.where(offs == label, 1.0, 0.0))
    if MASKED:
        tl.store(g_row + offs, g.to(g_row.dtype.element_ty), mask=offs < V)
    else:
        tl.store(g_row + offs, g.to(g_row.dtype.element_ty))


@triton.jit
def _log_softmax(x):
    m = tl.max(x, axis=0)
    return x - (m + tl.log(tl.sum(tl.exp(x - m), axis=0)))


@triton.jit
def _sparse_rows_kernel(s_ptr, s_l, s_sb, s_sl, g_ptr, g_l, g_sb, g_sl, ids_ptr, lp_ptr, tail_ptr, mask_ptr,
                        label_ptr, kd_ptr, ce_ptr, tau_ptr, V, K, scale, kd_scale, ce_weight, beta, log_b, log_1mb,
                        alpha, DIV: tl.constexpr, TAID: tl.constexpr, CE: tl.constexpr, CE_SEPARATE: tl.constexpr,
                        RENORM: tl.constexpr, KB: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + _row_offset(row, s_l, s_sb, s_sl)
    g_row = g_ptr + _row_offset(row, g_l, g_sb, g_sl)
    ids_row = ids_ptr + row * K
    kd_on = tl.load(mask_ptr + row) != 0
    label = tl.load(label_ptr + row)
    ce_on = label != -100  # kd.labels.IGNORE_INDEX
    active = kd_on
    if CE:
        active = active | ce_on
    kd = 0.0
    ce = 0.0
    n_full = V // BLOCK
    if active:
        tau = 0.0
        if TAID:
            tau = tl.load(tau_ptr)
        knobs = rm.Knobs(scale, tau, beta, log_b, log_1mb, alpha, DIV, TAID, CE, CE_SEPARATE)
        lanes = tl.arange(0, KB)
        kin = lanes < K
        idv = tl.load(ids_row + lanes, mask=kin, other=NO_ID)
        top2 = tl.where(kin, tl.load(s_row + idv, mask=kin, other=0.0).to(tl.float32) * scale, float("-inf"))
        m_top = tl.max(top2, axis=0)
        lse_top = m_top + tl.log2(tl.sum(tl.exp2(top2 - m_top), axis=0))
        z_lab = tl.load(s_row + tl.maximum(label, 0)).to(tl.float32)  # before pass C may overwrite the row
        # pass A
        m_r = tl.full((), -1e30, tl.float32)  # finite sentinel: (-inf) - (-inf) would be NaN
        m_1 = m_r
        z_r = tl.zeros((), tl.float32)
        z_1 = z_r
        j = tl.zeros((), tl.int32)  # stored ids before the current block
        if (not RENORM) or CE:
            for i in range(0, n_full):
                m_r, z_r, m_1, z_1, j = _rest_block(m_r, z_r, m_1, z_1, j, s_row, idv, i * BLOCK, V, scale,
                                                    CE_SEPARATE, False, BLOCK)
            if n_full * BLOCK < V:
                m_r, z_r, m_1, z_1, j = _rest_block(m_r, z_r, m_1, z_1, j, s_row, idv, n_full * BLOCK, V, scale,
                                                    CE_SEPARATE, True, BLOCK)
        lse_r = m_r + tl.log2(z_r)  # -inf when every entry is stored
        hi = tl.maximum(lse_r, lse_top)
        lse = hi + tl.log2(tl.exp2(lse_r - hi) + tl.exp2(lse_top - hi))
        lse_1 = lse
        if CE_SEPARATE:
            lse_1 = m_1 + tl.log2(z_1)
        # the buckets, natural logs: k stored entries, then the tail in lane K, then empty lanes
        lpk = tl.load(lp_ptr + row * K + lanes, mask=kin, other=float("-inf"))
        if RENORM:
            lq = tl.where(kin, (top2 - lse_top) * rm.LN2, float("-inf"))
            lp = tl.where(kin, _log_softmax(lpk), float("-inf"))
        else:
            lq = tl.where(kin, (top2 - lse) * rm.LN2, tl.where(lanes == K, (lse_r - lse) * rm.LN2, float("-inf")))
            lp = tl.where(kin, lpk, tl.where(lanes == K, tl.load(tail_ptr + row), float("-inf")))
        if TAID:  # softmax((1 - t) log q + t log p); a bucket empty on either side stays empty inside (0, 1)
            inner = tl.where((lq == float("-inf")) | (lp == float("-inf")), float("-inf"),
                             (1.0 - tau) * lq + tau * lp)
            lp = _log_softmax(tl.where(tau >= 1.0, lp, tl.where(tau <= 0.0, lq, inner)))
        empty = (lq == float("-inf")) & (lp == float("-inf"))
        lq = tl.where(empty, EMPTY, lq)
        lp = tl.where(empty, EMPTY, lp)
        q = tl.exp(lq)
        p = tl.exp(lp)
        if DIV == rm.FORWARD_KL:
            loss_v = tl.where(p > 0.0, p * (lp - lq), 0.0)
            grad_b = q * tl.sum(p, axis=0) - p
        else:
            if DIV == rm.REVERSE_KL:
                qg = tl.where(q > 0.0, q * (lq - lp), 0.0)
                loss_v = qg
            else:
                loss_v, qg = rm.terms(q, p, lq, lp, knobs)
            grad_b = qg - q * tl.sum(qg, axis=0)
        kd = tl.where(kd_on, tl.sum(loss_v, axis=0), 0.0)
        if CE:
            ce = tl.where(ce_on, rm.LN2 * lse_1 - z_lab, 0.0)
        ce_w = tl.where(ce_on, ce_weight, 0.0)
        # selected, not multiplied: off the mask the loss may be inf (a filler position), its gradient NaN
        grad_b = tl.where(kd_on, kd_scale * grad_b, 0.0)
        tail_g = tl.sum(tl.where(lanes == K, grad_b, 0.0), axis=0)
        lse_r_safe = tl.where(lse_r > float("-inf"), lse_r, 0.0)
        # pass C
        for i in range(0, n_full):
            _grad_block(s_row, g_row, i * BLOCK, V, scale, lse_r_safe, tail_g, label, lse_1, ce_w, CE, CE_SEPARATE,
                        False, BLOCK)
        if n_full * BLOCK < V:
            _grad_block(s_row, g_row, n_full * BLOCK, V, scale, lse_r_safe, tail_g, label, lse_1, ce_w, CE,
                        CE_SEPARATE, True, BLOCK)
        g_top = grad_b
        if CE:
            x1 = top2
            if CE_SEPARATE:
                x1 = top2 * (rm.LOG2E / scale)
            g_top += ce_w * (tl.exp2(x1 - lse_1) - tl.where(idv == label, 1.0, 0.0))
        tl.debug_barrier()  # every thread's pass-C stores land before the stored entries are overwritten
        tl.store(g_row + idv, g_top.to(g_row.dtype.element_ty), mask=kin)
    else:
        rm.zero_row(g_row, V, BLOCK)
    tl.store(kd_ptr + row, kd)
    tl.store(ce_ptr + row, ce)


def _sorted_rows(ids: Tensor, logprobs: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's ids ascending (int32) with the log-probs moved along: [N, K] contiguous."""
    k = ids.shape[-1]
    ids, order = ids.reshape(-1, k).sort(dim=-1)
    return ids.to(torch.int32).contiguous(), logprobs.reshape(-1, k).gather(-1, order).float().contiguous()


def sparse_rows_launch(student: Tensor, grad: Tensor, ids: Tensor, logprobs: Tensor, tail_logprob: Tensor,
                       mask: Tensor, labels: Tensor, spec: DivergenceSpec, tail: str, kd_weight: float,
                       ce_weight: float, config: dict) -> tuple[Launch, Tensor, Tensor]:
    """The kernel on `_as_rows` logits (``grad`` laid out like them, or ``student`` itself), each row's ids sorted
    ascending (`_sorted_rows`), flat mask / labels / tail: (launch, kd rows [N] fp32, ce rows [N] fp32), as
    kd.ops.dense_kl.rows_launch (kd.ops.aot compiles the same launches ahead of time)."""
    n, device = mask.numel(), student.device
    kd = torch.empty(n, dtype=torch.float32, device=device)
    ce = torch.empty_like(kd)
    tau, taid = tau_tensor(spec, student)
    use_ce = ce_weight > 0.0
    log_b, log_1mb = spec.log_beta
    k = ids.shape[-1]
    args = (*_rows(student), *_rows(grad), ids, logprobs, tail_logprob, mask.contiguous().view(torch.uint8),
            labels.contiguous(), kd, ce, tau, student.shape[-1], k, rm.LOG2E.value / spec.temperature,
            kd_weight / spec.temperature, ce_weight, spec.beta, max(log_b, -1e30), max(log_1mb, -1e30), spec.alpha)
    constexprs = dict(DIV=rm.CODES[spec.name], TAID=taid, CE=use_ce, CE_SEPARATE=use_ce and spec.temperature != 1.0,
                      RENORM=tail == "renormalize", KB=triton.next_power_of_2(k + 1))
    return Launch(_sparse_rows_kernel, (n,), args, {**constexprs, **config}), kd, ce


def sparse_pass_triton(student: Tensor, ids: Tensor, logprobs: Tensor, tail_logprob: Tensor, mask: Tensor,
                       labels: Tensor, spec: DivergenceSpec, tail: str, kd_weight: float, ce_weight: float,
                       grad: Tensor) -> tuple[Tensor, Tensor]:
    """`kd.ops.sparse_torch.sparse_pass` on the GPU: one launch, one program per row (same contract; ``grad`` may
    be ``student`` itself: in place)."""
    student = _as_rows(student)
    ids, logprobs = _sorted_rows(ids, logprobs)
    launch, kd, ce = sparse_rows_launch(student, grad, ids, logprobs, tail_logprob.reshape(-1).float().contiguous(),
                                        mask.reshape(-1), labels.reshape(-1), spec, tail, kd_weight, ce_weight,
                                        launch_config(student.device))
    if mask.numel():
        launch()
    return kd, ce


def triton_sparse_chunk_step(logits: Tensor, ids: Tensor, logprobs: Tensor, tail_logprob: Tensor, mask: Tensor,
                             labels: Tensor, spec: DivergenceSpec, tail: str, kd_weight: float,
                             ce_weight: float) -> tuple[Tensor, Tensor]:
    """The chunk step of kd.ops.sparse_fused on the kernel: the gradient overwrites the logit block in place."""
    if logits.stride(-1) != 1:
        raise ValueError("logit blocks must have unit stride along the vocabulary")
    return sparse_pass_triton(logits, ids, logprobs, tail_logprob, mask, labels, spec, tail, kd_weight, ce_weight,
                              logits)
