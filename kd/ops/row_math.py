"""Triton building blocks shared by the dense and fused-linear kernels: one row of student and teacher logits.

A program owns one row and streams it in blocks of ``BLOCK`` vocabulary entries, in up to three passes:

A. statistics (online softmax, one read of both rows): ``lse_s``, ``lse_t`` (and ``lse_1``, the student's at T = 1,
   for the CE term when T != 1), and for forward/reverse KL the loss itself, accumulated online:
       KL(p || q) = sum_v p_v (t_v - s_v) - lse_t + lse_s,   sum_v p_v (t_v - s_v) = sum_v e^(t_v-m_t) (t_v - s_v) / Z_t
   with the running sum rescaled like Z_t whenever the running max m_t grows.
B. (jsd, tvd, skew_kl, skew_reverse_kl only) the loss and the row scalar ``c = sum_v q_v g_v``, which need the
   final log-normalizers: log m_v mixes p_v and q_v, so it cannot be accumulated online.
C. the gradient, written in the output dtype (possibly over the student row itself: the fused kernel works in place).

Every pass runs the V // BLOCK full blocks without a mask and only the last, partial block (if any) masked. Triton
vectorizes a load when it can prove 16-element runs of both the address and the mask: with ``mask=offs < V`` in every
block that needs V to be a multiple of 16, which the trainer's vocabulary cut (e.g. Qwen2.5's 151665) is not, and
then every load and store of the row is scalar. Unmasked full blocks keep 128-bit accesses for any V (given 16-aligned
rows: the callers pass row strides that are multiples of 16). Passes alternate direction to start where the previous
one ended (L2): A first to last block, B last to first, C either way (``REVERSE``); the partial block sits at the end
of the row, so a reverse pass takes it first and a forward pass last.

Notation: s = z_s / T, t = z_t / T, q = softmax(s), p = softmax(t) (for TAID, t is replaced by (1 - tau) s + tau t with
s detached). Each divergence L(q) has, with g_v = dL/dq_v and c = sum_v q_v g_v,

    dL/ds_u = q_u (g_u - c)                (softmax Jacobian)          dL/dz_s = dL/ds / T

    forward_kl       L = sum p (log p - log q)                         dL/ds = q - p
    reverse_kl       L = sum q (log q - log p)        q g = q (log q - log p),        c = L
    jsd(beta)        m = beta p + (1-beta) q          q g = (1-beta) q (log q - log m),  c = (1-beta) KL(q || m)
                     L = beta KL(p || m) + (1-beta) KL(q || m)   (the d log m terms sum to a constant and cancel)
    tvd              L = 1/2 sum |p - q|              q g = q sign(q - p) / 2   (sign(0) = 0, as torch.abs)
    skew_kl(alpha)   m = alpha p + (1-alpha) q,  L = KL(p || m),     q g = -(1-alpha) p q / m
    skew_reverse_kl  m = alpha q + (1-alpha) p,  L = KL(q || m),     q g = q (log q - log m) - alpha q^2 / m
                     (constants in g cancel in g - c and are dropped)

so dL/ds = (q g) - q c for all but forward_kl. The hard-label CE adds w_ce (softmax(z_s) - onehot(label)).
Exponentials run as exp2 on log2-scaled logits (scale = log2(e) / T): one multiply per element, the fast ex2
instruction. Terms with a zero weight (p_v = 0 in p log p, lanes past V) are selected to 0, never multiplied, so
-inf logits give no NaN. Every reduction is fp32 whatever the input dtype.
"""
from __future__ import annotations

from typing import NamedTuple

import triton
import triton.language as tl

# Globals read inside @triton.jit functions must be constexpr.
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)

FORWARD_KL: tl.constexpr = tl.constexpr(0)
REVERSE_KL: tl.constexpr = tl.constexpr(1)
JSD: tl.constexpr = tl.constexpr(2)
TVD: tl.constexpr = tl.constexpr(3)
SKEW_KL: tl.constexpr = tl.constexpr(4)
SKEW_REVERSE_KL: tl.constexpr = tl.constexpr(5)

# Recipe name -> kernel code; the divergences that need pass B.
CODES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2, "tvd": 3, "skew_kl": 4, "skew_reverse_kl": 5}
SCALAR_PASS = {"jsd", "tvd", "skew_kl", "skew_reverse_kl"}


