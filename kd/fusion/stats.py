"""What the fusion did on a batch, as sums and counts (so ranks and micro-batches add up), and the means to log.

Per batch, over the positions that count (the attention mask's real tokens):
    fusion/positions             number of positions
    fusion/weight_sum/{t}        sum of a*_t (expert t by its position in the recipe)
    fusion/active/{t}            positions where a*_t != 0 (single mode: where expert t was the one selected)
    fusion/objective_sum         sum of J(a*)
    fusion/kl_fused_large_sum    sum of KL(P~ || P), how far the fused model moved from the large base
`summary` turns summed stats into fusion/weight_mean/{t}, fusion/active_fraction/{t}, fusion/objective_mean and
fusion/kl_fused_large_mean.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch

from kd.fusion.solver import FusionResult

POSITIONS = "fusion/positions"


def stat_names(num_experts: int) -> list[str]:
    """The keys of `batch_stats`, in a fixed order (the same on every rank: all-reduce them as one vector)."""
    return ([POSITIONS] + [f"fusion/weight_sum/{t}" for t in range(num_experts)]
            + [f"fusion/active/{t}" for t in range(num_experts)] + ["fusion/objective_sum", "fusion/kl_fused_large_sum"])


def batch_stats(result: FusionResult, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The `stat_names` values as one fp64 vector on the result's device (no host sync); `mask` [N] selects the
    positions that count (None: all)."""
    weights = result.weights.double()
    keep = torch.ones(weights.shape[0], dtype=torch.float64, device=weights.device) if mask is None \
        else mask.reshape(-1).to(device=weights.device, dtype=torch.float64)
    return torch.cat([
        keep.sum().reshape(1),
        (weights * keep[:, None]).sum(0),
        ((weights != 0).double() * keep[:, None]).sum(0),
        (result.objective.double() * keep).sum().reshape(1),
        (result.kl_to_large.double() * keep).sum().reshape(1),
    ])


def summary(sums: Mapping[str, float]) -> dict[str, float]:
    """Means and fractions from (all-reduced) sums; empty when no position was counted."""
    count = sums.get(POSITIONS, 0.0)
    if count <= 0:
        return {}
    out = {}
    for key, value in sums.items():
        if key.startswith("fusion/weight_sum/"):
            out["fusion/weight_mean/" + key.rsplit("/", 1)[1]] = value / count
        elif key.startswith("fusion/active/"):
            out["fusion/active_fraction/" + key.rsplit("/", 1)[1]] = value / count
    out["fusion/objective_mean"] = sums["fusion/objective_sum"] / count
    out["fusion/kl_fused_large_mean"] = sums["fusion/kl_fused_large_sum"] / count
    return out
