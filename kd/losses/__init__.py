"""Distillation losses: the eager divergences (the spec), the loss contract, and the recipe-name registry.

    from kd.losses import build_loss, LossInputs
    loss = build_loss(recipe.loss)            # a DistillationLoss (a torch Module)
    out = loss(LossInputs(student_logits, teacher_logits, labels))
    # out.loss_sum / out.terms are sums; the trainer divides by the global loss-token count of the step
"""
from kd.losses.base import (DistillationLoss, FusedLinearInputs, LossContext, LossInputs, LossOutput, SparseTarget,
                            loss_token_mask, masked_sum)
from kd.losses.divergence import CrossEntropyLoss, DivergenceLoss
from kd.losses.functional import DIVERGENCES, IGNORE_INDEX


__all__ = [
    "DIVERGENCES", "IGNORE_INDEX", "CrossEntropyLoss", "DistillationLoss", "DivergenceLoss", "FusedLinearInputs",
    "LossContext", "LossInputs", "LossOutput", "SparseTarget", "build_loss", "loss_token_mask", "masked_sum", "valid_names",
]


def __getattr__(name: str):
    # The registry imports the recipe schema (pydantic); loaded on first use so that the kernels and the eager
    # losses import with torch alone (tools/bench_kernels.py on a bare GPU machine).
    if name in ("build_loss", "valid_names"):
        from kd.losses import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'kd.losses' has no attribute {name!r}")
