"""The eager spec applied a block of rows at a time: the reference of the kd.ops paths, and ``kernel: eager`` on the
fused-linear path.

- `divergence_rows`: the per-row divergence of a `kd.ops.spec.DivergenceSpec` by kd.losses.functional (TAID: the
  mixed logits of `kd.ops.torch_path.taid_logits`), the formula every kernel and the torch path are tested against.
- `eager_chunk_step`: a chunk step of `kd.ops.chunks.FusedLinearChunks` built on it, gradient by autograd (fp32).

TAID target (Shing et al., 2025; same definition as `functional.taid_target`): with ``t`` given, the teacher
distribution ``p`` of the divergence is replaced by

    p_t = softmax((1 - t) * stopgrad(z_s / T) + t * z_t / T)

and p_t is a constant for autograd. With ``forward_kl`` this is TAID's loss KL(p_t || q), gradient (q - p_t) / T.
"""
from __future__ import annotations

import torch
from torch import Tensor

from kd.losses.functional import DIVERGENCES, IGNORE_INDEX, cross_entropy
from kd.ops.spec import DivergenceSpec, FusedLossOutput, Scalar  # noqa: F401  (re-exported for callers of old)
from kd.ops.torch_path import taid_logits

# Elements per block of rows (rows * V) for bounded-memory eager passes (kd.eval_metrics' held-out sums).
EAGER_BLOCK_ELEMENTS = 1 << 23


def divergence_rows(student_logits: Tensor, teacher_logits: Tensor, spec: DivergenceSpec) -> Tensor:
    """Eager per-row divergence ``[...]`` (fp32) of logits ``[..., V]``: the spec the kernels are tested against."""
    target = teacher_logits if spec.taid_t is None else taid_logits(student_logits, teacher_logits, spec.taid_t)
    return DIVERGENCES[spec.name](student_logits, target, temperature=spec.temperature, **spec.knobs())


def eager_chunk_step(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, labels: Tensor,
                     spec: DivergenceSpec, kd_weight: float, ce_weight: float) -> tuple[Tensor, Tensor]:
    """The `ChunkStep` of the torch path: eager divergence + CE on the block, gradient by autograd (fp32)."""
    with torch.enable_grad():
        leaf = student_logits.detach().float().requires_grad_(True)
        kd_rows = torch.where(mask, divergence_rows(leaf, teacher_logits, spec), 0.0)
        total = kd_weight * kd_rows.sum()
        ce_rows = torch.zeros_like(kd_rows)
        if ce_weight > 0.0:
            ce_rows = torch.where(labels != IGNORE_INDEX, cross_entropy(leaf, labels), 0.0)
            total = total + ce_weight * ce_rows.sum()
        (grad,) = torch.autograd.grad(total, leaf)
    student_logits.copy_(grad)
    return kd_rows.detach(), ce_rows.detach()
