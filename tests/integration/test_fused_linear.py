"""The fused-linear path (student and teacher lm_heads inside the loss kernel) trains exactly like the dense path, with
a ZeRO-3 student whose lm_head weight is a shard gathered for the loss's forward and backward, and a ZeRO-3 teacher
whose lm_head weight is gathered for the loss's forward."""
from __future__ import annotations

import pytest

from tests.helpers.tiny_run import make_tiny_run
from tests.integration.conftest import run_kd, train_records

# slow: the fused-linear path is opt-in (loss.fused_linear) and its math is covered by tests/kernels; this run pair
# checks the ZeRO-3 wiring end to end
pytestmark = [pytest.mark.integration, pytest.mark.slow]


LOSSES = {
    "jsd+ce": ({"name": "jsd", "beta": 0.3, "ce_weight": 0.2, "temperature": 1.5}, ("loss", "grad_norm", "train/kd",
                                                                                   "train/ce")),
    "taid+trg": ({"name": "taid", "trg": {"layers": "mapped", "nodes_per_sequence": 4, "k": 2}},
                 ("loss", "grad_norm", "train/taid", "train/trg/global", "train/trg/local", "train/trg/context")),
}


@pytest.mark.parametrize("case", LOSSES)
def test_fused_linear_matches_dense_under_zero3(tmp_path, case):
    loss, keys = LOSSES[case]
    records = {}
    for fused in (False, True):
        root = tmp_path / ("fused" if fused else "dense")
        recipe = make_tiny_run(
            root, student={"init_from_teacher_layers": [0, 2], "zero_stage": 3},
            loss={**loss, "fused_linear": fused},
            train={"max_steps": 3, "micro_batch_size": 2, "grad_accum": 2, "lr": 1e-3, "seed": 0},
            eval={"interval": 0, "at_start": False, "max_batches": 1}, checkpoint={"interval": 0, "at_end": False},
        )
        result = run_kd("train", str(recipe))
        assert result.returncode == 0, result.stderr[-4000:]
        records[fused] = train_records(root / "run")
    for step in (1, 2, 3):
        for key in keys:
            assert records[True][step][key] == pytest.approx(records[False][step][key], rel=1e-4), (step, key)
