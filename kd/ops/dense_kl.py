"""The row kernel: loss and gradient of one row of student and teacher logits per program, in one launch.

    loss[n] = D(p_n, q_n) for mask[n], else 0        q = softmax(z_s / T), p = softmax(z_t / T) (or the TAID target)
    g[n]    = kd_weight / T * dD/ds[n] + ce_weight * (softmax(z_s[n]) - onehot(label[n]))   (kd.ops.row_math)

Each program runs pass A (statistics; for forward/reverse KL and TAID also the loss, online), pass B for jsd, tvd and
the skews (the loss and the row scalar c need the final normalizers; it runs backwards through the row so its first
blocks come from L2), then pass C, which writes the gradient in the student dtype to ``g``: a separate buffer for the
dense path (kd.ops.dense: the only N x V memory besides the inputs), or the student block itself for the fused-linear
path (in place). The weights already hold the loss scale, so nothing is left for backward. Inputs may be
bf16/fp16/fp32; every reduction is fp32.

The eager spec is kd.losses.functional (tests/kernels/test_dense_kl.py, test_dense_loss.py).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from kd.ops.spec import DivergenceSpec, row_aligned_empty
from kd.ops import row_math as rm

# Launch parameters on a GPU: a starting point for H100/H200 (tools/bench_kernels.py --block/--warps sweeps them).
# Under TRITON_INTERPRET=1 (CPU tests) small blocks keep the interpreter fast and exercise the block loop and tail.
TUNING = {"block": 2048, "num_warps": 8, "interpret_block": 512}


def launch_config(device: torch.device) -> dict:
    """``BLOCK`` (and ``num_warps`` on a GPU) for a kernel launch on ``device``."""
    if device.type == "cuda":
        return {"BLOCK": TUNING["block"], "num_warps": TUNING["num_warps"]}
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"the Triton kernels need CUDA tensors (got {device}); use backend='torch' on this device, "
                         "or set TRITON_INTERPRET=1 to run the kernels in Triton's interpreter (tests)")
    return {"BLOCK": TUNING["interpret_block"]}


def tau_tensor(spec: DivergenceSpec, like: Tensor) -> tuple[Tensor, bool]:
    """TAID's t as a 1-element fp32 tensor on the device (read by the kernel: a tensor t costs no host sync)."""
    if spec.taid_t is None:
        return torch.zeros(1, dtype=torch.float32, device=like.device), False
    if isinstance(spec.taid_t, Tensor):
        return spec.taid_t.detach().to(device=like.device, dtype=torch.float32).reshape(1), True
    return torch.full((1,), float(spec.taid_t), dtype=torch.float32, device=like.device), True


def _as_rows(x: Tensor) -> Tensor:
    """2-D or 3-D with unit stride along V. A [B, L, V] view (the trainer's shifted, vocab-cut logits) is kept as it
    is: flattening it to [B * L, V] would copy all N x V logits. Other ranks are flattened."""
    if x.dim() not in (2, 3):
        x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


def _rows(x: Tensor) -> tuple[Tensor, int, int, int]:
    """Kernel arguments locating row r = b * L + l of an `_as_rows` tensor: (x, L, stride_b, stride_l)."""
    if x.dim() == 3:
        return x, max(x.shape[1], 1), x.stride(0), x.stride(1)
    return x, max(x.shape[0], 1), 0, x.stride(0)


@triton.jit
def _row_offset(row, L, stride_b, stride_l):
    b = row // L
    return b * stride_b + (row - b * L) * stride_l


