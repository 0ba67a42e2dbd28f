"""The trained module (student + loss) and its DeepSpeed training engine.

The loss lives *inside* the module DeepSpeed trains, so a loss that owns parameters (TRG's projector) is sharded,
optimized and checkpointed by ZeRO together with the student, and non-tensor loss state (TAID's t) rides in the
module's state_dict through get_extra_state. "Student" is a role: competitive distillation can build two of these.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch

from kd.labels import shift
from kd.losses.base import DistillationLoss, FusedLinearInputs, LossInputs, LossOutput, SparseTarget
from kd.models.heads import LINEAR_HEAD_MODEL_TYPES, has_linear_head
from kd.teachers.base import TeacherOutput


class DistillationModule(torch.nn.Module):
    """Student + loss, the module DeepSpeed trains. ``fused_linear`` is `LossPath.fused_linear` (kd.engine.loss_path),
    the run's one decision about where the lm_heads run."""

    def __init__(self, student: torch.nn.Module, loss: DistillationLoss, vocab_size: int, *, fused_linear: bool = False):
        super().__init__()
        self.student = student
        self.loss = loss
        self.vocab_size = vocab_size
        self.fused_linear = fused_linear
        if fused_linear:
            check_fused_linear(loss, student.config.model_type, linear_head=has_linear_head(student))
            weight = student.get_output_embeddings().weight
            if hasattr(weight, "ds_id"):
                # ZeRO-3: the fused loss uses the lm_head weight outside the lm_head module, so DeepSpeed must gather
                # it for this module's forward *and* backward (where the kernel's weight gradient lands).
                import deepspeed

                deepspeed.zero.register_external_parameter(self, weight)

    def forward(self, batch: dict[str, torch.Tensor], teacher: TeacherOutput, step: int,
                teacher_head_weight: Optional[torch.Tensor] = None, grad_scale: Optional[float] = None) -> dict[str, Any]:
        """The micro-batch's `LossOutput` as a plain dict: DeepSpeed's ZeRO-3 hooks find the tensors of a returned
        dict (not of a dataclass), and its backward hook is what gathers parameters used outside their module.

        ``batch``: input_ids, attention_mask and labels, unshifted [B, L]. ``teacher``: the source's output for it
        (logits, or on the fused-linear path possibly final hidden states, whose head ``teacher_head_weight`` then
        runs inside the loss kernel; plus the intermediate hidden states a loss asked for). ``step``: the 1-based
        optimizer step being taken. ``grad_scale``: the factor backward will apply to the loss sum (world / global
        loss tokens), so one-pass losses store their gradient at that scale already (`LossInputs.grad_scale`)."""
        if self.fused_linear:
            out = self._fused_forward(batch, teacher, step, teacher_head_weight)
        else:
            out = self._logits_forward(batch, teacher, step, grad_scale)
        return {"loss_sum": out.loss_sum, "num_tokens": out.num_tokens, "terms": out.terms}

    def _logits_forward(self, batch: dict[str, torch.Tensor], teacher: TeacherOutput, step: int,
                        grad_scale: Optional[float]) -> LossOutput:
        want, layers = self.loss.needs_hidden_states, self.loss.student_hidden_layers
        out = self.student(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            output_hidden_states=list(layers) if want and layers is not None else want,
            use_cache=False,
        )
        return self.loss(
            LossInputs(
                student_logits=shift(out.logits, self.vocab_size),
                teacher_logits=shift(teacher.logits, self.vocab_size),
                labels=batch["labels"][:, 1:],
                teacher_sparse=sparse_target(teacher),
                student_hidden=self._selected(out.hidden_states) if want else None,
                teacher_hidden=_shift_all(teacher.hidden_states),
                step=step,
                grad_scale=grad_scale,
            )
        )

    def _fused_forward(self, batch: dict[str, torch.Tensor], teacher: TeacherOutput, step: int,
                       teacher_head_weight: Optional[torch.Tensor]) -> LossOutput:
        # The decoder alone: the student's head runs inside the loss kernel. (Called as a submodule of this module,
        # so ZeRO-3's hooks gather its parameters; the lm_head weight is registered as external in __init__.)
        want, layers = self.loss.needs_hidden_states, self.loss.student_hidden_layers
        decoder = getattr(self.student, self.student.base_model_prefix)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if want:  # the final norm output too: it is the last entry of hidden_states
            selection = list(dict.fromkeys([*layers, -1])) if layers is not None else True
            out = decoder(input_ids=ids, attention_mask=mask, output_hidden_states=selection, use_cache=False)
        else:
            out = decoder(input_ids=ids, attention_mask=mask, use_cache=False)
        return self.loss.fused_linear_loss(FusedLinearInputs(
            student_hidden=shift(out.last_hidden_state),
            student_weight=self.student.get_output_embeddings().weight,
            labels=batch["labels"][:, 1:],
            vocab_size=self.vocab_size,
            teacher_logits=shift(teacher.logits, self.vocab_size),
            teacher_sparse=sparse_target(teacher),
            teacher_hidden=shift(teacher.final_hidden),
            teacher_weight=teacher_head_weight,
            student_layers=self._selected(out.hidden_states) if want else None,
            teacher_layers=_shift_all(teacher.hidden_states),
            step=step,
        ))

    def _selected(self, hidden_states: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Only the entries the loss names, in its order (see DistillationLoss.student_hidden_layers), shifted."""
        layers = self.loss.student_hidden_layers
        return tuple(shift(hidden_states[i]) for i in layers) if layers is not None else _shift_all(hidden_states)


def sparse_target(teacher: TeacherOutput) -> Optional[SparseTarget]:
    """A sparse teacher output shifted like the logits (its ids already lie inside the shared vocabulary: a store
    is computed over the tokenizer's vocabulary, which the run's must equal)."""
    if teacher.kind != "sparse":
        return None
    return SparseTarget(ids=shift(teacher.topk_ids), logprobs=shift(teacher.topk_logprobs),
                        tail_logprob=shift(teacher.tail_logprob))


def _shift_all(tensors: Optional[tuple[torch.Tensor, ...]]) -> Optional[tuple[torch.Tensor, ...]]:
    return tuple(shift(t) for t in tensors) if tensors is not None else None


def check_fused_linear(loss: DistillationLoss, model_type: str, *, linear_head: bool = True) -> None:
    """Refuse ``loss.fused_linear`` for a loss without a fused form or a student whose logits are not a plain head.
    `kd validate` / `kd train` call it from the configs before launching; the engine again with the built model
    (``linear_head``: no bias on the lm_head)."""
    from kd.errors import UserError

    if not loss.supports_fused_linear:
        raise UserError(f"loss {type(loss).__name__} has no fused-linear form (the divergences and taid have, with or "
                        "without loss.trg); set loss.fused_linear: false", key="loss.fused_linear")
    if model_type not in LINEAR_HEAD_MODEL_TYPES or not linear_head:
        raise UserError(f"the fused-linear path needs a student whose logits are lm_head(final hidden state) "
                        f"({', '.join(LINEAR_HEAD_MODEL_TYPES)}, no bias), not {model_type!r}; set "
                        "loss.fused_linear: false", key="loss.fused_linear")


def lr_lambda(warmup_steps: int, total_steps: int, min_lr_ratio: float):
    """Linear warmup to the peak, then cosine decay to min_lr_ratio * peak at total_steps."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_engine(module: DistillationModule, ds_config: dict[str, Any], *, warmup_steps: int, total_steps: int, min_lr_ratio: float):
    """deepspeed.initialize for the trained module; returns the engine (optimizer and scheduler live inside it)."""
    import deepspeed

    def scheduler(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup_steps, total_steps, min_lr_ratio))

    params = [p for p in module.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=module, model_parameters=params, config=ds_config, lr_scheduler=scheduler)
    return engine
