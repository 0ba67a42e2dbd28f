"""GlobalSampler: epochs are permutations, order is reproducible, resume and world size do not change the sequence."""
from __future__ import annotations

from collections import Counter

import pytest

from kd.data import GlobalSampler


def test_every_id_once_per_epoch_and_epochs_differ():
    sampler = GlobalSampler(37, seed=5)
    epochs = [[sampler.sample_id(e * 37 + i) for i in range(37)] for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(37))
    assert epochs[0] != epochs[1] != epochs[2]
    assert epochs[0] != list(range(37))


def test_no_shuffle_is_identity():
    sampler = GlobalSampler(10, seed=5, shuffle=False)
    assert [sampler.sample_id(g) for g in range(25)] == [g % 10 for g in range(25)]


def test_deterministic_and_seed_dependent():
    a = [GlobalSampler(50, seed=1).sample_id(g) for g in range(120)]
    b = [GlobalSampler(50, seed=1).sample_id(g) for g in range(120)]
    c = [GlobalSampler(50, seed=2).sample_id(g) for g in range(120)]
    assert a == b and a != c


def _run(sampler, g0, steps, *, world, mbs, accum):
    """Per step: for each rank, its micro-batches (what a run of `steps` steps starting at g0 would consume)."""
    out = []
    for step in range(steps):
        start = g0 + step * world * mbs * accum
        out.append([sampler.step_indices(start, rank=r, world_size=world, micro_batch_size=mbs, grad_accum=accum)
                    for r in range(world)])
    return out


def test_step_layout_matches_formula():
    sampler = GlobalSampler(1000, seed=0, shuffle=False)  # identity: ids are the g's themselves
    got = sampler.step_indices(40, rank=1, world_size=2, micro_batch_size=3, grad_accum=2)
    # micro-batch m of rank r: g0 + m * (world * mbs) + r * mbs + [0, mbs)
    assert got == [[43, 44, 45], [49, 50, 51]]


def test_resume_at_any_step_continues_the_same_sequence():
    n, world, mbs, accum = 23, 2, 2, 3
    global_batch = world * mbs * accum
    uninterrupted = _run(GlobalSampler(n, seed=9), 0, 10, world=world, mbs=mbs, accum=accum)
    for resume_step in (1, 4, 7):
        resumed = _run(GlobalSampler(n, seed=9), resume_step * global_batch, 10 - resume_step,
                       world=world, mbs=mbs, accum=accum)
        assert resumed == uninterrupted[resume_step:]


def test_world_size_change_keeps_each_steps_samples():
    # Same global batch (12) split as 1 rank x 6 x 2 and as 2 ranks x 3 x 2 and 4 ranks x 3 x 1.
    n = 30
    layouts = [(1, 6, 2), (2, 3, 2), (4, 3, 1)]
    per_step = []
    for world, mbs, accum in layouts:
        steps = _run(GlobalSampler(n, seed=4), 0, 8, world=world, mbs=mbs, accum=accum)
        per_step.append([sorted(i for rank in step for micro in rank for i in micro) for step in steps])
    assert per_step[0] == per_step[1] == per_step[2]
    # 8 steps x 12 = 96 samples = 3 full epochs of 30 + 6: every id 3 times, 6 of them a 4th time.
    counts = Counter(i for step in per_step[0] for i in step)
    assert sorted(counts) == list(range(n))
    assert sorted(counts.values()) == [3] * 24 + [4] * 6


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        GlobalSampler(0, seed=0)
    with pytest.raises(ValueError):
        GlobalSampler(5, seed=0).step_indices(0, rank=2, world_size=2, micro_batch_size=1, grad_accum=1)
