"""What the fusion did on a batch, as sums and counts (so ranks and micro-batches add up), and the means to log.

Per batch, over the positions that count (the attention mask's real tokens):
    fusion/positions             number of positions
    fusion/weight_sum/{t}        sum of a*_t (expert t by its position in the recipe)
    fusion/active/{t}            positions where a*_t != 0 (single mode: where expert t was the one selected)
    fusion/objective_sum         sum of J(a*)
    fusion/kl_fused_large_sum    sum of KL(P~ || P), how far the fused model moved from the large base
    fusion/weight_count/{t}/{c}  positions where a*_t == c, for every weight c the search can give (the histogram)
`summary` turns summed stats into fusion/weight_mean/{t}, fusion/active_fraction/{t}, fusion/objective_mean and
fusion/kl_fused_large_mean (scalars); `histograms` turns the counts into one a* histogram per expert
(fusion/weight_hist/{t}, written as TensorBoard histograms).
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch

from kd.fusion.solver import FusionResult

POSITIONS = "fusion/positions"


COUNT = "fusion/weight_count/"


def stat_names(num_experts: int, values: Sequence[float] = ()) -> list[str]:
    """The keys of `batch_stats`, in a fixed order (the same on every rank: all-reduce them as one vector).
    ``values``: the weights a*_t can take (the grid, or the static weights), sorted; one count per expert and value."""
    return ([POSITIONS] + [f"fusion/weight_sum/{t}" for t in range(num_experts)]
            + [f"fusion/active/{t}" for t in range(num_experts)] + ["fusion/objective_sum", "fusion/kl_fused_large_sum"]
            + [f"{COUNT}{t}/{c:g}" for t in range(num_experts) for c in values])


def weight_values(grid: Sequence[float], static_weights: Optional[Sequence[float]] = None) -> list[float]:
    """Every weight the search can give an expert: the grid's, or the static ones (sorted, no repeats)."""
    return sorted(set(static_weights if static_weights is not None else grid))


def batch_stats(result: FusionResult, mask: Optional[torch.Tensor] = None, values: Sequence[float] = ()) -> torch.Tensor:
    """The `stat_names` values as one fp64 vector on the result's device (no host sync); `mask` [N] selects the
    positions that count (None: all); ``values`` as for `stat_names`. The weights are compared exactly: the solver
    takes them from tables built from the same floats, in its compute dtype."""
    weights = result.weights.double()
    keep = torch.ones(weights.shape[0], dtype=torch.float64, device=weights.device) if mask is None \
        else mask.reshape(-1).to(device=weights.device, dtype=torch.float64)
    return torch.cat([
        keep.sum().reshape(1),
        (weights * keep[:, None]).sum(0),
        ((weights != 0).double() * keep[:, None]).sum(0),
        (result.objective.double() * keep).sum().reshape(1),
        (result.kl_to_large.double() * keep).sum().reshape(1),
        _counts(result.weights, keep, values),
    ])


def _counts(weights: torch.Tensor, keep: torch.Tensor, values: Sequence[float]) -> torch.Tensor:
    """[T * len(values)]: per expert (outer) and value (inner), the kept positions where a*_t equals the value."""
    if not values:
        return keep.new_zeros(0)
    table = torch.tensor(list(values), dtype=weights.dtype, device=weights.device)
    hits = (weights[:, :, None] == table[None, None, :]).double()  # [N, T, G]: small (T x G is ~40)
    return (hits * keep[:, None, None]).sum(0).reshape(-1)


def histograms(sums: Mapping[str, float]) -> dict[str, tuple[list[float], list[float]]]:
    """{"fusion/weight_hist/{t}": (values, counts)} from (all-reduced) sums; empty when nothing was counted."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    for key, count in sums.items():
        if key.startswith(COUNT):
            t, value = key[len(COUNT):].split("/")
            values, counts = out.setdefault(f"fusion/weight_hist/{t}", ([], []))
            values.append(float(value))
            counts.append(count)
    return {tag: hist for tag, hist in out.items() if sum(hist[1]) > 0}


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
