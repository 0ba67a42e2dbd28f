"""Fused-linear sparse-target loss: the student's lm_head inside the loop, a stored top-k teacher, no N x V logits.

For each block of C rows (the loop of kd.ops.chunks.FusedLinearChunks, with a sparse block loss):

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

from kd.ops.chunks import FusedLinearChunks, _rows_per_block
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
    def block_loss(blk: slice, logits: Tensor) -> tuple[Tensor, Tensor]:
        return step(logits, ids[blk], logprobs[blk], tail_logprob[blk], mask[blk], labels[blk], spec, tail,
                    1.0 - ce_weight, ce_weight)

    loss, kd_sum, ce_sum = FusedLinearChunks.apply(h_s, student_weight, block_loss, float(ce_weight), vocab, rows,
                                                   normalizer)
    return FusedLossOutput(loss=loss, kd_sum=kd_sum, ce_sum=ce_sum, num_tokens=mask.sum())
