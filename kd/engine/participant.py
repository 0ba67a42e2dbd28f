"""A trainable participant of a run: a model on its own DeepSpeed training engine, with its own checkpoint
directory, playing a role ("student" today; competitive distillation trains a second model and swaps which one is
the student and which the teacher between phases, so the role is a field, not an attribute name)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Participant:
    role: str  # "student" / "teacher": what it is in the current phase
    engine: Any  # deepspeed engine around a DistillationModule (the model + the loss it trains with)
    ckpt_dir: str  # where its DeepSpeed tags live (a subdirectory per participant when there are two)
