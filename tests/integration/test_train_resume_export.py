"""End to end on 2 CPU ranks: train, evaluate, checkpoint, resume to a later step, export a loadable HF model."""
from __future__ import annotations

import math
import os

import pytest
import torch

from tests.helpers.tiny_run import make_tiny_run
from tests.integration.conftest import read_metrics, run_kd, train_records

pytestmark = pytest.mark.integration


def _check(result):
    assert result.returncode == 0, f"kd failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"


@pytest.mark.parametrize("student_stage", [2, 3], ids=["zero2-student", "zero3-student"])
def test_train_eval_checkpoint_resume_export(tmp_path, student_stage):
    recipe = make_tiny_run(tmp_path, student={"init_from_teacher_layers": [0, 2], "zero_stage": student_stage})
    run_dir = tmp_path / "run"
    _check(run_kd("train", str(recipe), "--nproc", "2"))

    records = train_records(run_dir)
    assert sorted(records) == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in records.values())
    for key in ("lr", "grad_norm", "perf/tokens_per_s", "perf/teacher_s", "train/kd"):
        assert key in records[4], key
    evals = [r for r in read_metrics(run_dir) if "eval/kl" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert all(r["eval/teacher_ppl"] > 1 and 0 <= r["eval/top1_agreement"] <= 1 for r in evals)
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(run_dir / "tensorboard"))
    assert (run_dir / "recipe.yaml").is_file()
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000004"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step_00000002", "step_00000004"]
    assert (ckpts / "step_00000004" / "kd_meta" / "recipe.yaml").is_file()

    # resume: auto continues from step 4 up to the new max_steps, without redoing steps 1-4
    result = run_kd("train", str(recipe), "--nproc", "2", "train.max_steps=6")
    _check(result)
    assert "resumed from" in result.stdout + result.stderr
    resumed = train_records(run_dir)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    assert resumed[4]["loss"] == records[4]["loss"]  # the old records are kept, not rewritten
    assert (ckpts / "latest").read_text() == "step_00000006"

    # DeepSpeed's own zero_to_fp32 reads the checkpoint; the export loads in transformers and matches it
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForCausalLM

    out = tmp_path / "export"
    _check(run_kd("export", str(ckpts), str(out)))
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 2
    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpts), tag="step_00000006")
    exported = model.state_dict()
    for name, tensor in state.items():
        assert name.startswith("student."), name
        torch.testing.assert_close(exported[name.removeprefix("student.")], tensor, rtol=0, atol=0)
    ids = torch.tensor([[5, 17, 42, 7]])
    assert torch.isfinite(model(ids).logits).all()
