"""The fused-linear loop: loss and lm_head gradients from hidden states, a block of rows at a time.

`FusedLinearChunks` computes the logits of a block of rows (GEMMs), hands them to a pluggable chunk step that turns
them into the block's loss and its gradient w.r.t. those logits (the Triton kernel, kd.ops.fused_linear_kl, or the
torch path, kd.ops.torch_path.block_step), turns that into the gradients of the hidden states and the weight (two
more GEMMs), and drops the block: no N x V tensor ever exists.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from kd.ops.spec import DivergenceSpec, FusedLossOutput, Scalar, row_aligned_empty
from kd.ops.torch_path import block_step

# A chunk step: (student_logits [C, V] in place -> dlogits, teacher_logits [C, V], mask [C], labels [C], spec,
# kd_weight, ce_weight) -> (kd_rows [C] fp32, ce_rows [C] fp32). It overwrites the student logits with the gradient of
# sum_rows(kd_weight * mask * kd_row + ce_weight * (label valid) * ce_row) w.r.t. them, in their dtype.
ChunkStep = Callable[[Tensor, Tensor, Tensor, Tensor, DivergenceSpec, float, float], tuple[Tensor, Tensor]]
# What `FusedLinearChunks` runs per block: (row slice, student logits [C, V] in place -> G) -> (kd rows, ce rows),
# closing over the teacher side (dense logits or hidden states here, a stored top-k in kd.ops.sparse_fused).
BlockLoss = Callable[[slice, Tensor], tuple[Tensor, Tensor]]

# Logits per block on the torch path (the Triton path picks its own, kd.ops.fused_linear_kl.default_chunk_rows).
TORCH_BLOCK_ELEMENTS = 1 << 23


def _row_blocks(n: int, rows: int):
    for start in range(0, n, rows):
        yield slice(start, min(start + rows, n))


def _rows_per_block(vocab: int, chunk_size: Optional[int]) -> int:
    return chunk_size if chunk_size is not None else max(1, TORCH_BLOCK_ELEMENTS // max(vocab, 1))


def _flat_logits(x: Tensor) -> Tensor:
    """``[..., V]`` teacher logits as a 2-D view, or a 3-D ``[B, L, V]`` that cannot be viewed so (the trainer's
    shifted logits): its rows are copied one block at a time (`_block_rows`) instead of all N x V at once."""
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError:
        return x if x.dim() == 3 else x.reshape(-1, x.shape[-1])


# The fused path's [C, V] logit blocks get rows padded to ROW_ALIGN (kd.ops.spec): a [C, V] GEMM output would have
# row stride V. GEMMs take the strided view as it is.


def _logit_block(rows: int, vocab: int, like: Tensor) -> Tensor:
    """An uninitialized ``[rows, vocab]`` block (dtype and device of ``like``) with its row stride rounded up to
    ``ROW_ALIGN``: a view of a slightly wider buffer whose padding columns are zero."""
    return row_aligned_empty((rows, vocab), like.dtype, like.device)[0]


def _block_rows(x: Tensor, blk: slice, vocab: int) -> Tensor:
    """Rows ``blk``, first ``vocab`` columns, of the flattened rows of a `_flat_logits` tensor: a view when 2-D; when
    3-D, a copy into a `_logit_block`, one slice copy per sequence the block touches (no index tensors, and only the
    ``vocab`` columns move)."""
    if x.dim() == 2:
        return x[blk, :vocab]
    out = _logit_block(blk.stop - blk.start, vocab, x)
    row = blk.start
    while row < blk.stop:
        b, pos = divmod(row, x.shape[1])
        n = min(blk.stop - row, x.shape[1] - pos)
        out[row - blk.start:row - blk.start + n].copy_(x[b, pos:pos + n, :vocab])
        row += n
    return out


def _head_logits(hidden: Tensor, weight: Tensor) -> Tensor:
    """``hidden @ weight^T`` written into a `_logit_block` (row stride aligned, see ROW_ALIGN)."""
    return torch.mm(hidden, weight.t(), out=_logit_block(hidden.shape[0], weight.shape[0], hidden))


def _accumulate_weight_grad(acc: Tensor, dlogits: Tensor, hidden: Tensor) -> None:
    """``acc (fp32) += dlogits^T @ hidden``; on CUDA a bf16/fp16 GEMM writing fp32 directly (no fp32 GEMM)."""
    if acc.dtype == dlogits.dtype:
        acc.addmm_(dlogits.t(), hidden)
    elif acc.is_cuda:
        try:  # cuBLAS GEMM with an fp32 output and beta = 1 (torch >= 2.9): exact fp32 accumulation across chunks
            torch.addmm(acc, dlogits.t(), hidden, out_dtype=torch.float32, out=acc)
        except (TypeError, RuntimeError):
            acc.add_(dlogits.t() @ hidden)  # older torch: one rounding to the low precision per chunk
    else:
        acc.addmm_(dlogits.t().float(), hidden.float())


class FusedLinearChunks(torch.autograd.Function):
    """``loss = S / normalizer``, ``S = (1 - w) * kd_sum + w * ce_sum``, of a linear head; gradients computed in
    forward, chunk by chunk.

    For each block of rows c: ``z_s = h_s[c] W_s^T``; ``block_loss`` turns z_s into ``G = dS/dz_s`` in place against
    the block's teacher side (``z_t = h_t[c] W_t^T``, the given teacher logits, or a stored top-k), then
    ``dS/dh_s[c] = G W_s`` and ``dS/dW_s += G^T h_s[c]``
    (fp32 accumulator, divided by the normalizer before the cast to the weight dtype, so a sum over many tokens cannot
    overflow fp16). Backward only scales the stored gradients by grad_output, so grad_output != 1 costs two small
    elementwise products, and it never touches W_s (a ZeRO-3 lm_head need not be gathered again). Peak extra memory:
    two [C, V] logit blocks in the input dtype, the [V, Hs] fp32 accumulator (plus its cast), the [N, Hs] gradient.
    """

    @staticmethod
    def forward(ctx, h_s: Tensor, w_s: Tensor, block_loss: BlockLoss, ce_weight: float, vocab: int, rows: int,
                normalizer: Scalar):
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w_shared = w_s[:vocab]  # rows past the shared vocabulary (padding) get no logits and a zero gradient
        grad_h = torch.empty(h_s.shape, dtype=h_s.dtype, device=h_s.device) if want_h else None
        grad_w = torch.zeros(w_s.shape, dtype=torch.float32, device=w_s.device) if want_w else None
        kd_rows = torch.zeros(h_s.shape[0], dtype=torch.float32, device=h_s.device)
        ce_rows = torch.zeros_like(kd_rows)
        for blk in _row_blocks(h_s.shape[0], rows):
            logits = _head_logits(h_s[blk], w_shared)
            kd_rows[blk], ce_rows[blk] = block_loss(blk, logits)
            if want_h:
                torch.mm(logits, w_shared, out=grad_h[blk])
            if want_w:
                _accumulate_weight_grad(grad_w[:vocab], logits, h_s[blk])
            del logits  # before the next block's GEMM allocates its own
        if want_w:  # back to the parameter dtype now: the fp32 accumulator must not live until backward
            grad_w = grad_w.div_(normalizer).to(w_s.dtype)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.normalizer = normalizer
        kd_sum, ce_sum = kd_rows.sum(), ce_rows.sum()
        ctx.mark_non_differentiable(kd_sum, ce_sum)
        return ((1.0 - ce_weight) * kd_sum + ce_weight * ce_sum) / normalizer, kd_sum, ce_sum

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _kd: Tensor, _ce: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        # Out of place (a retained graph may run backward twice); each product is computed in fp32, rounded once.
        out_h = grad_h * (grad_loss / ctx.normalizer) if grad_h is not None else None
        out_w = grad_w * grad_loss if grad_w is not None else None
        return out_h, out_w, None, None, None, None, None


def fused_linear_chunks(student_hidden: Tensor, student_weight: Tensor, mask: Tensor, labels: Tensor, *,
                                  teacher_hidden: Optional[Tensor], teacher_weight: Optional[Tensor],
                                  teacher_logits: Optional[Tensor], spec: DivergenceSpec, ce_weight: float = 0.0,
                                  normalizer: Scalar = 1.0, vocab_size: Optional[int] = None,
                                  chunk_size: Optional[int] = None,
                                  step: ChunkStep = block_step) -> FusedLossOutput:
    """The chunked fused-linear loss (see `kd.ops.fused_linear_divergence` for the arguments); ``step`` picks the
    per-chunk computation (the torch path by default, the Triton kernel in kd.ops.fused_linear_kl, the eager spec in
    kd.losses.chunked)."""
    if (teacher_logits is None) == (teacher_hidden is None or teacher_weight is None):
        raise ValueError("give either teacher_logits or both teacher_hidden and teacher_weight")
    if not 0.0 <= ce_weight <= 1.0:
        raise ValueError(f"ce_weight must be in [0, 1], got {ce_weight}")
    h_s = student_hidden.reshape(-1, student_hidden.shape[-1])
    if not torch.is_grad_enabled():  # eval: Function.forward would still see needs_input_grad and run the grad GEMMs
        h_s, student_weight = h_s.detach(), student_weight.detach()
    mask, labels = mask.reshape(-1), labels.reshape(-1)
    h_t = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach() if teacher_hidden is not None else None
    z_t = _flat_logits(teacher_logits.detach()) if teacher_logits is not None else None
    w_t = teacher_weight.detach() if teacher_weight is not None else None
    vocab = vocab_size if vocab_size is not None else student_weight.shape[0]
    t_vocab = z_t.shape[-1] if z_t is not None else w_t.shape[0]
    if not 0 < vocab <= min(student_weight.shape[0], t_vocab):
        raise ValueError(f"vocab_size {vocab} exceeds the student ({student_weight.shape[0]}) or teacher ({t_vocab}) "
                         "vocabulary")
    t_rows = z_t.numel() // z_t.shape[-1] if z_t is not None else h_t.shape[0]
    if not h_s.shape[0] == mask.shape[0] == labels.shape[0] == t_rows:
        raise ValueError(f"rows differ: hidden {h_s.shape[0]}, mask {mask.shape[0]}, labels {labels.shape[0]}, "
                         f"teacher {t_rows}")
    if isinstance(normalizer, Tensor):
        normalizer = normalizer.detach().to(device=h_s.device, dtype=torch.float32)
    def block_loss(blk: slice, logits: Tensor) -> tuple[Tensor, Tensor]:
        teacher = _block_rows(z_t, blk, vocab) if z_t is not None else _head_logits(h_t[blk], w_t[:vocab])
        return step(logits, teacher, mask[blk], labels[blk], spec, 1.0 - ce_weight, ce_weight)

    loss, kd_sum, ce_sum = FusedLinearChunks.apply(h_s, student_weight, block_loss, float(ce_weight), vocab,
                                                   _rows_per_block(vocab, chunk_size), normalizer)
    return FusedLossOutput(loss=loss, kd_sum=kd_sum, ce_sum=ce_sum, num_tokens=mask.sum())
