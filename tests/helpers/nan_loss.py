"""A loss that turns NaN at chosen steps, to test non-finite handling through the real loss extension point
(`loss.name: tests.helpers.nan_loss.NaNAtSteps`, `loss.options: {steps: [2, 3]}`)."""
from __future__ import annotations

from kd.config.schema import LossConfig
from kd.losses import LossInputs, LossOutput
from kd.losses.divergence import DivergenceLoss


class NaNAtSteps(DivergenceLoss):
    def __init__(self, cfg: LossConfig, steps: list[int]):
        super().__init__("forward_kl", temperature=cfg.temperature)
        self.nan_steps = set(steps)

    def forward(self, inputs: LossInputs) -> LossOutput:
        out = super().forward(inputs)
        if inputs.step + 1 in self.nan_steps:  # inputs.step counts completed steps
            out.loss_sum = out.loss_sum * float("nan")
        return out
