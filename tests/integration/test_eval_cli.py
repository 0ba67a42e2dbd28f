"""`kd eval` on a real checkpoint of a short 2-rank `kd train`: one process, no DeepSpeed engine, and the same numbers
the trainer logged for the same weights on the whole held-out split (the trainer's eval at the last step, and at step
0 for the untrained student)."""
from __future__ import annotations

import json

import pytest

from tests.helpers.tiny_run import make_tiny_run
from tests.integration.conftest import read_metrics, run_kd

pytestmark = pytest.mark.integration

KEYS = ("eval/student_ppl", "eval/teacher_ppl", "eval/kl", "eval/top1_agreement", "eval/student_nll")


def _check(result):
    assert result.returncode == 0, f"kd failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"


def test_eval_matches_the_trainers_eval(tmp_path):
    # whole eval split (max_batches unset), evaluated at steps 0 and 2; one checkpoint at the end
    recipe = make_tiny_run(tmp_path, train={"max_steps": 2}, eval={"interval": 0, "max_batches": None},
                           checkpoint={"interval": 0})
    _check(run_kd("train", str(recipe), "--nproc", "2"))
    logged = {r["step"]: r for r in read_metrics(tmp_path / "run") if "eval/kl" in r}
    assert sorted(logged) == [0, 2]

    out = tmp_path / "eval.json"
    result = run_kd("eval", str(recipe), "--json", str(out))  # default student: the run's newest checkpoint
    _check(result)
    assert "step_00000002" in result.stdout
    payload = json.loads(out.read_text())
    assert payload["student"].endswith("checkpoints/step_00000002")
    got = payload["metrics"]
    # same weights and tokens; only the summation order differs (ranks, batches, fp32 vs fp64 partial sums): ~1e-7
    assert got["eval/tokens"] == logged[2]["eval/tokens"]
    for key in KEYS:
        assert got[key] == pytest.approx(logged[2][key], rel=1e-5, abs=1e-8), key
    assert got["eval/kl"] > 0  # a trained 2-layer student is not the 3-layer teacher

    from kd.cli import main

    main(["eval", str(recipe), "--untrained", "--json", str(tmp_path / "base.json")])
    base = json.loads((tmp_path / "base.json").read_text())["metrics"]
    for key in KEYS:
        assert base[key] == pytest.approx(logged[0][key], rel=1e-5, abs=1e-8), key
    assert base["eval/kl"] > got["eval/kl"]  # two steps of distillation moved the student towards the teacher
