"""A fusion teacher (large base steered by two experts, every model on its own inference-only ZeRO-3 engine) trains
a tiny student through the normal teacher contract, and the step logs the solver's statistics (issue 13)."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest

from tests.integration.conftest import REPO, read_metrics
from tests.unit.fusion.test_teacher import write_model

pytestmark = pytest.mark.integration


def _fusion_run(tmp_path, nproc: int):
    from tests.helpers.tiny_run import make_tiny_run

    dirs = {name: write_model(tmp_path / "models" / name, seed) for name, seed in (("small", 10), ("e0", 11), ("e1", 12))}
    section = {"small_base": {"path": dirs["small"], "zero_stage": 3},
               "experts": [{"path": dirs[e], "zero_stage": 3} for e in ("e0", "e1")], "mode": "single"}
    return make_tiny_run(tmp_path, teacher={"zero_stage": 3, "fusion": section}, run={"nproc": nproc},
                         train={"max_steps": 2, "micro_batch_size": 2, "grad_accum": 2, "lr": 1e-3, "seed": 0},
                         eval={"interval": 0, "at_start": False, "max_batches": 1}, checkpoint={"interval": 0})


def _check(run_dir):
    records = [r for r in read_metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert math.isfinite(r["loss"]) and r["loss"] > 0
        fractions = [r[f"fusion/active_fraction/{t}"] for t in range(2)]
        assert all(0.0 <= f <= 1.0 for f in fractions) and sum(fractions) <= 1.0 + 1e-9  # single: one expert a row
        assert 0.0 <= r["fusion/weight_mean/0"] <= 2.0 and r["fusion/kl_fused_large_mean"] >= 0.0
    # the a* histograms, one per expert and step, each counting every real position of the step once
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"histograms": 0})
    acc.Reload()
    assert set(acc.Tags()["histograms"]) == {"fusion/weight_hist/0", "fusion/weight_hist/1"}
    nums = []
    for t in range(2):
        events = acc.Histograms(f"fusion/weight_hist/{t}")
        assert [e.step for e in events] == [1, 2]
        for e, r in zip(events, records):  # the histogram's mean is the logged mean a*
            assert e.histogram_value.sum / e.histogram_value.num == pytest.approx(r[f"fusion/weight_mean/{t}"])
        nums.append([e.histogram_value.num for e in events])
    assert nums[0] == nums[1] and min(nums[0]) > 0  # every position counted once per expert


def test_a_fusion_teacher_trains_a_student_in_one_process(tmp_path):
    recipe = _fusion_run(tmp_path, 1)
    result = subprocess.run([sys.executable, "-m", "kd.launch", "--recipe", str(recipe)], cwd=REPO, timeout=600,
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    _check(tmp_path / "run")


@pytest.mark.slow
def test_a_fusion_teacher_trains_a_student_on_two_ranks(tmp_path):
    from tests.integration.conftest import run_kd

    recipe = _fusion_run(tmp_path, 2)
    result = run_kd("train", str(recipe), "--nproc", "2")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    _check(tmp_path / "run")
