"""A loss that turns NaN at chosen steps, to test non-finite handling through the real loss extension point
(`loss.name: tests.helpers.nan_loss.NaNAtSteps`, `loss.options: {steps: [2, 3]}`)."""
from __future__ import annotations

import torch

from kd.config.schema import LossConfig
from kd.losses import LossInputs, LossOutput
from kd.losses.divergence import DivergenceLoss


class NaNAtSteps(DivergenceLoss):
    def __init__(self, cfg: LossConfig, steps: list[int]):
        super().__init__("forward_kl", temperature=cfg.temperature)
        self.nan_steps = set(steps)

    def forward(self, inputs: LossInputs) -> LossOutput:
        out = super().forward(inputs)
        if inputs.step in self.nan_steps:  # inputs.step is the 1-based step being taken
            out.loss_sum = out.loss_sum * float("nan")
        return out


class _NaNGradient(torch.autograd.Function):
    """Identity forward; backward turns the gradient into NaN (an overflow inside backward, the loss itself finite)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class NaNGradientAtSteps(DivergenceLoss):
    """A finite loss whose gradient is NaN at the chosen (1-based) steps."""

    def __init__(self, cfg: LossConfig, steps: list[int]):
        super().__init__("forward_kl", temperature=cfg.temperature)
        self.nan_steps = set(steps)

    def forward(self, inputs: LossInputs) -> LossOutput:
        if inputs.step in self.nan_steps:
            inputs.student_logits = _NaNGradient.apply(inputs.student_logits)
        return super().forward(inputs)