class Knobs(NamedTuple):
    """What a launch fixes for every row: runtime scalars, then the constexprs that select the code (Triton
    specializes a NamedTuple's constexpr fields like constexpr arguments). log_b, log_1mb: log(beta), log(1 - beta),
    taken in float64 on the host (DivergenceSpec.log_beta)."""

    scale: tl.tensor  # log2(e) / T
    tau: tl.tensor  # TAID's t (0 when not TAID)
    beta: tl.tensor
    log_b: tl.tensor
    log_1mb: tl.tensor
    alpha: tl.tensor
    DIV: tl.constexpr
    TAID: tl.constexpr
    CE: tl.constexpr  # the hard-label CE term is on
    CE_SEPARATE: tl.constexpr  # CE needs its own T = 1 normalizer (T != 1)


class RowState(NamedTuple):
    """One row's scalars after passes A and B, and its gradient weights (what pass C needs)."""

    lse_s: tl.tensor  # log2-domain log-normalizers
    lse_t: tl.tensor
    c: tl.tensor  # sum_v q_v g_v
    lse_1: tl.tensor  # the student's at T = 1 (CE)
    label: tl.tensor
    kd_on: tl.tensor
    kd_scale: tl.tensor  # includes 1/T
    ce_on: tl.tensor
    ce_scale: tl.tensor


@triton.jit
def load_block(s_row, t_row, offs, V, k: Knobs, MASKED: tl.constexpr):
    """One block of both rows as fp32: raw student logits z_s and log2-scaled s2 = z_s log2(e) / T, t2 (the TAID
    mix when TAID). MASKED (the row's last, partial block only): lanes past V read nothing and are -inf in s2 and t2.
    A full block is loaded without a mask, so its loads vectorize whatever V is (module docstring)."""
    if MASKED:
        valid = offs < V
        zs = tl.load(s_row + offs, mask=valid, other=0.0).to(tl.float32)
        zt = tl.load(t_row + offs, mask=valid, other=0.0).to(tl.float32)
    else:
        zs = tl.load(s_row + offs).to(tl.float32)
        zt = tl.load(t_row + offs).to(tl.float32)
    s2 = zs * k.scale
    t2 = zt * k.scale
    if k.TAID:  # the ends keep one side untouched: 0 * (-inf) would be NaN at a masked teacher entry
        tau = k.tau
        t2 = tl.where(tau >= 1.0, t2, tl.where(tau <= 0.0, s2, (1.0 - tau) * s2 + tau * t2))
    if MASKED:
        s2 = tl.where(valid, s2, float("-inf"))
        t2 = tl.where(valid, t2, float("-inf"))
    return zs, s2, t2


@triton.jit
def _stats_block(m_s, m_t, m_1, z_s, z_t, z_1, acc, z_lab, s_row, t_row, offs, V, k: Knobs, label,
                 MASKED: tl.constexpr):
    """One block of pass A: the running maxima / sums (m, z), the online KL sum and z_s[label], updated."""
    zs, s2, t2 = load_block(s_row, t_row, offs, V, k, MASKED)
    new_s = tl.maximum(m_s, tl.max(s2, axis=0))
    new_t = tl.maximum(m_t, tl.max(t2, axis=0))
    rescale_s = tl.exp2(m_s - new_s)
    rescale_t = tl.exp2(m_t - new_t)
    e_s = tl.exp2(s2 - new_s)
    e_t = tl.exp2(t2 - new_t)
    z_s = z_s * rescale_s + tl.sum(e_s, axis=0)
    z_t = z_t * rescale_t + tl.sum(e_t, axis=0)
    if k.DIV == FORWARD_KL:
        acc = acc * rescale_t + tl.sum(tl.where(e_t > 0.0, e_t * (t2 - s2), 0.0), axis=0)
    if k.DIV == REVERSE_KL:
        acc = acc * rescale_s + tl.sum(tl.where(e_s > 0.0, e_s * (s2 - t2), 0.0), axis=0)
    if k.CE:
        z_lab += tl.sum(tl.where(offs == label, zs, 0.0), axis=0)
        if k.CE_SEPARATE:
            x1 = zs * LOG2E
            if MASKED:
                x1 = tl.where(offs < V, x1, float("-inf"))
            new_1 = tl.maximum(m_1, tl.max(x1, axis=0))
            z_1 = z_1 * tl.exp2(m_1 - new_1) + tl.sum(tl.exp2(x1 - new_1), axis=0)
            m_1 = new_1
    return new_s, new_t, m_1, z_s, z_t, z_1, acc, z_lab


