"""Fused KL kernels: the divergence losses over a large vocabulary, lean in memory, in Triton on CUDA.

Two families, each with a Triton implementation (imported only when used) and a closed-form torch path
(kd.ops.torch_path: CPU, or ``backend="torch"``); both compute the loss and its gradient in one pass over each block
of logits, and both are tested against the eager divergences of `kd.losses.functional` (the spec). kd.ops imports
nothing from kd.losses (what both share is kd.ops.spec):

    dense_loss(student_logits, teacher_logits, mask, labels, divergence=..., grad_scale=...) -> FusedLossOutput
    dense_divergence(student_logits, teacher_logits, mask, divergence=...)                   -> per-row loss [N]
    fused_linear_divergence(student_hidden, student_weight, mask, labels, teacher_...)      -> FusedLossOutput
    sparse_loss(student_logits, ids, logprobs, tail_logprob, mask, labels, divergence=...)  -> FusedLossOutput
    fused_linear_sparse(student_hidden, student_weight, ids, logprobs, tail_logprob, mask, labels, ...)

The sparse pair trains against a stored top-k teacher (ids, log-probs, log tail mass per row) over K + 1 buckets,
or the k ids renormalized with ``tail="renormalize"`` (the eager spec: `kd.losses.functional.sparse_divergence`).

``divergence`` is a name of `kd.losses.functional.DIVERGENCES`; ``taid_t`` (float or 0-dim tensor) replaces the
teacher distribution by TAID's target softmax((1 - t) * stopgrad(z_s / T) + t * z_t / T) (`functional.taid_target`);
with forward_kl the loss is TAID's KL(p_t || q). ``backend``: "triton", "torch", or "auto" (Triton when the tensors
are on CUDA and triton imports, the torch path otherwise).
"""
from __future__ import annotations

import importlib.util
from typing import Optional

from torch import Tensor

from kd.ops.spec import DivergenceSpec, FusedLossOutput, Scalar

__all__ = ["DivergenceSpec", "FusedLossOutput", "dense_divergence", "dense_loss", "fused_linear_divergence",
           "fused_linear_sparse", "resolve_backend", "sparse_loss", "triton_available"]

BACKENDS = ("auto", "triton", "torch")


def triton_available() -> bool:
    """True when the triton package is installed (it is not imported here)."""
    return importlib.util.find_spec("triton") is not None


