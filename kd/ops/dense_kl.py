"""Dense divergence kernel: per-row divergence of materialized student and teacher logits, one row per program.

    loss[n] = D(p_n, q_n) for mask[n], else 0        q = softmax(z_s / T), p = softmax(z_t / T) (or the TAID target)
    dloss/dz_s[n] = grad_output[n] / T * dD/ds[n]     (formulas in kd.ops.row_math)

Forward reads both rows once (forward/reverse KL, TAID: the loss is accumulated online with the log-normalizers) or
twice (jsd, tvd, skew: the loss needs the final normalizers; the second read runs backwards through the row so its
first blocks come from L2) and saves three fp32 numbers per row (lse_s, lse_t, c). Backward reads both rows once
and writes the gradient in the student dtype, scaled by grad_output: no N x V buffer besides the gradient itself,
and grad_output != 1 costs nothing. Inputs may be bf16/fp16/fp32; every reduction is fp32.

The eager spec is `kd.losses.chunked.divergence_rows` (kd.losses.functional's divergences).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from kd.losses.chunked import ROW_ALIGN, DivergenceSpec
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
def _dense_fwd_kernel(s_ptr, s_l, s_sb, s_sl, t_ptr, t_l, t_sb, t_sl, mask_ptr, loss_ptr, stats_ptr, tau_ptr, V, scale,
                      beta, alpha, DIV: tl.constexpr, TAID: tl.constexpr, SCALAR_PASS: tl.constexpr,
                      BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + _row_offset(row, s_l, s_sb, s_sl)
    t_row = t_ptr + _row_offset(row, t_l, t_sb, t_sl)
    tau = 0.0
    if TAID:
        tau = tl.load(tau_ptr)
    loss = 0.0
    lse_s = 0.0
    lse_t = 0.0
    c = 0.0
    if tl.load(mask_ptr + row) != 0:  # ignored rows (padding, prompts) cost nothing
        lse_s, lse_t, loss, _, _ = rm.row_stats(s_row, t_row, V, scale, tau, -100, DIV, TAID, False, False, BLOCK)
        c = loss
        if SCALAR_PASS:
            loss, c = rm.row_scalars(s_row, t_row, V, scale, tau, lse_s, lse_t, beta, alpha, DIV, TAID, BLOCK)
    tl.store(loss_ptr + row, loss)
    tl.store(stats_ptr + row * 3, lse_s)
    tl.store(stats_ptr + row * 3 + 1, lse_t)
    tl.store(stats_ptr + row * 3 + 2, c)


@triton.jit
def _dense_bwd_kernel(s_ptr, s_l, s_sb, s_sl, t_ptr, t_l, t_sb, t_sl, g_ptr, g_l, g_sb, g_sl, mask_ptr, go_ptr,
                      stats_ptr, tau_ptr, V, scale, inv_t, beta, alpha, DIV: tl.constexpr, TAID: tl.constexpr,
                      BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    g_row = g_ptr + _row_offset(row, g_l, g_sb, g_sl)
    on = tl.load(mask_ptr + row) != 0
    if on:
        tau = 0.0
        if TAID:
            tau = tl.load(tau_ptr)
        lse_s = tl.load(stats_ptr + row * 3)
        lse_t = tl.load(stats_ptr + row * 3 + 1)
        c = tl.load(stats_ptr + row * 3 + 2)
        kd_scale = tl.load(go_ptr + row).to(tl.float32) * inv_t
        s_row = s_ptr + _row_offset(row, s_l, s_sb, s_sl)
        t_row = t_ptr + _row_offset(row, t_l, t_sb, t_sl)
        rm.row_grad(s_row, t_row, g_row, V, scale, tau, lse_s, lse_t, c, lse_s, -100, on, kd_scale, on, 0.0, beta,
                    alpha, DIV, TAID, False, False, False, BLOCK)
    else:
        rm.zero_row(g_row, V, BLOCK)


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


def forward_launch(student: Tensor, teacher: Tensor, mask_u8: Tensor, tau: Tensor, taid: bool, spec: DivergenceSpec,
                   config: dict) -> tuple[Launch, Tensor, Tensor]:
    """The forward kernel on `_as_rows` logits and a flat uint8 mask: (launch, loss [N] fp32, stats [N, 3] fp32)."""
    n, device = mask_u8.numel(), student.device
    loss = torch.empty(n, dtype=torch.float32, device=device)
    stats = torch.empty(n, 3, dtype=torch.float32, device=device)
    args = (*_rows(student), *_rows(teacher), mask_u8, loss, stats, tau, student.shape[-1],
            rm.LOG2E.value / spec.temperature, spec.beta, spec.alpha)
    constexprs = dict(DIV=rm.CODES[spec.name], TAID=taid, SCALAR_PASS=spec.name in rm.SCALAR_PASS)
    return Launch(_dense_fwd_kernel, (n,), args, {**constexprs, **config}), loss, stats


def backward_launch(student: Tensor, teacher: Tensor, mask_u8: Tensor, tau: Tensor, taid: bool, stats: Tensor,
                    grad_out: Tensor, spec: DivergenceSpec, config: dict) -> tuple[Launch, Tensor]:
    """The backward kernel (inputs as saved by forward, ``grad_out`` [N]): (launch, gradient in the student dtype).

    The gradient is a ``[..., V]`` view of a buffer whose rows are padded to a multiple of ROW_ALIGN elements: with V
    not a multiple of 16 a dense buffer's rows would start unaligned and every store would be scalar."""
    width = -(-student.shape[-1] // ROW_ALIGN) * ROW_ALIGN
    grad = torch.empty(*student.shape[:-1], width, dtype=student.dtype,
                       device=student.device)[..., :student.shape[-1]]
    args = (*_rows(student), *_rows(teacher), *_rows(grad), mask_u8, grad_out.contiguous(), stats, tau,
            student.shape[-1], rm.LOG2E.value / spec.temperature, 1.0 / spec.temperature, spec.beta, spec.alpha)
    constexprs = dict(DIV=rm.CODES[spec.name], TAID=taid)
    return Launch(_dense_bwd_kernel, (mask_u8.numel(),), args, {**constexprs, **config}), grad


class _DenseDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, mask: Tensor, spec: DivergenceSpec) -> Tensor:
        tau, taid = tau_tensor(spec, student)
        mask_u8 = mask.contiguous().view(torch.uint8)
        launch, loss, stats = forward_launch(student, teacher, mask_u8, tau, taid, spec, launch_config(student.device))
        if mask_u8.numel():
            launch()
        ctx.save_for_backward(student, teacher, mask_u8, stats, tau)
        ctx.spec, ctx.taid = spec, taid
        return loss

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        student, teacher, mask_u8, stats, tau = ctx.saved_tensors
        launch, grad = backward_launch(student, teacher, mask_u8, tau, ctx.taid, stats, grad_out, ctx.spec,
                                       launch_config(student.device))
        if mask_u8.numel():
            launch()
        return grad, None, None, None


def dense_divergence_triton(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor,
                            spec: DivergenceSpec) -> Tensor:
    """Per-row divergence ``[...]`` (fp32, 0 where ``mask`` is False) of ``[..., V]`` logits, by the Triton kernels.

    Autograd reaches ``student_logits`` only.
    """
    student, teacher = _as_rows(student_logits), _as_rows(teacher_logits.detach())
    return _DenseDivergence.apply(student, teacher, mask.reshape(-1), spec).view(mask.shape)