@triton.jit
def row_stats(s_row, t_row, V, k: Knobs, label, BLOCK: tl.constexpr):
    """Pass A, first to last block. Returns (lse2_s, lse2_t, loss, lse2_1, z_label): log2-domain log-normalizers,
    the natural-log loss for forward/reverse KL (0 otherwise), the T = 1 student normalizer (== lse2_s unless
    CE_SEPARATE) and z_s[label]."""
    # fp32 scalars from the start (the partial block's `if` needs the same types on both sides); -1e30, a finite
    # sentinel: (-inf) - (-inf) would be NaN on a row that starts with masked entries
    m_s = tl.full((), -1e30, tl.float32)
    m_t = m_s
    m_1 = m_s
    z_s = tl.zeros((), tl.float32)
    z_t = z_s
    z_1 = z_s
    acc = z_s
    z_lab = z_s
    n_full = V // BLOCK
    for i in range(0, n_full):
        m_s, m_t, m_1, z_s, z_t, z_1, acc, z_lab = _stats_block(
            m_s, m_t, m_1, z_s, z_t, z_1, acc, z_lab, s_row, t_row, i * BLOCK + tl.arange(0, BLOCK), V, k, label,
            False)
    if n_full * BLOCK < V:
        m_s, m_t, m_1, z_s, z_t, z_1, acc, z_lab = _stats_block(
            m_s, m_t, m_1, z_s, z_t, z_1, acc, z_lab, s_row, t_row, n_full * BLOCK + tl.arange(0, BLOCK), V, k,
            label, True)
    lse_s = m_s + tl.log2(z_s)
    lse_t = m_t + tl.log2(z_t)
    loss = 0.0
    if k.DIV == FORWARD_KL:
        loss = LN2 * (acc / z_t - lse_t + lse_s)
    if k.DIV == REVERSE_KL:
        loss = LN2 * (acc / z_s - lse_s + lse_t)
    lse_1 = lse_s
    if k.CE_SEPARATE:
        lse_1 = m_1 + tl.log2(z_1)
    return lse_s, lse_t, loss, lse_1, z_lab


@triton.jit
def probs(s2, t2, lse_s, lse_t):
    """q, p and their natural logs from log2-scaled logits and log2 normalizers."""
    lq2 = s2 - lse_s
    lp2 = t2 - lse_t
    return tl.exp2(lq2), tl.exp2(lp2), lq2 * LN2, lp2 * LN2


@triton.jit
def log_mix(a, log_a, b, log_b, w):
    """log(w a + (1 - w) b); the pure ends return log_a / log_b exactly."""
    return tl.where(w >= 1.0, log_a, tl.where(w <= 0.0, log_b, tl.log(w * a + (1.0 - w) * b)))


@triton.jit
def log_add_exp(a, b):
    """log(e^a + e^b), precise when the result is small: log1p(y) as log(u) * y / (u - 1), u = 1 + y (Goldberg's
    trick; Triton has no log1p), so jsd's log(m / q) near beta = 0 keeps fp32 precision."""
    hi = tl.maximum(a, b)
    y = tl.exp(tl.minimum(a, b) - hi)
    u = 1.0 + y
    return hi + tl.where(u == 1.0, y, tl.log(u) * (y / (u - 1.0)))


@triton.jit
def terms(q, p, lq, lp, k: Knobs):
    """Per-entry (loss term, q_v g_v) of the pass-B divergences (module docstring)."""
    if k.DIV == JSD:
        # d = log(m / q), e = log(m / p), each one logaddexp of x = log p - log q and the host's log weights:
        # precise near beta = 0 (d small) and beta = 1 (e small), as kd.losses.functional.jsd
        x = lp - lq
        d = log_add_exp(k.log_1mb, k.log_b + x)
        e = log_add_exp(k.log_b, k.log_1mb - x)
        qg = tl.where(q > 0.0, -(1.0 - k.beta) * q * d, 0.0)
        loss = tl.where(p > 0.0, -k.beta * p * e, 0.0) + qg
    elif k.DIV == TVD:
        loss = 0.5 * tl.abs(p - q)
        qg = q * tl.where(q > p, 0.5, tl.where(q < p, -0.5, 0.0))
    elif k.DIV == SKEW_KL:
        alpha = k.alpha
        m = alpha * p + (1.0 - alpha) * q
        loss = tl.where(p > 0.0, p * (lp - log_mix(p, lp, q, lq, alpha)), 0.0)
        qg = tl.where(m > 0.0, -(1.0 - alpha) * p * q / m, 0.0)
    else:  # SKEW_REVERSE_KL
        alpha = k.alpha
        m = alpha * q + (1.0 - alpha) * p
        loss = tl.where(q > 0.0, q * (lq - log_mix(q, lq, p, lp, alpha)), 0.0)
        qg = loss - tl.where(m > 0.0, alpha * q * q / m, 0.0)
    return loss, qg


