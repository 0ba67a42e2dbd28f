"""What the kernels and the losses agree on: which divergence, with which knobs, and the shapes of what comes back.

This module sits below both `kd.ops` (the kernels and the torch path) and `kd.losses` (the eager spec and the loss
classes): kd.ops never imports kd.losses (tests/kernels/test_dense_loss.py scans for it), kd.losses imports from here.
It needs torch only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from kd.labels import IGNORE_INDEX  # noqa: F401 - re-exported: the spec and the kernels use the same constant

# The divergences by recipe name (`loss.name`); kd.losses.functional.DIVERGENCES maps the same names to the eager
# formulas (a test checks the two agree). jsd takes `beta`, the skew ones `alpha`; all take `temperature`.
DIVERGENCE_NAMES = ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl")

Scalar = Union[float, Tensor]

# Row stride of every [rows, V] block the Triton kernels read or write: V rounded up to a multiple of 16 elements, so
# every row starts 16-aligned and loads and stores stay 128-bit vectors when V is not a multiple of 16 (the trainer
# cuts to the tokenizer's vocabulary, e.g. 151665 for Qwen2.5; kd.ops.row_math).
ROW_ALIGN = 16


def row_aligned_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """(an uninitialized ``shape`` tensor whose rows are padded to a multiple of ROW_ALIGN elements, the padded
    buffer it views). The padding columns are zeroed: kd's kernels never read them, but a GEMM given the view may
    (CPU bf16 ``torch.mm`` with a row stride wider than the row reads them, and multiplying uninitialized NaN by zero
    turned whole rows of a gradient into NaN). Zeroing costs ``rows x (width - V)`` elements, V >> width - V."""
    cols = shape[-1]
    width = -(-cols // ROW_ALIGN) * ROW_ALIGN
    flat = torch.empty(*shape[:-1], width, dtype=dtype, device=device)
    flat[..., cols:].zero_()
    return flat[..., :cols], flat


@dataclass(frozen=True)
class DivergenceSpec:
    """Which divergence, with its knobs: the per-row loss every path computes.

    ``beta`` is used by jsd, ``alpha`` by skew_kl / skew_reverse_kl; ``taid_t`` (float in [0, 1] or 0-dim tensor)
    swaps the teacher distribution for the TAID target softmax((1 - t) * stopgrad(z_s / T) + t * z_t / T).
    """

    name: str
    temperature: float = 1.0
    beta: float = 0.5
    alpha: float = 0.1
    taid_t: Optional[Scalar] = None

    def __post_init__(self) -> None:
        if self.name not in DIVERGENCE_NAMES:
            raise ValueError(f"unknown divergence {self.name!r}; valid: {', '.join(DIVERGENCE_NAMES)}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        for knob in ("beta", "alpha"):
            if not 0.0 <= getattr(self, knob) <= 1.0:
                raise ValueError(f"{knob} must be in [0, 1], got {getattr(self, knob)}")
        if isinstance(self.taid_t, (int, float)) and not 0.0 <= self.taid_t <= 1.0:
            raise ValueError(f"taid_t must be in [0, 1], got {self.taid_t}")
        # jsd's ends are the two KLs (TRL's GKD convention, kd.losses.functional.jsd), resolved here once so that
        # every path (chunked torch, Triton dense and fused) runs the KL itself rather than a mixture equal to one
        # side. (frozen dataclass: the resolved name is set through object.__setattr__, before anyone reads it.)
        if self.name == "jsd" and self.beta in (0.0, 1.0):
            object.__setattr__(self, "name", "forward_kl" if self.beta == 0.0 else "reverse_kl")

    def knobs(self) -> dict[str, float]:
        """The keyword arguments of the eager divergence besides temperature."""
        return {"jsd": {"beta": self.beta}, "skew_kl": {"alpha": self.alpha},
                "skew_reverse_kl": {"alpha": self.alpha}}.get(self.name, {})

    @property
    def log_beta(self) -> tuple[float, float]:
        """(log beta, log(1 - beta)) in float64 on the host: taken in fp32 from beta = 1e-6, log(1 - beta) would be
        off by ~6% (1 - 1e-6 rounds), and jsd near its ends depends on it (kd.losses.functional.jsd)."""
        return (math.log(self.beta) if self.beta > 0 else -math.inf,
                math.log1p(-self.beta) if self.beta < 1 else -math.inf)


@dataclass
class FusedLossOutput:
    """Result of a loss computed with its gradient in forward (fused-linear or dense one-pass). ``loss`` carries
    the gradient; the parts are detached, for logging.

    fused-linear: loss = ((1 - ce_weight) * kd_sum + ce_weight * ce_sum) / normalizer; dense: the same without the
    normalizer (a sum; the trainer scales it). ``ce_sum`` is 0 when ce_weight == 0 (the CE is not computed then).
    ``num_tokens`` counts the rows where ``mask`` is True.
    """

    loss: Tensor
    kd_sum: Tensor
    ce_sum: Tensor
    num_tokens: Tensor
