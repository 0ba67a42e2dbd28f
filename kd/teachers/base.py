"""The teacher-source contract: what a source tells the trainer about itself, what the trainer asks of it per
micro-batch, and what it hands back.

A new kind of teacher (several models fused per token, an offline top-k store) is a class with `info`, `__call__`
and `head_weight`, plus a branch in `kd.teachers.factory.build_teacher_source` that builds it from the recipe. The
trainer, the step runner and the losses only ever see these three types.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ContextManager, Literal, Optional, Protocol, Sequence

import torch

SignalKind = Literal["dense", "hidden", "sparse"]


@dataclass(frozen=True)
class TeacherInfo:
    """Facts about a teacher source, known before any forward.

    ``config`` is the Hugging Face config of the model behind the source, when there is one (for the vocabulary and
    position checks of `kd.preflight.check_compatible`); a store or a fusion of models gives the config its logits
    follow. ``hidden_size`` / ``num_layers`` size the projectors of hidden-state losses (TRG). ``has_linear_head``:
    logits = final_hidden @ head_weight^T exactly, so the fused-linear path may run the head inside the loss kernel.
    ``signals``: what the source can produce (`TeacherOutput.kind`).
    """

    name: str  # for messages: a path, or what the source is made of
    vocab_size: int
    hidden_size: int
    num_layers: int
    has_linear_head: bool
    config: Any = None
    signals: tuple[SignalKind, ...] = ("dense",)


@dataclass(frozen=True)
class TeacherRequest:
    """What the step asks of the teacher for one micro-batch; decided once per run (see kd.engine.loss_path).

    ``hidden_layers``: entries of HF's ``hidden_states`` the loss reads (0 = embeddings, negative from the end), in
    its order; None with ``hidden=True`` means all of them. ``signal``: "dense" for logits, "hidden" for the final
    (post-norm) hidden states instead (the fused-linear path applies the head itself), "sparse" for top-k log-probs.
    """

    signal: SignalKind = "dense"
    hidden: bool = False
    hidden_layers: Optional[tuple[int, ...]] = None


@dataclass
class TeacherOutput:
    """Teacher signal for one micro-batch, aligned with the *unshifted* input positions, no grad.

    Exactly one form is filled, named by `kind`:
    - dense: ``logits`` [B, L, V_teacher] (the trained module shifts and cuts them to the shared vocabulary);
    - hidden: ``final_hidden`` [B, L, H] final-norm hidden states, for a head applied inside the loss kernel;
    - sparse: ``topk_ids`` [B, L, K] (long), ``topk_logprobs`` [B, L, K] (log p of those tokens, fp32) and
      ``tail_logprob`` [B, L] (log of the probability mass outside the top k), for a stored top-k signal, with
      ``label_logprob``.
    ``hidden_states``: the intermediate hidden states a loss asked for (`TeacherRequest.hidden_layers`), any form.
    ``kind`` is None only for a loss that needs no teacher.
    """

    logits: Optional[torch.Tensor] = None
    hidden_states: Optional[tuple[torch.Tensor, ...]] = None
    final_hidden: Optional[torch.Tensor] = None
    topk_ids: Optional[torch.Tensor] = None
    topk_logprobs: Optional[torch.Tensor] = None
    tail_logprob: Optional[torch.Tensor] = None
    label_logprob: Optional[torch.Tensor] = None  # sparse only: [B, L] log p of each position's next label (held-out
    # teacher perplexity; 0 where the position has no label)

    @property
    def kind(self) -> Optional[SignalKind]:
        if self.logits is not None:
            return "dense"
        if self.final_hidden is not None:
            return "hidden"
        if self.topk_ids is not None:
            return "sparse"
        return None


NO_TEACHER = TeacherOutput()


class TeacherSource(Protocol):
    """Anything that turns a batch into teacher outputs. Every rank calls it the same number of times per step, with
    the same request: a ZeRO-3 sharded teacher gathers its parameters collectively during the forward."""

    @property
    def info(self) -> TeacherInfo: ...

    def __call__(self, batch: dict[str, torch.Tensor], request: TeacherRequest = TeacherRequest()) -> TeacherOutput:
        ...

    def head_weight(self) -> ContextManager[torch.Tensor]:
        """A context holding the full lm_head weight [V_teacher, H] (gathered from its ZeRO-3 shards, collectively:
        every rank enters it the same number of times). Only for sources whose ``info.has_linear_head``."""
        ...


def hidden_selection(request: TeacherRequest) -> Optional[Sequence[int]]:
    """The layer indices to keep when a request selects some, else None (all, or none)."""
    return list(request.hidden_layers) if request.hidden and request.hidden_layers is not None else None