@triton.jit
def _rows_kernel(s_ptr, s_l, s_sb, s_sl, t_ptr, t_l, t_sb, t_sl, g_ptr, g_l, g_sb, g_sl, mask_ptr, label_ptr, kd_ptr,
                 ce_ptr, tau_ptr, V, scale, kd_scale, ce_weight, beta, log_b, log_1mb, alpha, DIV: tl.constexpr,
                 TAID: tl.constexpr, SCALAR_PASS: tl.constexpr, CE: tl.constexpr, CE_SEPARATE: tl.constexpr,
                 GRAD_REVERSE: tl.constexpr, BLOCK: tl.constexpr):
    """One row per program: pass A (+ B), then pass C writes the gradient to g (which may be s itself: in place)."""
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + _row_offset(row, s_l, s_sb, s_sl)
    t_row = t_ptr + _row_offset(row, t_l, t_sb, t_sl)
    g_row = g_ptr + _row_offset(row, g_l, g_sb, g_sl)
    kd_on = tl.load(mask_ptr + row) != 0
    active = kd_on
    label = tl.load(label_ptr + row)
    ce_on = label != -100  # kd.labels.IGNORE_INDEX (a literal: Triton kernels take no Python globals)
    if CE:
        active = active | ce_on
    kd = 0.0
    ce = 0.0
    if active:  # ignored rows (padding, prompts) cost one store of zeros
        tau = 0.0
        if TAID:
            tau = tl.load(tau_ptr)
        knobs = rm.Knobs(scale, tau, beta, log_b, log_1mb, alpha, DIV, TAID, CE, CE_SEPARATE)
        lse_s, lse_t, loss, lse_1, z_lab = rm.row_stats(s_row, t_row, V, knobs, label, BLOCK)
        c = loss
        if SCALAR_PASS:
            loss, c = rm.row_scalars(s_row, t_row, V, knobs, lse_s, lse_t, BLOCK)
        kd = tl.where(kd_on, loss, 0.0)
        if CE:
            ce = tl.where(ce_on, rm.LN2 * lse_1 - z_lab, 0.0)
        rows = rm.RowState(lse_s, lse_t, c, lse_1, label, kd_on, kd_scale, ce_on, ce_weight)
        rm.row_grad(s_row, t_row, g_row, V, knobs, rows, GRAD_REVERSE, BLOCK)
    else:
        rm.zero_row(g_row, V, BLOCK)
    tl.store(kd_ptr + row, kd)
    tl.store(ce_ptr + row, ce)


@dataclass(frozen=True)
class Launch:
    """One kernel launch: the @triton.jit kernel, its grid and its arguments (constexprs and launch config in
    ``kwargs``). The autograd functions build these with the ``*_launch`` helpers and run them; `kd.ops.aot` builds
    the same ones on meta tensors and compiles them ahead of time for a GPU target, so the variants it checks are the
    ones that run."""

    kernel: Any
    grid: tuple[int, ...]
    args: tuple
    kwargs: dict

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.kwargs)


def rows_launch(student: Tensor, teacher: Tensor, grad: Tensor, mask: Tensor, labels: Tensor, spec: DivergenceSpec,
                kd_weight: float, ce_weight: float, config: dict) -> tuple[Launch, Tensor, Tensor]:
    """The row kernel on `_as_rows` logits (``grad`` laid out like them, or ``student`` itself to work in place), a
    flat bool mask and flat labels: (launch, kd rows [N] fp32, ce rows [N] fp32). The gradient written is that of
    ``kd_weight * sum(mask * kd) + ce_weight * sum(valid * ce)`` (kd_weight, ce_weight include any loss scale)."""
    n, device = mask.numel(), student.device
    tau, taid = tau_tensor(spec, student)
    kd = torch.empty(n, dtype=torch.float32, device=device)
    ce = torch.empty_like(kd)
    use_ce = ce_weight > 0.0
    scalar_pass = spec.name in rm.SCALAR_PASS
    log_b, log_1mb = spec.log_beta
    args = (*_rows(student), *_rows(teacher), *_rows(grad), mask.contiguous().view(torch.uint8), labels.contiguous(),
            kd, ce, tau, student.shape[-1], rm.LOG2E.value / spec.temperature, kd_weight / spec.temperature,
            ce_weight, spec.beta, max(log_b, -1e30), max(log_1mb, -1e30), spec.alpha)
    constexprs = dict(DIV=rm.CODES[spec.name], TAID=taid, SCALAR_PASS=scalar_pass, CE=use_ce,
                      CE_SEPARATE=use_ce and spec.temperature != 1.0,
                      # each pass runs opposite to the one before it, starting where L2 is warm
                      GRAD_REVERSE=not scalar_pass)
    return Launch(_rows_kernel, (n,), args, {**constexprs, **config}), kd, ce


def grad_buffer(student: Tensor) -> tuple[Tensor, Tensor]:
    """(gradient ``[..., V]`` shaped like ``student``, its flat storage). Rows are padded to a multiple of ROW_ALIGN
    elements: with V not a multiple of 16 a dense buffer's rows would start unaligned and every store be scalar."""
    return row_aligned_empty(tuple(student.shape), student.dtype, student.device)


def dense_pass_triton(student: Tensor, teacher: Tensor, mask: Tensor, labels: Tensor, spec: DivergenceSpec,
                      kd_weight: float, ce_weight: float, grad: Tensor) -> tuple[Tensor, Tensor]:
    """`kd.ops.torch_path.dense_pass` on the GPU: one kernel launch, one program per row (same contract)."""
    launch, kd, ce = rows_launch(_as_rows(student), _as_rows(teacher), grad, mask.reshape(-1), labels.reshape(-1),
                                 spec, kd_weight, ce_weight, launch_config(student.device))
    if mask.numel():
        launch()
    return kd, ce
