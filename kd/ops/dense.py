"""Dense losses in one pass: loss and d loss / d student logits together, while a block of logits is in cache.

    dense_loss(...)       -> FusedLossOutput: loss = kd_weight * sum(mask * D) + ce_weight * sum(valid * CE)
    dense_divergence(...) -> per-row D [N] (the general API: any per-row grad_output)

Forward runs one pass (kd.ops.torch_path.dense_pass on CPU, the row kernel kd.ops.dense_kl on CUDA) that writes the
gradient into one buffer shaped like the student logits, in their dtype (rows padded to 16 elements for the
kernel's 128-bit stores): the only N x V memory besides the inputs; nothing else is kept for backward.

The trainer backpropagates ``loss_sum * scale`` (scale = world / global loss tokens). `dense_loss` takes that scale
as ``grad_scale`` and stores the gradient already multiplied by it, so backward returns the buffer as it is. Any
other grad_output (fp16 loss scaling, a test, ``grad_scale=None``) rescales the buffer in place by
grad_output / grad_scale: one more pass over the gradient, on CUDA without a host sync. `dense_divergence` stores
the gradient at scale 1 and multiplies each row by its grad_output in backward.

The buffer is handed to autograd in backward and released by this node, so it is freed as soon as the student's
backward has consumed it; a second backward through the same graph (retain_graph) is refused with a clear error.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from kd.labels import IGNORE_INDEX
from kd.ops.spec import DivergenceSpec, FusedLossOutput
from kd.ops import torch_path

_TWICE = "kd's one-pass losses compute their gradient in forward and hand it over once: backward twice is not supported"


def _torch_buffer(student: Tensor) -> tuple[Tensor, Tensor]:
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    return grad, grad


def _backend(backend: str, rows: Optional[int]):
    """(pass, buffer) of a backend: the function that fills the gradient, the one that allocates it."""
    if backend == "triton":
        from kd.ops.dense_kl import dense_pass_triton, grad_buffer
        return dense_pass_triton, grad_buffer
    return functools.partial(torch_path.dense_pass, rows=rows), _torch_buffer


def rescale_(flat: Tensor, grad_output: Tensor, expected: float) -> None:
    """Multiply a gradient stored for grad_output == ``expected`` by grad_output / expected, in place. On CPU the
    check is free and an exact match costs nothing; on CUDA the multiply runs unconditionally (no host sync)."""
    if grad_output.device.type == "cpu":
        ratio = float(grad_output) / expected
        if ratio != 1.0:
            flat.mul_(ratio)
    else:
        flat.mul_((grad_output.float() / expected).to(flat.dtype))


class OnePassLoss(torch.autograd.Function):
    """``loss = kd_weight * sum(kd rows) + ce_weight * sum(ce rows)`` (plus the two sums, detached) whose gradient
    w.r.t. the student logits ``fill`` writes during forward; backward hands that buffer over.

    ``fill(grad, kd_factor, ce_factor) -> (kd_rows, ce_rows)`` fills ``grad`` with the gradient of
    ``kd_factor * sum(kd rows) + ce_factor * sum(ce rows)``; it closes over the teacher side (dense logits here, the
    stored top-k in kd.ops.sparse), which gets no gradient. ``buffer(student) -> (grad, flat)`` allocates the gradient
    (``flat``: the same memory as one tensor, for the in-place rescale)."""

    @staticmethod
    def forward(ctx, student: Tensor, fill, buffer, kd_weight: float, ce_weight: float, grad_scale: float):
        grad, flat = buffer(student)
        kd_rows, ce_rows = fill(grad, kd_weight * grad_scale, ce_weight * grad_scale)
        ctx.grad, ctx.flat, ctx.grad_scale = grad, flat, grad_scale
        kd_sum, ce_sum = kd_rows.sum(), ce_rows.sum()
        ctx.mark_non_differentiable(kd_sum, ce_sum)
        return kd_weight * kd_sum + ce_weight * ce_sum, kd_sum, ce_sum

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _kd: Tensor, _ce: Tensor):
        if ctx.grad is None:
            raise RuntimeError(_TWICE)
        grad, flat = ctx.grad, ctx.flat
        ctx.grad = ctx.flat = None  # the buffer now belongs to autograd alone
        rescale_(flat, grad_loss, ctx.grad_scale)
        return grad, None, None, None, None, None


def checked_scale(grad_scale: Optional[float]) -> float:
    scale = 1.0 if grad_scale is None else float(grad_scale)
    if not scale > 0:
        raise ValueError(f"grad_scale must be > 0, got {grad_scale}")
    return scale


class _DenseRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, mask: Tensor, spec: DivergenceSpec, backend: tuple):
        run, buffer = backend
        grad, _ = buffer(student)
        labels = torch.full(mask.shape, IGNORE_INDEX, dtype=torch.long, device=mask.device)
        kd_rows, _ = run(student, teacher, mask, labels, spec, 1.0, 0.0, grad)
        ctx.grad = grad
        return kd_rows

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        if ctx.grad is None:
            raise RuntimeError(_TWICE)
        grad, ctx.grad = ctx.grad, None
        grad.mul_(grad_out.reshape(grad.shape[:-1]).unsqueeze(-1).to(grad.dtype))
        return grad, None, None, None, None


def _rows_layout(x: Tensor) -> Tensor:
    """2-D or 3-D with unit stride along V; a [B, L, V] view (the trainer's shifted logits) is kept without a copy."""
    if x.dim() not in (2, 3):
        x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


def dense_loss_rows(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, labels: Tensor,
                    spec: DivergenceSpec, kd_weight: float, ce_weight: float, grad_scale: Optional[float],
                    backend: str, rows: Optional[int] = None) -> FusedLossOutput:
    """`kd.ops.dense_loss` once the backend is known (arguments there)."""
    student, teacher = _rows_layout(student_logits), _rows_layout(teacher_logits.detach())
    mask, labels = mask.reshape(-1), labels.reshape(-1)
    run, buffer = _backend(backend, rows)

    def fill(grad: Tensor, kd_factor: float, ce_factor: float):
        return run(student, teacher, mask, labels, spec, kd_factor, ce_factor, grad)

    loss, kd_sum, ce_sum = OnePassLoss.apply(student, fill, buffer, float(kd_weight), float(ce_weight),
                                             checked_scale(grad_scale))
    return FusedLossOutput(loss=loss, kd_sum=kd_sum, ce_sum=ce_sum, num_tokens=mask.sum())


def dense_divergence_rows(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, spec: DivergenceSpec,
                          backend: str, rows: Optional[int] = None) -> Tensor:
    """`kd.ops.dense_divergence` once the backend is known: per-row loss with the shape of ``mask``."""
    student, teacher = _rows_layout(student_logits), _rows_layout(teacher_logits.detach())
    return _DenseRows.apply(student, teacher, mask.reshape(-1), spec, _backend(backend, rows)).view(mask.shape)
