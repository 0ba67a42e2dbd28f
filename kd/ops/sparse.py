"""Sparse-target losses in one pass: a student against a stored top-k teacher, loss and gradient together.

    sparse_loss_rows(...) -> FusedLossOutput: loss = kd_weight * sum(mask * D) + ce_weight * sum(valid * CE)

D runs over the K + 1 buckets of `kd.losses.functional.sparse_buckets` (the k stored ids and the tail), or the k ids
renormalized with ``tail="renormalize"``; the closed forms are in kd.ops.sparse_torch's docstring. Forward runs one
pass (kd.ops.sparse_torch.sparse_pass on CPU, the row kernel kd.ops.sparse_kl on CUDA) that writes the gradient into
one buffer shaped like the student logits, in their dtype, at the scale backward will bring (``grad_scale``), through
kd.ops.dense.OnePassLoss, the autograd node dense teachers use (backward hands the buffer over, rescaled if
grad_output differs).
"""
from __future__ import annotations

import functools
from typing import Optional

from torch import Tensor

from kd.ops.dense import OnePassLoss, _rows_layout, _torch_buffer, checked_scale
from kd.ops.spec import DivergenceSpec, FusedLossOutput
from kd.ops import sparse_torch

# How the tail mass is treated: kept as one more bucket, or dropped with both sides renormalized over the k ids.
SPARSE_TAILS = ("bucket", "renormalize")


def check_tail(tail: str) -> str:
    if tail not in SPARSE_TAILS:
        raise ValueError(f"tail must be one of {', '.join(SPARSE_TAILS)}, got {tail!r}")
    return tail


def _backend(backend: str, rows: Optional[int]):
    """(pass, buffer) of a backend, as kd.ops.dense._backend."""
    if backend == "triton":
        from kd.ops.dense_kl import grad_buffer
        from kd.ops.sparse_kl import sparse_pass_triton
        return sparse_pass_triton, grad_buffer
    return functools.partial(sparse_torch.sparse_pass, rows=rows), _torch_buffer


def sparse_layout(student_logits: Tensor, ids: Tensor, logprobs: Tensor, tail_logprob: Tensor):
    """Student logits as 2-D/3-D rows with unit stride along V (a [B, L, V] view is kept), the sparse tensors in the
    same leading shape, ids long and the log-probs fp32 (detached)."""
    student = _rows_layout(student_logits)
    lead = student.shape[:-1]
    k = ids.shape[-1]
    return (student, ids.reshape(*lead, k).long(), logprobs.detach().reshape(*lead, k).float(),
            tail_logprob.detach().reshape(lead).float())


def sparse_loss_rows(student_logits: Tensor, ids: Tensor, logprobs: Tensor, tail_logprob: Tensor, mask: Tensor,
                     labels: Tensor, spec: DivergenceSpec, tail: str, kd_weight: float, ce_weight: float,
                     grad_scale: Optional[float], backend: str, rows: Optional[int] = None) -> FusedLossOutput:
    """`kd.ops.sparse_loss` once the backend is known (arguments there)."""
    student, ids, logprobs, tail_logprob = sparse_layout(student_logits, ids, logprobs, tail_logprob)
    mask, labels, tail = mask.reshape(-1), labels.reshape(-1), check_tail(tail)
    run, buffer = _backend(backend, rows)

    def fill(grad: Tensor, kd_factor: float, ce_factor: float):
        return run(student, ids, logprobs, tail_logprob, mask, labels, spec, tail, kd_factor, ce_factor, grad)

    loss, kd_sum, ce_sum = OnePassLoss.apply(student, fill, buffer, float(kd_weight), float(ce_weight),
                                             checked_scale(grad_scale))
    return FusedLossOutput(loss=loss, kd_sum=kd_sum, ce_sum=ce_sum, num_tokens=mask.sum())
