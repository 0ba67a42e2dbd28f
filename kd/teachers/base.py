"""The teacher-source protocol."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Sequence

import torch


@dataclass
class TeacherOutput:
    """Teacher signal for one micro-batch, aligned with the *unshifted* input positions.

    logits: [B, L, V_teacher] (the trainer shifts and cuts to the shared vocabulary), no grad.
    hidden_states: when asked for, all layers' hidden states ([B, L, H] each, embeddings first), or only the entries
    named by ``layers`` in that order; else None.
    """

    logits: torch.Tensor
    hidden_states: Optional[tuple[torch.Tensor, ...]] = None


class TeacherSource(Protocol):
    """Anything that turns a batch into teacher outputs. Every rank must call it the same number of times per step:
    a ZeRO-3 sharded teacher gathers its parameters collectively during the forward."""

    def __call__(self, batch: dict[str, torch.Tensor], *, hidden_states: bool = False,
                 layers: Optional[Sequence[int]] = None) -> TeacherOutput: ...

    @property
    def vocab_size(self) -> int: ...
