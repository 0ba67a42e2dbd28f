"""kd.fusion.stats: the a* histogram counts against a count written from the definition (masked positions left out),
their all-reduced form turned into per-expert histograms, and MetricsLogger writing them as TensorBoard histograms
that TensorBoard reads back with the same buckets and counts."""
from __future__ import annotations

import torch

from kd.fusion import stats as fstats
from kd.fusion.grid import grid_points
from kd.fusion.solver import fuse_logits


def test_histogram_counts_and_tensorboard_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    large, small = 2 * torch.randn(40, 23, generator=g), 2 * torch.randn(40, 23, generator=g)
    experts = [small + s * torch.randn(40, 23, generator=g) for s in (0.5, 1.5)]
    grid = grid_points(0.0, 2.0, 0.5)
    res = fuse_logits(large, small, experts, mode="single", grid=grid)
    mask = (torch.arange(40) % 3 != 0).long()
    values = fstats.weight_values(grid)
    names = fstats.stat_names(2, values)
    sums = dict(zip(names, fstats.batch_stats(res, mask, values).tolist()))
    hists = fstats.histograms(sums)
    for t in range(2):
        expected = [sum(1 for n in range(40) if mask[n] and float(res.weights[n, t]) == c) for c in values]
        assert hists[f"fusion/weight_hist/{t}"] == (list(values), [float(x) for x in expected])
        assert sum(expected) == int(mask.sum())  # every kept position falls in one bucket
    assert fstats.summary(sums).keys() == {"fusion/weight_mean/0", "fusion/weight_mean/1", "fusion/active_fraction/0",
                                           "fusion/active_fraction/1", "fusion/objective_mean",
                                           "fusion/kl_fused_large_mean"}  # the counts are no scalars

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from kd.metrics import MetricsLogger

    logger = MetricsLogger(str(tmp_path), enabled=True, total_steps=3, start_step=0, progress_bar=False,
                           log_interval=10)
    logger.log_histograms(3, hists)
    logger.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"histograms": 0})
    acc.Reload()
    assert set(acc.Tags()["histograms"]) == set(hists)
    for tag, (vals, counts) in hists.items():
        (event,) = acc.Histograms(tag)
        h = event.histogram_value
        assert event.step == 3 and h.num == sum(counts)
        assert list(h.bucket) == counts and list(h.bucket_limit) == [0.25, 0.75, 1.25, 1.75, 2.25]
        assert h.sum == sum(v * c for v, c in zip(vals, counts))
