"""The weight grid of the fusion search and the candidate weight vectors each mode tries, in preference order.

Pure Python (the recipe schema validates grids with it, before torch is imported).

Tie rule. The solver keeps the *first* candidate with the lowest objective (strict `<` while scanning), so the order
of the candidates is the tie rule. Candidates are ordered by
    1. the total weight sum_t |a_t|, smallest first;
    2. then (|a_0|, |a_1|, ...) compared in order, larger first: weight on an earlier expert (by its position in the
       recipe) is preferred, so in single mode expert 0 wins a tie with expert 1;
    3. then (a_0, a_1, ...) compared in order, larger first: positive before negative (only for negative bounds).
Consequences: a flat objective (every candidate equally good, e.g. the only expert is identical to the small base,
so z_t - z_S = 0 and every a gives the large base) picks a = 0, the large base unchanged; and a = 0 is tried first in
every mode, so the fused model only leaves the large base when that strictly lowers the objective.
"""
from __future__ import annotations

import itertools
import math
from typing import Sequence

DEFAULT_LOW, DEFAULT_HIGH, DEFAULT_STEP = 0.0, 2.0, 0.1
# More points than this is almost surely a typo'd step (0.001 instead of 0.1), and each point costs a pass over V.
MAX_POINTS = 1001
# The full joint grid has G**T candidates; past this many experts the joint mode uses coordinate descent instead.
FULL_JOINT_MAX_EXPERTS = 2


def grid_points(low: float = DEFAULT_LOW, high: float = DEFAULT_HIGH, step: float = DEFAULT_STEP) -> tuple[float, ...]:
    """low, low + step, ..., high. Raises ValueError (with the reason) unless the bounds are finite, low <= high,
    step > 0 and high - low is a whole number of steps (so both bounds are on the grid), with at most MAX_POINTS
    points. low == high is a one-point grid (a fixed weight)."""
    if not all(math.isfinite(v) for v in (low, high, step)):
        raise ValueError(f"grid bounds and step must be finite numbers (got low={low}, high={high}, step={step})")
    if step <= 0:
        raise ValueError(f"grid step must be > 0 (got {step})")
    if high < low:
        raise ValueError(f"grid high ({high}) is below low ({low}): no weight lies between them")
    steps = (high - low) / step
    count = round(steps)
    # relative tolerance: 2.0 / 0.1 is 20.000000000000004 in floating point
    if abs(steps - count) > 1e-6 * max(1.0, steps):
        raise ValueError(f"high - low = {high - low:g} is not a whole number of steps of {step:g}, so `high` would not "
                         "be on the grid; change step or the bounds")
    if count + 1 > MAX_POINTS:
        raise ValueError(f"the grid [{low:g}, {high:g}] with step {step:g} has {count + 1} points (at most {MAX_POINTS}); "
                         "use a larger step")
    # round: 0.30000000000000004 -> 0.3, so the points are the decimals the user wrote
    return tuple(round(low + i * step, 12) for i in range(count + 1))


def preference_order(values: Sequence[float]) -> list[float]:
    """One expert's grid values in tie-breaking order: smallest |c| first, positive before negative."""
    return sorted(set(values), key=lambda c: (abs(c), -c))


def single_candidates(values: Sequence[float], num_experts: int) -> list[tuple[float, ...]]:
    """The paper's search: one expert active (a = c * e_t), every expert, every grid value; a = 0 once, first.
    T * (G - 1) + 1 candidates when 0 is on the grid (else T * G), in tie-breaking order."""
    # a = 0 only when 0 is on the grid: a grid [0.5, 2] asks the active expert for at least 0.5
    out = [(0.0,) * num_experts] if 0 in values else []
    for t in range(num_experts):
        for c in preference_order(values):
            if c != 0:
                out.append(tuple(c if u == t else 0.0 for u in range(num_experts)))
    return _by_total_weight(out)


def joint_candidates(values: Sequence[float], num_experts: int) -> list[tuple[float, ...]]:
    """Every combination of grid values (G ** T candidates), in tie-breaking order."""
    return _by_total_weight(list(itertools.product(sorted(set(values)), repeat=num_experts)))


def tie_key(a: Sequence[float]) -> tuple:
    """The sort key of the tie rule (module docstring): smaller keys win ties."""
    # round: sums of grid decimals (0.1 + 0.2) must compare equal to the grid value they add up to (0.3)
    return (round(sum(abs(x) for x in a), 9), tuple(-abs(x) for x in a), tuple(-x for x in a))


def _by_total_weight(candidates: list[tuple[float, ...]]) -> list[tuple[float, ...]]:
    return sorted(candidates, key=tie_key)
