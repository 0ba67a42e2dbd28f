"""The loss contract between the trainer and every distillation loss.

A loss receives one micro-batch's logits (and optionally hidden states) in `LossInputs` and returns *sums* over its
loss tokens in `LossOutput`. The trainer divides the sums once, by the global number of loss tokens of the whole
optimizer step (all micro-batches, all ranks). Losses never normalize: a per-micro-batch mean would weight short
micro-batches more than long ones under gradient accumulation and data parallelism (the mean-of-means bug).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from kd.losses.functional import IGNORE_INDEX


@dataclass
class SparseTarget:
    """A stored teacher signal (``kd precompute``): per position the teacher's top-k tokens and the mass left over,
    already shifted against ``labels`` like the logits.

    The divergences on it run over K + 1 buckets: the k tokens and one tail bucket holding everything else (teacher:
    ``exp(tail_logprob)``; student: 1 - its mass on the k ids), so no probability is dropped or renormalized away.
    ``logprobs`` are the teacher's log-softmax at the temperature the store was captured with, which the run's
    ``loss.temperature`` must equal (checked against the store's manifest before training).
    """

    ids: Tensor  # [B, L, K] long, token ids < vocab_size; ids of one position are distinct
    logprobs: Tensor  # [B, L, K] fp32, log p_teacher(ids)
    tail_logprob: Tensor  # [B, L] fp32, log(1 - sum_k p_k); -inf when the k tokens hold all the mass


@dataclass
class LossInputs:
    """What the trainer hands a loss for one micro-batch.

    The trainer has already shifted logits against labels (position i predicts ``labels[:, i]``) and cut both
    logits to the vocabulary shared by student and teacher.
    """

    student_logits: Tensor  # [B, L, V], requires grad
    teacher_logits: Optional[Tensor]  # [B, L, V], no grad; None when the loss sets needs_teacher = False
    labels: Tensor  # [B, L] next-token ids, IGNORE_INDEX (-100) where no loss
    student_hidden: Optional[tuple[Tensor, ...]] = None  # only when the loss sets needs_hidden_states: [B, L, H] each,
    # all layers (embeddings first) or those the loss names in student_hidden_layers / teacher_hidden_layers
    teacher_hidden: Optional[tuple[Tensor, ...]] = None
    step: int = 1  # the 1-based optimizer step being taken (as in metrics.jsonl and on_step_end), for schedules
    # The factor backward will bring to loss_sum: the trainer backpropagates loss_sum * world / global loss tokens.
    # Losses that compute their gradient in forward (the dense one-pass path, kd.ops.dense_loss) store it at this
    # scale so backward has nothing left to do; None (unknown): stored at 1 and rescaled in backward, one more pass.
    grad_scale: Optional[float] = None
    # a stored top-k teacher (teacher.store) instead of teacher_logits; only for losses with "sparse" in teacher_signals
    # (last, so positional construction written before it existed keeps its meaning)
    teacher_sparse: Optional[SparseTarget] = None


@dataclass
class FusedLinearInputs:
    """What the trainer hands a loss on the fused-linear path (``loss.fused_linear: true``) for one micro-batch: the
    final hidden states and lm_head weights instead of logits, already shifted against ``labels``.

    The teacher side is either ``teacher_hidden`` + ``teacher_weight`` (its lm_head runs inside the loss kernel, one
    block of rows at a time) or ``teacher_logits`` (a teacher whose logits are not a plain linear head).
    """

    student_hidden: Tensor  # [B, L, Hs] final (post-norm) hidden states, requires grad
    student_weight: Tensor  # [V', Hs] the student's lm_head weight (gathered when it is a ZeRO-3 shard)
    labels: Tensor  # [B, L] next-token ids, IGNORE_INDEX (-100) where no loss
    vocab_size: int  # logits past this row of either lm_head (padding) are not part of the loss
    teacher_hidden: Optional[Tensor] = None  # [B, L, Ht], no grad
    teacher_weight: Optional[Tensor] = None  # [V'', Ht], no grad
    teacher_logits: Optional[Tensor] = None  # [B, L, V''], no grad
    student_layers: Optional[tuple[Tensor, ...]] = None  # intermediate hidden states, as in LossInputs.student_hidden
    teacher_layers: Optional[tuple[Tensor, ...]] = None
    step: int = 1  # as LossInputs.step
    teacher_sparse: Optional[SparseTarget] = None  # a stored top-k teacher, as in LossInputs.teacher_sparse


@dataclass(frozen=True)
class LossContext:
    """Facts about the run a loss may need when it is built (sizes for a projector, the schedule length).

    The trainer fills it from the loaded models and the data; tests can build one by hand.
    """

    total_steps: int = 1
    student_hidden_size: int = 0
    teacher_hidden_size: int = 0
    student_num_layers: int = 0
    teacher_num_layers: int = 0


@dataclass
class LossOutput:
    """Sums over the micro-batch's loss tokens; the trainer divides all of them by the same global token count."""

    loss_sum: Tensor  # scalar fp32: SUM over loss tokens of the per-token total loss (never a mean)
    num_tokens: Tensor  # scalar long: loss tokens counted (labels != IGNORE_INDEX)
    terms: dict[str, Tensor] = field(default_factory=dict)  # scalar SUMS per named term, detached, for logging only


def loss_token_mask(labels: Tensor) -> Tensor:
    """Boolean mask of the positions that carry a loss (``labels != IGNORE_INDEX``)."""
    return labels != IGNORE_INDEX


def masked_sum(per_token: Tensor, mask: Tensor) -> Tensor:
    """Sum of ``per_token`` over the positions where ``mask`` is True, as an fp32 scalar.

    Selection (``torch.where``) rather than multiplication: a NaN or inf at an ignored position (e.g. a padded row)
    must not leak into the sum. No host sync: an all-ignored micro-batch simply sums to 0.
    """
    return torch.where(mask, per_token.float(), torch.zeros((), dtype=torch.float32, device=per_token.device)).sum()


class DistillationLoss(torch.nn.Module):
    """Base class of every loss the trainer can run.

    It is a ``torch.nn.Module`` so that a loss may own trainable parameters (a projector, fusion weights): the trainer
    places the loss inside the trained module, so ZeRO shards, optimizes and checkpoints those parameters with the
    student. Non-tensor state (schedules, momentum, the previous step's loss) belongs in ``get_extra_state`` /
    ``set_extra_state``, so that ``state_dict()`` / ``load_state_dict()`` carry it into every checkpoint. (This base
    does not override them: torch adds an ``_extra_state`` entry only for modules that do.)

    Subclasses set the class attributes below and implement ``forward``. Per-token losses should count tokens with
    `loss_token_mask` and sum with `masked_sum`.
    """

    needs_teacher: bool = True  # False: the trainer skips the teacher forward (plain fine-tuning)
    needs_hidden_states: bool = False  # True: the trainer fills LossInputs.student_hidden / teacher_hidden
    # With needs_hidden_states: the entries of HF's `hidden_states` the loss reads (0 = embeddings, i = after layer i,
    # the last = after the final norm; negative counts from the end), in the order it wants them in LossInputs.
    # None = all of them. The teacher captures only these (transformers keeps just the selected layers' outputs).
    student_hidden_layers: Optional[tuple[int, ...]] = None
    teacher_hidden_layers: Optional[tuple[int, ...]] = None
    # True: `fused_linear_loss` computes the same loss from hidden states and lm_head weights (loss.fused_linear).
    supports_fused_linear: bool = False
    # The teacher signals `forward` reads (`kd.teachers.TeacherOutput.kind`): "dense" logits; a loss on a stored top-k
    # signal says "sparse". The run refuses a teacher source that produces none of them before training starts.
    teacher_signals: tuple[str, ...] = ("dense",)

    def forward(self, inputs: LossInputs) -> LossOutput:  # pragma: no cover - abstract
        """Return the micro-batch's loss sum, loss-token count and per-term sums (see `LossOutput`)."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward(inputs) -> LossOutput")

    def fused_linear_loss(self, inputs: FusedLinearInputs) -> LossOutput:  # pragma: no cover - abstract
        """The loss of `forward` from `FusedLinearInputs` (only for losses that set ``supports_fused_linear``)."""
        raise NotImplementedError(f"{type(self).__name__} has no fused-linear form")

    def term_names(self) -> Optional[tuple[str, ...]]:
        """The keys of `LossOutput.terms`, in order, fixed when the loss is built (they may depend on its config, never
        on the data). The trainer stacks every micro-batch's terms and all-reduces them as one tensor, so every
        micro-batch on every rank must return exactly these; it checks and stops with a clear error otherwise.
        None (the default, for losses written before this existed): the names of the first micro-batch are taken
        as the declaration."""
        return None

    def on_step_end(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        """Called once per optimizer step (never during eval) after the step, with globally reduced metrics.

        ``metrics["loss"]`` is the step's loss averaged over all loss tokens of all ranks; every rank receives the
        same values, so state updated here stays identical across ranks. Returns extra scalars to log (e.g. a
        schedule's current value). Default: no state, nothing to log.
        """
        return {}


def mix_with_ce(name: str, div_sum: Tensor, inputs: "LossInputs", mask: Tensor, ce_weight: float) -> "LossOutput":
    """``(1 - w) * divergence + w * CE`` summed over loss tokens, with both parts as logging terms. The CE (another
    fp32 pass over the logits) is only computed when w > 0."""
    from kd.losses.functional import cross_entropy

    terms = {name: div_sum.detach()}
    loss_sum = div_sum
    if ce_weight > 0.0:
        ce_sum = masked_sum(cross_entropy(inputs.student_logits, inputs.labels), mask)
        terms["ce"] = ce_sum.detach()
        loss_sum = (1.0 - ce_weight) * div_sum + ce_weight * ce_sum
    return LossOutput(loss_sum=loss_sum, num_tokens=mask.sum(), terms=terms)


def fused_linear_mix_with_ce(name: str, inputs: FusedLinearInputs, *, divergence: str, temperature: float,
                             ce_weight: float, kernel: str, **divergence_kwargs) -> LossOutput:
    """`mix_with_ce` on the fused-linear path: ``(1 - w) * divergence + w * CE`` summed over loss tokens by
    `kd.ops.fused_linear_divergence` (the CE comes out of the same pass over each block of logits, so it is free)."""
    from kd.ops import fused_linear_divergence

    mask = loss_token_mask(inputs.labels)
    out = fused_linear_divergence(
        inputs.student_hidden, inputs.student_weight, mask, inputs.labels, teacher_hidden=inputs.teacher_hidden,
        teacher_weight=inputs.teacher_weight, teacher_logits=inputs.teacher_logits, divergence=divergence,
        temperature=temperature, ce_weight=ce_weight, vocab_size=inputs.vocab_size,
        backend="torch" if kernel == "eager" else kernel, **divergence_kwargs)
    terms = {name: out.kd_sum}
    if ce_weight > 0.0:
        terms["ce"] = out.ce_sum
    return LossOutput(loss_sum=out.loss, num_tokens=out.num_tokens, terms=terms)
