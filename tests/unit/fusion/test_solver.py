"""kd.fusion.solver against a brute force written from the definition: a Python loop over positions and over every
candidate weight vector, the objective computed from softmaxes with plain sums, ties broken by kd.fusion.grid's rule
stated independently here. float64 inputs, so the batched and the looped arithmetic never disagree on a near-tie."""
from __future__ import annotations

import itertools

import pytest
import torch

from kd.errors import UserError
from kd.fusion.grid import grid_points
from kd.fusion.solver import DEFAULT_GRID, fuse_logits

N, V = 9, 17
SMALL_GRID = grid_points(0.0, 1.0, 0.25)  # 5 points: keeps the joint brute force (5 ** 3) quick


def logits(seed: int, experts: int = 2, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    large = 2 * torch.randn(N, V, generator=g, dtype=torch.float64)
    small = 2 * torch.randn(N, V, generator=g, dtype=torch.float64)
    # experts at different distances from the small base, so the best weights differ per expert and position
    exp = [small + (0.5 + t) * torch.randn(N, V, generator=g, dtype=torch.float64) for t in range(experts)]
    return large.to(dtype), small.to(dtype), [e.to(dtype) for e in exp]


def kl(a_logits: torch.Tensor, b_logits: torch.Tensor) -> float:
    """KL(softmax(a) || softmax(b)) of one row, from the definition."""
    p, q = torch.softmax(a_logits, -1), torch.softmax(b_logits, -1)
    return float((p * (p.log() - q.log())).sum())


def row_objective(zl, zs, zt, a) -> tuple[float, torch.Tensor]:
    f = zl + sum(c * (z - zs) for c, z in zip(a, zt))
    fwd, rev = kl(f, zl), kl(zl, f)
    return sum((fwd - kl(z, zs)) ** 2 + (rev - kl(zs, z)) ** 2 for z in zt), f


def preferred(a: tuple[float, ...]) -> tuple:
    """Smaller wins a tie: total |a|, then more weight on earlier experts, then positive before negative."""
    return (round(sum(abs(x) for x in a), 9), tuple(-abs(x) for x in a), tuple(-x for x in a))


def brute_best(zl, zs, zt, candidates):
    scored = [(row_objective(zl, zs, zt, a)[0], a) for a in candidates]
    best = min(j for j, _ in scored)
    return min((a for j, a in scored if j == best), key=preferred)


def single_candidates(grid, experts):
    return [tuple(c if u == t else 0.0 for u in range(experts)) for t in range(experts) for c in grid]


def coordinate_descent(zl, zs, zt, grid, sweeps=10):
    a = [0.0] * len(zt)
    for _ in range(sweeps):
        before = list(a)
        for t in range(len(zt)):
            a[t] = brute_best(zl, zs, zt, [tuple(c if u == t else a[u] for u in range(len(zt))) for c in grid])[t]
        if a == before:
            break
    return tuple(a)


def check(result, large, small, experts, expected_rows):
    for n, a in enumerate(expected_rows):
        assert tuple(result.weights[n].tolist()) == pytest.approx(a, abs=1e-12), f"row {n}"
        j, f = row_objective(large[n], small[n], [e[n] for e in experts], a)
        assert float(result.objective[n]) == pytest.approx(j, rel=1e-9, abs=1e-12)
        assert float(result.kl_to_large[n]) == pytest.approx(kl(f, large[n]), rel=1e-9, abs=1e-12)
        torch.testing.assert_close(result.logits[n], f, rtol=1e-12, atol=1e-12)


def test_single_matches_brute_force():
    large, small, experts = logits(0, experts=3)
    res = fuse_logits(large, small, experts, mode="single", grid=DEFAULT_GRID, compute_dtype=torch.float64)
    rows = [brute_best(large[n], small[n], [e[n] for e in experts], single_candidates(DEFAULT_GRID, 3))
            for n in range(N)]
    check(res, large, small, experts, rows)
    for n, a in enumerate(rows):
        active = [t for t, c in enumerate(a) if c != 0]
        assert int(res.selected[n]) == (active[0] if active else -1)
    assert len(set(res.selected.tolist())) > 1, "the test data should make different experts win"


@pytest.mark.parametrize("experts", [1, 2])
def test_joint_full_grid_matches_brute_force(experts):
    large, small, exp = logits(1, experts=experts)
    res = fuse_logits(large, small, exp, mode="joint", grid=SMALL_GRID, compute_dtype=torch.float64)
    rows = [brute_best(large[n], small[n], [e[n] for e in exp], list(itertools.product(SMALL_GRID, repeat=experts)))
            for n in range(N)]
    check(res, large, small, exp, rows)
    assert (res.selected == -1).all()
    if experts == 1:  # one expert: joint and single search the same candidates
        single = fuse_logits(large, small, exp, mode="single", grid=SMALL_GRID, compute_dtype=torch.float64)
        assert torch.equal(single.weights, res.weights)


def test_joint_coordinate_descent_matches_brute_force():
    large, small, exp = logits(2, experts=3)
    res = fuse_logits(large, small, exp, mode="joint", grid=SMALL_GRID, compute_dtype=torch.float64)
    rows = [coordinate_descent(large[n], small[n], [e[n] for e in exp], SMALL_GRID) for n in range(N)]
    check(res, large, small, exp, rows)
    assert any(sum(c != 0 for c in a) >= 2 for a in rows), "some position should use several experts"
    # a local minimum of the grid never worse than the large base alone
    zero = torch.tensor([row_objective(large[n], small[n], [e[n] for e in exp], (0, 0, 0))[0] for n in range(N)])
    assert (res.objective <= zero + 1e-12).all()


@pytest.mark.parametrize("weights", [None, (0.5, 1.5)])
def test_static_is_fixed_weights(weights):
    large, small, exp = logits(3)
    res = fuse_logits(large, small, exp, mode="static", static_weights=weights, compute_dtype=torch.float64)
    check(res, large, small, exp, [tuple(weights or (1.0, 1.0))] * N)


def test_zero_weight_is_the_large_base_exactly():
    large, small, exp = logits(4, dtype=torch.float32)
    res = fuse_logits(large, small, exp, mode="static", static_weights=(0.0, 0.0))
    assert torch.equal(res.logits, large)
    assert torch.equal(res.kl_to_large, torch.zeros(N))
    one_point = fuse_logits(large, small, exp, mode="single", grid=(0.0,))
    assert torch.equal(one_point.logits, large) and (one_point.selected == -1).all()


@pytest.mark.parametrize("mode", ["single", "joint"])
def test_expert_identical_to_small_base_leaves_large_base(mode):
    """z_t = z_S: every weight gives the large base and the same objective; the tie rule picks a = 0."""
    large, small, _ = logits(5, dtype=torch.float32)
    res = fuse_logits(large, small, [small.clone()], mode=mode)
    assert torch.equal(res.weights, torch.zeros(N, 1))
    assert torch.equal(res.logits, large)
    assert (res.selected == -1).all()
    assert torch.equal(res.objective, torch.zeros(N))


@pytest.mark.parametrize("mode", ["single", "joint", "static"])
def test_chunked_equals_unchunked(mode):
    large, small, exp = logits(6, experts=3 if mode == "joint" else 2, dtype=torch.float32)
    grid = SMALL_GRID if mode == "joint" else DEFAULT_GRID
    whole = fuse_logits(large, small, exp, mode=mode, grid=grid, chunk_rows=N)
    pieces = fuse_logits(large, small, exp, mode=mode, grid=grid, chunk_rows=2)  # 9 rows: chunks of 2 and a last 1
    assert torch.equal(whole.weights, pieces.weights)
    assert torch.equal(whole.selected, pieces.selected)
    torch.testing.assert_close(whole.logits, pieces.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(whole.objective, pieces.objective, rtol=1e-5, atol=1e-7)


def test_bf16_inputs():
    large, small, exp = logits(7, dtype=torch.bfloat16)
    res = fuse_logits(large, small, exp)
    assert res.logits.dtype == torch.bfloat16 and res.weights.dtype == torch.float32
    # the solver upcasts once, so it sees exactly the fp32 copies of the bf16 values
    ref = fuse_logits(large.float(), small.float(), [e.float() for e in exp])
    assert torch.equal(res.weights, ref.weights)
    torch.testing.assert_close(res.logits, ref.logits.to(torch.bfloat16), rtol=0, atol=0)
    unchanged = res.selected == -1
    assert torch.equal(res.logits[unchanged], large[unchanged])
    mixed = fuse_logits(large, small.float(), [exp[0], exp[1].float()])  # dtypes may differ between models
    assert torch.equal(mixed.weights, ref.weights) and mixed.logits.dtype == torch.bfloat16


def test_inputs_not_modified():
    large, small, exp = logits(8, dtype=torch.float32)
    copies = [t.clone() for t in (large, small, *exp)]
    fuse_logits(large, small, exp, mode="joint", grid=SMALL_GRID)
    assert all(torch.equal(a, b) for a, b in zip(copies, (large, small, *exp)))


@pytest.mark.parametrize("low,high,step,fragment", [
    (0.0, 2.0, 0.0, "step must be > 0"),
    (0.0, 2.0, -0.1, "step must be > 0"),
    (2.0, 0.0, 0.1, "below low"),
    (0.0, 2.0, 0.3, "whole number of steps"),
    (0.0, float("inf"), 0.1, "finite"),
    (0.0, 1.0, 1e-5, "at most"),
])
def test_bad_grids_refused(low, high, step, fragment):
    with pytest.raises(ValueError, match=fragment):
        grid_points(low, high, step)


def test_bad_solver_arguments_refused():
    large, small, exp = logits(9, dtype=torch.float32)
    cases = [
        (dict(experts=[]), "teacher.fusion.experts"),
        (dict(grid=()), "teacher.fusion.grid"),
        (dict(mode="static", static_weights=(1.0,)), "teacher.fusion.static_weights"),
        (dict(mode="best"), "teacher.fusion.mode"),
        (dict(chunk_rows=0), "teacher.fusion.chunk_rows"),
    ]
    for kwargs, key in cases:
        args = dict(experts=exp) | kwargs
        with pytest.raises(UserError) as err:
            fuse_logits(large, small, args.pop("experts"), **args)
        assert err.value.key == key
    with pytest.raises(ValueError, match="expert 0"):
        fuse_logits(large, small, [exp[0][:, :5]])


def paper_single(zl, zs, zt, grid):
    """The paper's one-expert search, literally: for each expert t the best a_t on the grid with the others at 0
    (ties: the smaller |a_t|), then the expert whose objective is lowest (ties: the earlier expert)."""
    best = None
    for t in range(len(zt)):
        scored = [(row_objective(zl, zs, zt, tuple(c if u == t else 0.0 for u in range(len(zt))))[0], abs(c), c)
                  for c in grid]
        j, _, c = min(scored)
        if best is None or j < best[0]:
            best = (j, tuple(c if u == t else 0.0 for u in range(len(zt))))
    return best[1]


def test_single_is_the_papers_two_stage_search():
    large, small, experts = logits(7, experts=3)
    res = fuse_logits(large, small, experts, mode="single", grid=DEFAULT_GRID, compute_dtype=torch.float64)
    rows = [paper_single(large[n], small[n], [e[n] for e in experts], DEFAULT_GRID) for n in range(N)]
    check(res, large, small, experts, rows)


def test_single_with_an_expert_equal_to_the_small_base_follows_the_other():
    """Expert 0 = the small base: its terms never change with a_0 (d_0 = 0), so a_0 = 0 always, and the search is
    the other expert's alone: a_1 where it lowers J below J(0) (a_1's own best), else a = 0."""
    large, small, experts = logits(8, experts=1)
    res = fuse_logits(large, small, [small.clone(), experts[0]], mode="single", grid=DEFAULT_GRID,
                      compute_dtype=torch.float64)
    alone = fuse_logits(large, small, [small.clone(), experts[0]], mode="joint", grid=(0.0,) + DEFAULT_GRID[1:],
                        compute_dtype=torch.float64)
    assert (res.weights[:, 0] == 0).all() and torch.equal(res.weights, alone.weights)
    rows = [paper_single(large[n], small[n], [small[n], experts[0][n]], DEFAULT_GRID) for n in range(N)]
    check(res, large, small, [small, experts[0]], rows)
    assert set(res.selected.tolist()) <= {-1, 1} and (res.selected == 1).any()


def test_single_with_two_identical_experts_picks_the_first():
    large, small, experts = logits(9, experts=1)
    res = fuse_logits(large, small, [experts[0], experts[0].clone()], mode="single", compute_dtype=torch.float64)
    assert (res.weights[:, 1] == 0).all() and (res.selected != 1).all() and (res.selected == 0).any()
