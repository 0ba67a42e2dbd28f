"""Fused-linear sparse-target loss: the student's lm_head inside the loop, a stored top-k teacher, no N x V logits.

For each block of C rows (the same loop as kd.ops.chunks.FusedLinearChunks, whose GEMM helpers it uses):

    z_s = h_s W_s^T            [C, V] GEMM in the input dtype, rows padded to 16 elements
    sparse step (in place)     z_s -> G = dS/dz_s, S = (1 - w) sum(mask * D) + w sum(valid * CE), D over the K + 1
                               buckets of the block's stored ids / log-probs / tail (kd.ops.sparse_torch on CPU, the
                               row kernel kd.ops.sparse_kl on CUDA)
    dh_s[c] = G W_s,  dW_s += G^T h_s[c]   (fp32 accumulator, divided by the normalizer before the cast)

The teacher side is only [C, K] per block, so peak extra memory is one [C, V] logit block, the [V, Hs] fp32
accumulator and the [N, Hs] gradient. Backward scales the stored gradients by grad_output.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from kd.ops.chunks import _accumulate_weight_grad, _head_logits, _row_blocks, _rows_per_block
from kd.ops.spec import DivergenceSpec, FusedLossOutput, Scalar
from kd.ops import sparse_torch

# (logits [C, V] in place -> G, ids [C, K], logprobs [C, K], tail [C], mask [C], labels [C], spec, tail mode,
#  kd_weight, ce_weight) -> (kd rows [C], ce rows [C])
SparseChunkStep = Callable[..., tuple[Tensor, Tensor]]

def torch_sparse_chunk_step(logits: Tensor, ids: Tensor, logprobs: Tensor, tail_logprob: Tensor, mask: Tensor,
                            labels: Tensor, spec: DivergenceSpec, tail: str, kd_weight: float,
                            ce_weight: float) -> tuple[Tensor, Tensor]:
    """The chunk step of the torch path: kd.ops.sparse_torch.sparse_pass over the chunk, gradient over the logits."""
    # sub-blocks of sparse_torch's size, so the step's fp32 temporaries stay small inside a large chunk
    return sparse_torch.sparse_pass(logits, ids, logprobs, tail_logprob, mask, labels, spec, tail, kd_weight,
                                    ce_weight, logits)


class FusedLinearSparse(torch.autograd.Function):
    """``loss = S / normalizer`` of a linear student head against a stored top-k teacher; gradients in forward."""

    @staticmethod
    def forward(ctx, h_s: Tensor, w_s: Tensor, ids: Tensor, logprobs: Tensor, tail_logprob: Tensor, mask: Tensor,
                labels: Tensor, spec: DivergenceSpec, tail: str, ce_weight: float, vocab: int, rows: int,
                step: SparseChunkStep, normalizer: Scalar):
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w_shared = w_s[:vocab]  # rows past the shared vocabulary (padding) get no logits and a zero gradient
        grad_h = torch.empty(h_s.shape, dtype=h_s.dtype, device=h_s.device) if want_h else None
        grad_w = torch.zeros(w_s.shape, dtype=torch.float32, device=w_s.device) if want_w else None
        kd_rows = torch.zeros(h_s.shape[0], dtype=torch.float32, device=h_s.device)
        ce_rows = torch.zeros_like(kd_rows)
        for blk in _row_blocks(h_s.shape[0], rows):
            logits = _head_logits(h_s[blk], w_shared)
            kd_rows[blk], ce_rows[blk] = step(logits, ids[blk], logprobs[blk], tail_logprob[blk], mask[blk],
                                              labels[blk], spec, tail, 1.0 - ce_weight, ce_weight)
            if want_h:
                torch.mm(logits, w_shared, out=grad_h[blk])
            if want_w:
                _accumulate_weight_grad(grad_w[:vocab], logits, h_s[blk])
            del logits
        if want_w:
            grad_w = grad_w.div_(normalizer).to(w_s.dtype)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.normalizer = normalizer
        kd_sum, ce_sum = kd_rows.sum(), ce_rows.sum()
        ctx.mark_non_differentiable(kd_sum, ce_sum)
        return ((1.0 - ce_weight) * kd_sum + ce_weight * ce_sum) / normalizer, kd_sum, ce_sum

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _kd: Tensor, _ce: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        out_h = grad_h * (grad_loss / ctx.normalizer) if grad_h is not None else None
        out_w = grad_w * grad_loss if grad_w is not None else None
        return (out_h, out_w) + (None,) * 12


def fused_linear_sparse_rows(student_hidden: Tensor, student_weight: Tensor, ids: Tensor, logprobs: Tensor,
                             tail_logprob: Tensor, mask: Tensor, labels: Tensor, *, spec: DivergenceSpec, tail: str,
                             ce_weight: float, normalizer: Scalar, vocab_size: Optional[int], backend: str,
                             chunk_size: Optional[int]) -> FusedLossOutput:
    """`kd.ops.fused_linear_sparse` once the backend is known (arguments there)."""
    h_s = student_hidden.reshape(-1, student_hidden.shape[-1])
    if not torch.is_grad_enabled():  # eval: Function.forward would still see needs_input_grad and run the grad GEMMs
        h_s, student_weight = h_s.detach(), student_weight.detach()
    k = ids.shape[-1]
    ids, logprobs = ids.reshape(-1, k).long(), logprobs.detach().reshape(-1, k).float()
    tail_logprob, mask, labels = tail_logprob.detach().reshape(-1).float(), mask.reshape(-1), labels.reshape(-1)
    vocab = vocab_size if vocab_size is not None else student_weight.shape[0]
    if not 0 < vocab <= student_weight.shape[0]:
        raise ValueError(f"vocab_size {vocab} exceeds the student's vocabulary ({student_weight.shape[0]})")
    if not h_s.shape[0] == ids.shape[0] == tail_logprob.shape[0] == mask.shape[0] == labels.shape[0]:
        raise ValueError(f"rows differ: hidden {h_s.shape[0]}, ids {ids.shape[0]}, tail {tail_logprob.shape[0]}, "
                         f"mask {mask.shape[0]}, labels {labels.shape[0]}")
    if backend == "triton":
        from kd.ops.fused_linear_kl import default_chunk_rows
        from kd.ops.sparse_kl import triton_sparse_chunk_step as step
        rows = chunk_size if chunk_size is not None else default_chunk_rows(h_s.shape[0], vocab)
    else:
        step, rows = torch_sparse_chunk_step, _rows_per_block(vocab, chunk_size)
    if isinstance(normalizer, Tensor):
        normalizer = normalizer.detach().to(device=h_s.device, dtype=torch.float32)
    loss, kd_sum, ce_sum = FusedLinearSparse.apply(h_s, student_weight, ids, logprobs, tail_logprob, mask, labels,
                                                   spec, tail, float(ce_weight), vocab, rows, step, normalizer)
    return FusedLossOutput(loss=loss, kd_sum=kd_sum, ce_sum=ce_sum, num_tokens=mask.sum())
