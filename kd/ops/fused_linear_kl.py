"""Fused-linear divergence: loss and lm_head gradients from hidden states, never more than a chunk x V of logits.

For each block of C rows (the loop, the GEMMs and the autograd wrapper are `kd.ops.chunks.FusedLinearChunks`,
shared with the eager path):

    z_s = h_s W_s^T          [C, V] cuBLAS GEMM, input dtype (bf16); rows padded to 16 elements (vectorized loads)
    z_t = h_t W_t^T          [C, V] cuBLAS GEMM (or a view of the given teacher logits)
    dense_kl._rows_kernel:   per row: passes A (+ B) + C of kd.ops.row_math; the gradient
                             G = (1 - w) / T * dD/ds * mask + w * (softmax(z_s) - onehot(label)) * (label != -100)
                             is written over z_s in place; per-row D and CE go to two [C] fp32 vectors
    dh_s[c] = G W_s          cuBLAS GEMM
    dW_s   += G^T h_s[c]     cuBLAS GEMM with an fp32 accumulator

Backward multiplies the stored dh_s and dW_s by the scalar grad_output. Extra memory at (N, Hs, V) = (8192, 2048,
128256) with C = 1024, bf16: 2 x 251 MiB logit blocks + 1 GiB fp32 dW accumulator (0.5 GiB once cast to bf16) +
32 MiB dh, ~1.6 GiB at the peak. The elementwise work is one kernel per chunk that reads the two logit blocks twice
(the second time backwards, partly from L2) and writes G once: about 10 bytes per logit, next to the 4 GEMMs'
2 N V (3 Hs + Ht) flops.

TAID, temperature, every divergence and the CE term are the same as in the dense kernel (kd.ops.dense_kl).
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from kd.ops.chunks import fused_linear_chunks
from kd.ops.dense_kl import launch_config, rows_launch
from kd.ops.spec import DivergenceSpec, FusedLossOutput, Scalar

# Rows per chunk: C x V logits per block, rounded down to a multiple of 128 (GEMM tiles). 2^27 elements = 256 MiB bf16.
CHUNK_ELEMENTS = 1 << 27


def default_chunk_rows(n_rows: int, vocab: int) -> int:
    """Rows per chunk: ~CHUNK_ELEMENTS logits, a multiple of 128, at least 128, at most n_rows."""
    rows = max(128, (CHUNK_ELEMENTS // vocab) // 128 * 128)
    return max(1, min(rows, n_rows))


def triton_chunk_step(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, labels: Tensor,
                      spec: DivergenceSpec, kd_weight: float, ce_weight: float) -> tuple[Tensor, Tensor]:
    """The `ChunkStep` of the Triton path (same contract as `kd.losses.chunked.eager_chunk_step`)."""
    if student_logits.stride(1) != 1 or teacher_logits.stride(1) != 1:
        raise ValueError("logit blocks must have unit stride along the vocabulary")
    # in place: each block of z_s is read, then overwritten by its gradient, by its row's program only
    launch, kd, ce = rows_launch(student_logits, teacher_logits, student_logits, mask, labels, spec, kd_weight,
                                 ce_weight, launch_config(student_logits.device))
    if student_logits.shape[0]:
        launch()
    return kd, ce


def fused_linear_divergence_triton(student_hidden: Tensor, student_weight: Tensor, mask: Tensor, labels: Tensor, *,
                                   teacher_hidden: Optional[Tensor], teacher_weight: Optional[Tensor],
                                   teacher_logits: Optional[Tensor], spec: DivergenceSpec, ce_weight: float = 0.0,
                                   normalizer: Scalar = 1.0, vocab_size: Optional[int] = None,
                                   chunk_size: Optional[int] = None) -> FusedLossOutput:
    """`kd.ops.fused_linear_divergence` on the Triton chunk kernel (arguments there)."""
    vocab = vocab_size if vocab_size is not None else student_weight.shape[0]
    n_rows = student_hidden.numel() // student_hidden.shape[-1]
    rows = chunk_size if chunk_size is not None else default_chunk_rows(n_rows, vocab)
    return fused_linear_chunks(
        student_hidden, student_weight, mask, labels, teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
        teacher_logits=teacher_logits, spec=spec, ce_weight=ce_weight, normalizer=normalizer, vocab_size=vocab_size,
        chunk_size=rows, step=triton_chunk_step)
