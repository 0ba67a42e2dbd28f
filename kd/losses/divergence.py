"""The classic KD losses: a divergence between student and teacher, optionally mixed with the hard-label CE.

Per loss token (``labels != -100``):

    total = (1 - w) * divergence(student, teacher; T) + w * cross_entropy(student, label)

and `LossOutput` carries the sums of ``total`` over loss tokens plus, for logging, the unweighted sums of each part
(``terms["kd"]`` and, when ``w > 0``, ``terms["ce"]``). The CE term is only computed when it is used: it needs another
fp32 pass over the ``[B, L, V]`` logits, which is too costly for a logging-only number (eval reports the CE anyway).
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch

from kd.errors import UserError
from kd.losses.base import (DistillationLoss, FusedLinearInputs, LossInputs, LossOutput, SparseTarget,
                            fused_linear_mix_with_ce, loss_token_mask, masked_sum, mix_with_ce)
from kd.losses.functional import (DIVERGENCES, SPARSE_TAILS, cross_entropy, sparse_divergence,
                                  sparse_taid_kl)
from kd.ops import dense_loss, fused_linear_sparse, sparse_loss


def dense_mix_with_ce(name: str, inputs: LossInputs, *, divergence: str, temperature: float, ce_weight: float,
                      kernel: str, **divergence_kwargs) -> LossOutput:
    """``(1 - w) * divergence + w * CE`` summed over loss tokens by `kd.ops.dense_loss`: loss, CE and the gradient
    of both in one pass over the logits (stored at ``inputs.grad_scale``), both parts as logging terms."""
    out = dense_loss(inputs.student_logits, inputs.teacher_logits, loss_token_mask(inputs.labels), inputs.labels,
                     divergence=divergence, temperature=temperature, ce_weight=ce_weight,
                     grad_scale=inputs.grad_scale, backend=kernel, **divergence_kwargs)
    terms = {name: out.kd_sum}
    if ce_weight > 0.0:
        terms["ce"] = out.ce_sum
    return LossOutput(loss_sum=out.loss, num_tokens=out.num_tokens, terms=terms)


def sparse_mix_with_ce(name: str, inputs: LossInputs, *, divergence: str, temperature: float, ce_weight: float,
                       kernel: str, tail: str, taid_t: Optional[float] = None, **divergence_kwargs) -> LossOutput:
    """`dense_mix_with_ce` against a stored top-k teacher (``inputs.teacher_sparse``): the divergence over its
    K + 1 buckets (kd.losses.functional.sparse_divergence; TAID: sparse_taid_kl with ``taid_t``). kernel "eager":
    the reference formula with autograd; otherwise `kd.ops.sparse_loss` (gradient in the same pass)."""
    target: SparseTarget = inputs.teacher_sparse
    mask = loss_token_mask(inputs.labels)
    if kernel == "eager":
        # Positions off the mask hold the store's filler, where e.g. reverse KL is +inf (tail p = 0 < q): autograd
        # would bring 0 * inf = NaN back from them. They reach the divergence through a detached copy, and the
        # selection's backward drops whatever comes back there.
        logits = torch.where(mask.unsqueeze(-1), inputs.student_logits, inputs.student_logits.detach())
        if taid_t is None:
            per_token = sparse_divergence(logits, target.ids, target.logprobs, target.tail_logprob,
                                          divergence=divergence, temperature=temperature, tail=tail,
                                          **divergence_kwargs)
        else:
            per_token = sparse_taid_kl(logits, target.ids, target.logprobs, target.tail_logprob, taid_t,
                                       temperature=temperature, tail=tail)
        return mix_with_ce(name, masked_sum(per_token, mask), inputs, mask, ce_weight)
    out = sparse_loss(inputs.student_logits, target.ids, target.logprobs, target.tail_logprob, mask, inputs.labels,
                      divergence=divergence, temperature=temperature, ce_weight=ce_weight, taid_t=taid_t,
                      grad_scale=inputs.grad_scale, backend=kernel, tail=tail, **divergence_kwargs)
    return _terms_output(name, out, ce_weight)


def fused_linear_sparse_mix_with_ce(name: str, inputs: FusedLinearInputs, *, divergence: str, temperature: float,
                                    ce_weight: float, kernel: str, tail: str, taid_t: Optional[float] = None,
                                    **divergence_kwargs) -> LossOutput:
    """`fused_linear_mix_with_ce` against ``inputs.teacher_sparse``: `kd.ops.fused_linear_sparse` (the student's
    head inside the loop; kernel "eager" runs its torch path, as the dense fused loss does)."""
    target: SparseTarget = inputs.teacher_sparse
    out = fused_linear_sparse(inputs.student_hidden, inputs.student_weight, target.ids, target.logprobs,
                              target.tail_logprob, loss_token_mask(inputs.labels), inputs.labels,
                              divergence=divergence, temperature=temperature, taid_t=taid_t, ce_weight=ce_weight,
                              vocab_size=inputs.vocab_size, tail=tail,
                              backend="torch" if kernel == "eager" else kernel, **divergence_kwargs)
    return _terms_output(name, out, ce_weight)


def _terms_output(name: str, out, ce_weight: float) -> LossOutput:
    terms = {name: out.kd_sum}
    if ce_weight > 0.0:
        terms["ce"] = out.ce_sum
    return LossOutput(loss_sum=out.loss, num_tokens=out.num_tokens, terms=terms)


def check_sparse_tail(tail: str) -> str:
    if tail not in SPARSE_TAILS:
        raise UserError(f"sparse_tail must be one of {', '.join(SPARSE_TAILS)}, got {tail!r}", key="loss.sparse_tail")
    return tail


def _check_divergence_kwargs(divergence: str, kwargs: dict) -> None:
    """Reject keyword arguments the divergence does not take now, rather than with a TypeError at the first step."""
    params = inspect.signature(DIVERGENCES[divergence]).parameters
    allowed = [name for name, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY and name != "temperature"]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise TypeError(f"divergence {divergence!r} takes {allowed or 'no extra arguments'}, got {unknown}")


class DivergenceLoss(DistillationLoss):
    """``(1 - ce_weight) * divergence + ce_weight * CE`` per loss token, summed (see the module docstring).

    Args:
        divergence: a key of `kd.losses.functional.DIVERGENCES` (forward_kl, reverse_kl, jsd, tvd, skew_kl,
            skew_reverse_kl).
        temperature: softmax temperature of both distributions in the divergence (not in the CE); no T^2 factor.
        ce_weight: w in [0, 1].
        kernel: backend of `kd.ops.dense_loss`: "auto" (Triton on CUDA, else the torch path with closed-form
            gradients, computed with the loss, and bounded fp32 memory), "triton", "torch", or "eager" for the plain
            `kd.losses.functional` formula (the spec; autograd through every op, full fp32 copies of the logits).
        sparse_tail: with a stored top-k teacher (``inputs.teacher_sparse``): "bucket" keeps its tail mass as one
            more bucket (the student's: 1 - its mass on the k ids), "renormalize" renormalizes both sides over the
            k ids and ignores the tail (axolotl's behaviour).
        **divergence_kwargs: the divergence's own knobs (``beta`` for jsd, ``alpha`` for the skew KLs).
    """

    needs_teacher = True
    needs_hidden_states = False
    supports_fused_linear = True
    teacher_signals = ("dense", "sparse")

    def __init__(self, divergence: str, temperature: float = 1.0, ce_weight: float = 0.0, kernel: str = "auto",
                 sparse_tail: str = "bucket", **divergence_kwargs: float):
        super().__init__()
        if divergence not in DIVERGENCES:
            raise UserError(f"unknown divergence {divergence!r}; valid: {', '.join(DIVERGENCES)}", key="loss.name")
        if temperature <= 0:
            raise UserError(f"temperature must be > 0, got {temperature}", key="loss.temperature")
        if not 0.0 <= ce_weight <= 1.0:
            raise UserError(f"ce_weight must be in [0, 1], got {ce_weight}", key="loss.ce_weight")
        _check_divergence_kwargs(divergence, divergence_kwargs)
        self.divergence = divergence
        self.temperature = float(temperature)
        self.ce_weight = float(ce_weight)
        self.divergence_kwargs = dict(divergence_kwargs)
        self.kernel = kernel
        self.sparse_tail = check_sparse_tail(sparse_tail)
        self._fn = DIVERGENCES[divergence]

    def forward(self, inputs: LossInputs) -> LossOutput:
        """Sum the mixed per-token loss over the loss tokens of this micro-batch."""
        if inputs.teacher_sparse is not None:
            return sparse_mix_with_ce("kd", inputs, divergence=self.divergence, temperature=self.temperature,
                                      ce_weight=self.ce_weight, kernel=self.kernel, tail=self.sparse_tail,
                                      **self.divergence_kwargs)
        if inputs.teacher_logits is None:
            raise ValueError(f"{self.divergence} needs teacher_logits or teacher_sparse (the trainer must run the "
                             "teacher or read its store)")
        if self.kernel == "eager":
            mask = loss_token_mask(inputs.labels)
            per_token = self._fn(inputs.student_logits, inputs.teacher_logits, temperature=self.temperature,
                                 **self.divergence_kwargs)
            return mix_with_ce("kd", masked_sum(per_token, mask), inputs, mask, self.ce_weight)
        return dense_mix_with_ce("kd", inputs, divergence=self.divergence, temperature=self.temperature,
                                 ce_weight=self.ce_weight, kernel=self.kernel, **self.divergence_kwargs)

    def term_names(self) -> tuple[str, ...]:
        return ("kd", "ce") if self.ce_weight > 0.0 else ("kd",)

    def fused_linear_loss(self, inputs: FusedLinearInputs) -> LossOutput:
        """The same loss from hidden states and lm_head weights (`kd.ops.fused_linear_divergence`: the logits exist
        only a block of rows at a time); against a stored top-k teacher, `kd.ops.fused_linear_sparse`."""
        if inputs.teacher_sparse is not None:
            return fused_linear_sparse_mix_with_ce("kd", inputs, divergence=self.divergence,
                                                   temperature=self.temperature, ce_weight=self.ce_weight,
                                                   kernel=self.kernel, tail=self.sparse_tail,
                                                   **self.divergence_kwargs)
        return fused_linear_mix_with_ce("kd", inputs, divergence=self.divergence, temperature=self.temperature,
                                 ce_weight=self.ce_weight, kernel=self.kernel, **self.divergence_kwargs)

    def extra_repr(self) -> str:
        extra = "".join(f", {k}={v}" for k, v in self.divergence_kwargs.items())
        return (f"divergence={self.divergence}, temperature={self.temperature}, ce_weight={self.ce_weight}{extra}, "
                f"sparse_tail={self.sparse_tail}")


class CrossEntropyLoss(DistillationLoss):
    """Plain next-token cross-entropy on the labels (no teacher): the fine-tuning baseline, ``loss.name: ce``."""

    needs_teacher = False
    needs_hidden_states = False

    def term_names(self) -> tuple[str, ...]:
        return ("ce",)

    def forward(self, inputs: LossInputs) -> LossOutput:
        """Sum the per-token CE over the loss tokens; ``teacher_logits`` is ignored (normally None)."""
        mask = loss_token_mask(inputs.labels)
        ce_sum = masked_sum(cross_entropy(inputs.student_logits, inputs.labels), mask)
        return LossOutput(loss_sum=ce_sum, num_tokens=mask.sum(), terms={"ce": ce_sum.detach()})
