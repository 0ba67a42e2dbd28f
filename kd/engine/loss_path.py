"""Which path a step's loss takes, decided once per run: logits, or the fused-linear path (`loss.fused_linear`:
the lm_heads run inside the loss kernel a block of rows at a time, no [N, V] logits), and what that means for the
teacher request. The trained module, the step runner, preflight and tools/bench_step.py all read this one decision.
"""
from __future__ import annotations

from dataclasses import dataclass

from kd.losses.base import DistillationLoss
from kd.teachers.base import TeacherInfo, TeacherRequest


@dataclass(frozen=True)
class LossPath:
    fused_linear: bool  # the student's head runs inside the loss (DistillationModule feeds it hidden states)
    teacher_head_in_loss: bool  # the teacher's head too: the teacher hands over final hidden states + head weight
    request: TeacherRequest  # what every micro-batch asks of the teacher source (ignored without needs_teacher)
    needs_teacher: bool

    def describe(self) -> str:
        if not self.fused_linear:
            return "logits"
        return "fused-linear (student and teacher heads in the loss)" if self.teacher_head_in_loss else \
            "fused-linear (student head in the loss, teacher logits)"


def decide(loss: DistillationLoss, *, fused_linear: bool, teacher: TeacherInfo) -> LossPath:
    """The path for `loss` with the recipe's ``loss.fused_linear`` against a teacher source. The teacher's head joins
    the kernel only when its logits are a plain linear head of its final hidden state; otherwise it hands over its
    logits (the caller says so to the user)."""
    if loss.needs_teacher and not set(loss.teacher_signals) & set(teacher.signals):
        from kd.errors import UserError

        raise UserError(f"loss {type(loss).__name__} reads a teacher signal of kind {'/'.join(loss.teacher_signals)}, "
                        f"but the teacher {teacher.name!r} produces {'/'.join(teacher.signals)}; pick a loss or a "
                        "teacher source that fit", key="loss.name")
    head_in_loss = fused_linear and loss.needs_teacher and teacher.has_linear_head and "hidden" in teacher.signals
    # a source that has no dense logits (a teacher store) is asked for what it has
    signal = "hidden" if head_in_loss else "dense" if "dense" in teacher.signals else "sparse"
    request = TeacherRequest(signal=signal, hidden=loss.needs_hidden_states, hidden_layers=loss.teacher_hidden_layers)
    return LossPath(fused_linear=fused_linear, teacher_head_in_loss=head_in_loss, request=request,
                    needs_teacher=loss.needs_teacher)
