"""NaN/inf steps are skipped with a warning and counted; K in a row stop the run without writing a checkpoint."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest

from tests.helpers.tiny_run import make_tiny_run
from tests.integration.conftest import REPO, read_metrics

pytestmark = pytest.mark.integration


def run_single_process(recipe):
    """One rank without a launcher (`python -m kd.launch`), the cheapest real run."""
    return subprocess.run([sys.executable, "-m", "kd.launch", "--recipe", str(recipe)], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env={"OMP_NUM_THREADS": "1", **__import__("os").environ})


def _recipe(tmp_path, stage, nan_steps, **train):
    return make_tiny_run(
        tmp_path, student={"init_from_teacher_layers": [0, 2], "zero_stage": stage},
        loss={"name": "tests.helpers.nan_loss.NaNAtSteps", "options": {"steps": nan_steps}},
        train={"max_steps": 4, "micro_batch_size": 2, "grad_accum": 1, "lr": 1e-3, "seed": 0, **train},
        eval={"interval": 0, "at_start": False, "max_batches": 1}, checkpoint={"interval": 1, "keep_last": 5},
    )


@pytest.mark.parametrize("stage", [0, 2])
def test_a_nan_step_is_skipped_and_training_goes_on(tmp_path, stage):
    result = run_single_process(_recipe(tmp_path, stage, [2]))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 2 has a non-finite loss" in result.stdout + result.stderr
    records = {r["step"]: r for r in read_metrics(tmp_path / "run") if "train/skipped_steps" in r}
    assert records[1]["train/skipped_steps"] == 0 and records[2]["train/skipped_steps"] == 1
    assert records[2]["loss"] is None  # NaN is written as null
    assert all(math.isfinite(records[s]["loss"]) for s in (1, 3, 4))

    # the skipped step changed nothing: the step-2 checkpoint holds exactly the step-1 weights, all finite
    from kd.export import load_student_state_dict

    ckpts = tmp_path / "run" / "checkpoints"
    after1, after2 = (load_student_state_dict(ckpts, f"step_0000000{s}") for s in (1, 2))
    for name, tensor in after1.items():
        assert tensor.isfinite().all(), name
        assert (after2[name] == tensor).all(), name


def test_too_many_nonfinite_steps_stop_the_run(tmp_path):
    result = run_single_process(_recipe(tmp_path, 2, [2, 3, 4], max_nonfinite_steps=2))
    assert result.returncode == 3
    errors = [line for line in result.stderr.splitlines() if line.startswith("kd: error:")]
    assert len(errors) == 1 and "2 consecutive steps had a non-finite loss" in errors[0]
    assert "Traceback" not in result.stderr
    # step 2 was skipped (its checkpoint holds the finite step-1 weights); the run stopped at step 3 without saving
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000002"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000001", "step_00000002"]
    from kd.export import load_student_state_dict

    assert all(t.isfinite().all() for t in load_student_state_dict(ckpts, "step_00000002").values())


@pytest.mark.parametrize("stage", [0, pytest.param(2, marks=pytest.mark.slow)])  # DeepSpeed checks at ZeRO-2
def test_a_nan_gradient_with_a_finite_loss_is_skipped(tmp_path, stage):
    """Issue 10 item 6: DeepSpeed checks gradients at ZeRO-1/2/3 only; at ZeRO-0 kd checks them itself."""
    recipe = _recipe(tmp_path, stage, [2])
    text = recipe.read_text().replace("tests.helpers.nan_loss.NaNAtSteps", "tests.helpers.nan_loss.NaNGradientAtSteps")
    recipe.write_text(text)
    result = run_single_process(recipe)
    assert result.returncode == 0, result.stderr[-3000:]
    records = {r["step"]: r for r in read_metrics(tmp_path / "run") if "train/skipped_steps" in r}
    assert math.isfinite(records[2]["loss"])  # the loss was fine; only its gradient was not
    assert records[1]["train/skipped_steps"] == 0 and records[2]["train/skipped_steps"] == 1
    assert records[4]["train/skipped_steps"] == 1
    from kd.export import load_student_state_dict

    ckpts = tmp_path / "run" / "checkpoints"
    after1, after2, after3 = (load_student_state_dict(ckpts, f"step_0000000{s}") for s in (1, 2, 3))
    for name, tensor in after2.items():
        assert tensor.isfinite().all(), name
        assert (after1[name] == tensor).all(), name  # nothing applied at step 2
    assert any((after3[n] != t).any() for n, t in after2.items())  # step 3 trained again