def resolve_backend(backend: str, tensor: Tensor) -> str:
    """"triton" or "torch" for a request and the device of ``tensor`` (auto: Triton on CUDA when installed)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "triton" if tensor.is_cuda and triton_available() else "torch"
    if backend == "triton" and not triton_available():
        raise ValueError("backend='triton' needs the triton package (pip install triton)")
    return backend


def dense_divergence(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, *, divergence: str,
                     temperature: float = 1.0, beta: float = 0.5, alpha: float = 0.1, taid_t: Optional[Scalar] = None,
                     backend: str = "auto", vocab_size: Optional[int] = None,
                     chunk_size: Optional[int] = None) -> Tensor:
    """Per-row divergence between materialized logits.

    Args:
        student_logits: ``[N, V]`` (or ``[..., V]``), any float dtype, with grad.
        teacher_logits: same shape, no grad (detached here).
        mask: ``[N]`` bool; False rows give 0 and a zero gradient.
        divergence, temperature, beta, alpha, taid_t: the loss (module docstring); no T^2 factor.
        vocab_size: use only the first ``vocab_size`` logits of both sides (a view, no copy).
        chunk_size: rows per block of the torch path (default ~8M logits per block); the kernel ignores it.
    Returns:
        ``[N]`` fp32 loss per row, autograd to ``student_logits``.
    """
    spec = DivergenceSpec(divergence, temperature, beta, alpha, taid_t)
    student_logits, teacher_logits = _checked(student_logits, teacher_logits, mask, vocab_size)
    from kd.ops.dense import dense_divergence_rows
    return dense_divergence_rows(student_logits, teacher_logits, mask.bool(), spec,
                                 resolve_backend(backend, student_logits), chunk_size)


def _checked(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, vocab_size: Optional[int]):
    if vocab_size is not None:
        student_logits, teacher_logits = student_logits[..., :vocab_size], teacher_logits[..., :vocab_size]
    if student_logits.shape != teacher_logits.shape or student_logits.shape[:-1] != mask.shape:
        raise ValueError(f"shapes differ: student {tuple(student_logits.shape)}, teacher "
                         f"{tuple(teacher_logits.shape)}, mask {tuple(mask.shape)}")
    return student_logits, teacher_logits


def dense_loss(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, labels: Tensor, *, divergence: str,
               temperature: float = 1.0, beta: float = 0.5, alpha: float = 0.1, taid_t: Optional[Scalar] = None,
               ce_weight: float = 0.0, grad_scale: Optional[float] = None, backend: str = "auto",
               vocab_size: Optional[int] = None, chunk_size: Optional[int] = None) -> FusedLossOutput:
    """``(1 - w) * sum(mask * D) + w * sum(valid * CE)`` over materialized logits, with its gradient computed in
    the same pass (kd.ops.dense). CE at T = 1, skipped when w = 0.

    Args:
        student_logits, teacher_logits, mask, divergence, ...: as `dense_divergence`.
        labels: ``[...]`` next-token ids for the CE term, -100 where none.
        grad_scale: the grad_output backward will bring (the trainer's world / global loss tokens); the gradient is
            stored at that scale. Another grad_output (or None: stored at 1) rescales it in backward.
    Returns:
        `FusedLossOutput`: ``loss`` (a sum, autograd to the student logits), kd_sum and ce_sum detached, num_tokens.
    """
    spec = DivergenceSpec(divergence, temperature, beta, alpha, taid_t)
    student_logits, teacher_logits = _checked(student_logits, teacher_logits, mask, vocab_size)
    if labels.shape != mask.shape:
        raise ValueError(f"labels {tuple(labels.shape)} and mask {tuple(mask.shape)} differ")
    if not 0.0 <= ce_weight <= 1.0:
        raise ValueError(f"ce_weight must be in [0, 1], got {ce_weight}")
    from kd.ops.dense import dense_loss_rows
    return dense_loss_rows(student_logits, teacher_logits, mask.bool(), labels, spec, 1.0 - ce_weight, ce_weight,
                           grad_scale, resolve_backend(backend, student_logits), chunk_size)


def fused_linear_divergence(student_hidden: Tensor, student_weight: Tensor, mask: Tensor, labels: Tensor, *,
                            teacher_hidden: Optional[Tensor] = None, teacher_weight: Optional[Tensor] = None,
                            teacher_logits: Optional[Tensor] = None, divergence: str, temperature: float = 1.0,
                            beta: float = 0.5, alpha: float = 0.1, taid_t: Optional[Scalar] = None,
                            ce_weight: float = 0.0, normalizer: Scalar = 1.0, vocab_size: Optional[int] = None,
                            backend: str = "auto", chunk_size: Optional[int] = None) -> FusedLossOutput:
    """Divergence (+ optional hard-label CE) of a linear lm_head, without N x V logits.

    Args:
        student_hidden: ``[N, Hs]`` (or ``[..., Hs]``) final hidden states, with grad.
        student_weight: ``[V', Hs]`` lm_head weight, with grad (a ZeRO-3 shard must be gathered by the caller; a tied
            embedding is fine: autograd adds this gradient to the embedding's).
        mask: ``[N]`` bool rows that carry the divergence (and are counted in ``num_tokens``).
        labels: ``[N]`` next-token ids for the CE term, -100 where none.
        teacher_hidden, teacher_weight: ``[N, Ht]`` and ``[V'', Ht]``; or teacher_logits ``[N, V'']``. No grad.
        vocab_size: use only the first ``vocab_size`` logits of both sides (lm_heads padded past the shared
            vocabulary); default: the student's V'.
        ce_weight: w; the loss is ``((1 - w) kd_sum + w ce_sum) / normalizer`` (CE at T = 1, skipped when w = 0).
        normalizer: divisor of the loss (the trainer passes the global loss-token count; float or tensor).
        chunk_size: rows per chunk (default: ~128M logits per chunk on Triton, ~8M on the torch path).
    Returns:
        `FusedLossOutput` (loss with autograd to ``student_hidden`` and ``student_weight``; kd_sum, ce_sum detached).
    """
    spec = DivergenceSpec(divergence, temperature, beta, alpha, taid_t)
    kwargs = dict(teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, teacher_logits=teacher_logits,
                  spec=spec, ce_weight=ce_weight, normalizer=normalizer, vocab_size=vocab_size, chunk_size=chunk_size)
    mask = mask.bool()
    if resolve_backend(backend, student_hidden) == "triton":
        from kd.ops.fused_linear_kl import fused_linear_divergence_triton
        return fused_linear_divergence_triton(student_hidden, student_weight, mask, labels, **kwargs)
    from kd.ops.chunks import fused_linear_chunks
    return fused_linear_chunks(student_hidden, student_weight, mask, labels, **kwargs)


def sparse_loss(student_logits: Tensor, ids: Tensor, logprobs: Tensor, tail_logprob: Tensor, mask: Tensor,
                labels: Tensor, *, divergence: str, temperature: float = 1.0, beta: float = 0.5, alpha: float = 0.1,
                taid_t: Optional[Scalar] = None, ce_weight: float = 0.0, grad_scale: Optional[float] = None,
                backend: str = "auto", tail: str = "bucket", vocab_size: Optional[int] = None,
                chunk_size: Optional[int] = None) -> FusedLossOutput:
    """``(1 - w) * sum(mask * D) + w * sum(valid * CE)`` of materialized student logits against a stored top-k
    teacher, with the gradient computed in the same pass (kd.ops.sparse).

    Args:
        student_logits: ``[..., V]`` (a [B, L, V] view is used without a copy), any float dtype, with grad.
        ids: ``[..., K]`` the teacher's token ids per row (distinct, any order, < V); logprobs ``[..., K]`` their
            teacher log-probs at the store's temperature; tail_logprob ``[...]`` the log of the rest (may be -inf).
        mask: ``[...]`` bool rows that carry the divergence; labels ``[...]`` ids for the CE term (-100: none).
        divergence, temperature, beta, alpha, taid_t: as `dense_loss` (TAID's target is the log-space mix of the
            buckets, `kd.losses.functional.sparse_taid_kl`); the student's logits are divided by ``temperature``.
        tail: "bucket" (the tail mass is one more bucket) or "renormalize" (both sides over the k ids, tail ignored).
        grad_scale: the grad_output backward will bring (as `dense_loss`).
        vocab_size: use only the first ``vocab_size`` student logits (a view).
        chunk_size: rows per block of the torch path; the kernel ignores it.
    Returns:
        `FusedLossOutput`: ``loss`` (a sum, autograd to the student logits), kd_sum and ce_sum detached, num_tokens.
    """
    spec = DivergenceSpec(divergence, temperature, beta, alpha, taid_t)
    if vocab_size is not None:
        student_logits = student_logits[..., :vocab_size]
    _check_sparse(student_logits.shape[:-1], ids, logprobs, tail_logprob, mask, labels)
    if not 0.0 <= ce_weight <= 1.0:
        raise ValueError(f"ce_weight must be in [0, 1], got {ce_weight}")
    from kd.ops.sparse import sparse_loss_rows
    return sparse_loss_rows(student_logits, ids, logprobs, tail_logprob, mask.bool(), labels, spec, tail,
                            1.0 - ce_weight, ce_weight, grad_scale, resolve_backend(backend, student_logits),
                            chunk_size)


def _check_sparse(lead, ids: Tensor, logprobs: Tensor, tail_logprob: Tensor, mask: Tensor, labels: Tensor) -> None:
    if not (ids.shape == logprobs.shape and ids.shape[:-1] == tail_logprob.shape == mask.shape == labels.shape
            and ids.numel() // max(ids.shape[-1], 1) == lead.numel()):
        raise ValueError(f"shapes differ: rows {tuple(lead)}, ids {tuple(ids.shape)}, logprobs "
                         f"{tuple(logprobs.shape)}, tail_logprob {tuple(tail_logprob.shape)}, mask "
                         f"{tuple(mask.shape)}, labels {tuple(labels.shape)}")


def fused_linear_sparse(student_hidden: Tensor, student_weight: Tensor, ids: Tensor, logprobs: Tensor,
                        tail_logprob: Tensor, mask: Tensor, labels: Tensor, *, divergence: str,
                        temperature: float = 1.0, beta: float = 0.5, alpha: float = 0.1,
                        taid_t: Optional[Scalar] = None, ce_weight: float = 0.0, normalizer: Scalar = 1.0,
                        vocab_size: Optional[int] = None, tail: str = "bucket", backend: str = "auto",
                        chunk_size: Optional[int] = None) -> FusedLossOutput:
    """`sparse_loss` of a linear student head (kd.ops.sparse_fused): the logits exist one block of rows at a time.

    Args:
        student_hidden: ``[..., Hs]`` final hidden states, with grad; student_weight ``[V', Hs]`` (gathered).
        ids, logprobs, tail_logprob, mask, labels, divergence, ..., tail: as `sparse_loss`, rows as the hidden states.
        ce_weight, normalizer, vocab_size, chunk_size: as `fused_linear_divergence` (``loss = S / normalizer``).
    Returns:
        `FusedLossOutput` (loss with autograd to ``student_hidden`` and ``student_weight``; kd_sum, ce_sum detached).
    """
    spec = DivergenceSpec(divergence, temperature, beta, alpha, taid_t)
    if not 0.0 <= ce_weight <= 1.0:
        raise ValueError(f"ce_weight must be in [0, 1], got {ce_weight}")
    from kd.ops.sparse import check_tail
    from kd.ops.sparse_fused import fused_linear_sparse_rows
    return fused_linear_sparse_rows(student_hidden, student_weight, ids, logprobs, tail_logprob, mask.bool(), labels,
                                    spec=spec, tail=check_tail(tail), ce_weight=ce_weight, normalizer=normalizer,
                                    vocab_size=vocab_size, backend=resolve_backend(backend, student_hidden),
                                    chunk_size=chunk_size)
