"""Generation from kd's engines: the one call a producer (on-policy distillation, sequence-level KD, `kd generate`)
makes, given a model and a batch of left-padded prompts.

    target = student_target(engine)             # the student inside the trained DistillationModule, any ZeRO stage
    target = teacher_target(teacher_source)     # a ModelTeacher: ZeRO-3 inference engine or replica
    out = generate(target, ids, mask, sampler=sampler, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id)
    batch = out.training_batch()                # prompt + completion, loss on the completion only

Collective under ZeRO-3: every rank calls `generate` the same number of times (a rank with nothing to generate passes
a filler row with ``active=False``); the ranks stay in lockstep inside it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from kd.generation.decode import Completions, LogitsProcessor, decode
from kd.generation.gather import GatherMode, rollout
from kd.generation.sampling import Sampler


@dataclass(frozen=True)
class Target:
    """A Hugging Face causal LM to generate with, and the DeepSpeed engine that owns its parameters (None for a
    plain module)."""

    model: torch.nn.Module
    engine: Optional[Any] = None


def student_target(engine: Any) -> Target:
    """The student of a kd training engine (engine.module is the DistillationModule: student + loss)."""
    return Target(engine.module.student, engine)


def teacher_target(source: Any) -> Target:
    """A `kd.teachers.model.ModelTeacher` (sharded engine or replica)."""
    return Target(source.module, source.engine)


def generate(target: Target | torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
             sampler: Sampler, eos_ids: Sequence[int], pad_id: int, gather: GatherMode = "auto",
             vocab_size: Optional[int] = None, active: Optional[torch.Tensor] = None,
             logits_processor: Optional[LogitsProcessor] = None) -> Completions:
    """Completions for left-padded prompts [B, P] (see kd.generation.decode.decode for the arguments). Parameters are
    gathered once for the whole call when ``gather`` allows (kd.generation.gather); train/eval flags and DeepSpeed's
    hooks are as before when it returns."""
    if isinstance(target, torch.nn.Module):
        target = Target(target)
    with rollout(target.model, engine=target.engine, gather=gather) as r:
        return decode(r.model, input_ids, attention_mask, sampler=sampler, eos_ids=eos_ids, pad_id=pad_id,
                      vocab_size=vocab_size, active=active, logits_processor=logits_processor,
                      forward_hook=r.before_forward)
