"""The teacher-source protocol."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ContextManager, Optional, Protocol, Sequence

import torch


@dataclass
class TeacherOutput:
    """Teacher signal for one micro-batch, aligned with the *unshifted* input positions.

    logits: [B, L, V_teacher] (the trainer shifts and cuts to the shared vocabulary), no grad; None when the source
    was asked for its final hidden states instead (``logits=False``: the fused-linear path applies the head itself).
    hidden_states: when asked for, all layers' hidden states ([B, L, H] each, embeddings first), or only the entries
    named by ``layers`` in that order; else None.
    final_hidden: [B, L, H] final (post-norm) hidden states, only with ``logits=False``.
    """

    logits: Optional[torch.Tensor]
    hidden_states: Optional[tuple[torch.Tensor, ...]] = None
    final_hidden: Optional[torch.Tensor] = None


class TeacherSource(Protocol):
    """Anything that turns a batch into teacher outputs. Every rank must call it the same number of times per step:
    a ZeRO-3 sharded teacher gathers its parameters collectively during the forward."""

    def __call__(self, batch: dict[str, torch.Tensor], *, hidden_states: bool = False,
                 layers: Optional[Sequence[int]] = None, logits: bool = True) -> TeacherOutput: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def has_linear_head(self) -> bool:
        """True when logits = final_hidden @ head weight^T exactly, so ``logits=False`` + `head_weight` may stand
        in for the logits."""
        ...

    def head_weight(self) -> ContextManager[torch.Tensor]:
        """A context holding the full lm_head weight [V_teacher, H] (gathered from its ZeRO-3 shards, collectively:
        every rank must enter it the same number of times)."""
        ...