@triton.jit
def _scalars_block(loss, c, s_row, t_row, offs, V, k: Knobs, lse_s, lse_t, MASKED: tl.constexpr):
    zs, s2, t2 = load_block(s_row, t_row, offs, V, k, MASKED)
    q, p, lq, lp = probs(s2, t2, lse_s, lse_t)
    l_v, qg = terms(q, p, lq, lp, k)
    return loss + tl.sum(l_v, axis=0), c + tl.sum(qg, axis=0)


@triton.jit
def row_scalars(s_row, t_row, V, k: Knobs, lse_s, lse_t, BLOCK: tl.constexpr):
    """Pass B, last block to first (so the first reads hit what pass A left in L2). Returns (loss, c)."""
    loss = tl.zeros((), tl.float32)
    c = loss
    n_full = V // BLOCK
    if n_full * BLOCK < V:
        loss, c = _scalars_block(loss, c, s_row, t_row, n_full * BLOCK + tl.arange(0, BLOCK), V, k, lse_s, lse_t,
                                 True)
    for i in range(0, n_full):
        loss, c = _scalars_block(loss, c, s_row, t_row, (n_full - 1 - i) * BLOCK + tl.arange(0, BLOCK), V, k,
                                 lse_s, lse_t, False)
    return loss, c


@triton.jit
def _grad_block(s_row, t_row, g_row, offs, V, k: Knobs, r: RowState, MASKED: tl.constexpr):
    """One block of pass C: the gradient of lanes ``offs``, stored to g_row (row_grad)."""
    zs, s2, t2 = load_block(s_row, t_row, offs, V, k, MASKED)
    q, p, lq, lp = probs(s2, t2, r.lse_s, r.lse_t)
    if k.DIV == FORWARD_KL:
        ds = q - p
    elif k.DIV == REVERSE_KL:
        ds = tl.where(q > 0.0, q * (lq - lp - r.c), 0.0)
    else:
        _, qg = terms(q, p, lq, lp, k)
        ds = qg - q * r.c
    g = tl.where(r.kd_on, r.kd_scale * ds, 0.0)
    if k.CE:
        sm = q
        if k.CE_SEPARATE:
            # from s2, not the raw logits: z_s need not stay live through the divergence terms (with it,
            # ptxas 13 spilled inside this loop for jsd on rows not 16-aligned: tools/kernel_report.py)
            sm = tl.exp2(s2 * (LOG2E / k.scale) - r.lse_1)
        g += tl.where(r.ce_on, r.ce_scale * (sm - tl.where(offs == r.label, 1.0, 0.0)), 0.0)
    if MASKED:
        tl.store(g_row + offs, g.to(g_row.dtype.element_ty), mask=offs < V)
    else:
        tl.store(g_row + offs, g.to(g_row.dtype.element_ty))


@triton.jit
def row_grad(s_row, t_row, g_row, V, k: Knobs, r: RowState, REVERSE: tl.constexpr, BLOCK: tl.constexpr):
    """Pass C: g = kd_scale * dL/ds (kd_scale includes 1/T) + ce_scale * (softmax(z_s) - onehot), stored to g_row;
    first to last block, or last to first when REVERSE (it then starts where a forward pass A ended).

    Rows switched off (kd_on / ce_on False) contribute exact zeros (selected, so NaN in their inputs cannot leak)."""
    n_full = V // BLOCK
    tail = n_full * BLOCK
    if REVERSE:
        if tail < V:
            _grad_block(s_row, t_row, g_row, tail + tl.arange(0, BLOCK), V, k, r, True)
        for i in range(0, n_full):
            _grad_block(s_row, t_row, g_row, (n_full - 1 - i) * BLOCK + tl.arange(0, BLOCK), V, k, r, False)
    else:
        for i in range(0, n_full):
            _grad_block(s_row, t_row, g_row, i * BLOCK + tl.arange(0, BLOCK), V, k, r, False)
        if tail < V:
            _grad_block(s_row, t_row, g_row, tail + tl.arange(0, BLOCK), V, k, r, True)


@triton.jit
def zero_row(g_row, V, BLOCK: tl.constexpr):
    """Write zeros over one row (the gradient of a row that carries no loss): full blocks unmasked, then the tail."""
    n_full = V // BLOCK
    zeros = tl.zeros([BLOCK], dtype=g_row.dtype.element_ty)
    for i in range(0, n_full):
        tl.store(g_row + i * BLOCK + tl.arange(0, BLOCK), zeros)
    offs = n_full * BLOCK + tl.arange(0, BLOCK)
    tl.store(g_row + offs, zeros, mask=offs < V)
