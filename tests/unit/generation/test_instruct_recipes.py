"""The instruction-distillation recipes (issue 12 item 8) and tools/compare_instruct.py: the three recipes differ only
in where the trained answers come from, the tool refuses an unfair or stale comparison, and its table holds the final
held-out metrics of each run (read back from hand-written run directories, no training)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from kd.config.loader import dump_recipe, load_recipe
from tests.helpers.tools import TOOLS

REPO = Path(__file__).resolve().parents[3]
ARMS = {"offpolicy": None, "onpolicy": ("student", 0.5), "seqkd": ("teacher", 1.0)}
RECIPES = [str(REPO / "recipes" / f"instruct_{name}.yaml") for name in ARMS]

sys.path.insert(0, str(TOOLS))  # a plain import: its dataclasses need the module in sys.modules
import compare_instruct as ci  # noqa: E402


def test_the_three_recipes_differ_only_in_where_the_answers_come_from():
    resolved = [yaml.safe_load(dump_recipe(load_recipe(r))) for r in RECIPES]
    for (name, policy), recipe in zip(ARMS.items(), resolved):
        assert recipe["data"]["kind"] == "chat" and recipe["data"]["train"]["path"] == "asset:alpaca-eval"
        assert recipe["data"]["eval"]["path"] == "asset:alpaca-eval/heldout.jsonl"
        assert recipe["teacher"]["path"] == "asset:smollm2-135m-instruct"
        if policy is None:
            assert recipe.get("on_policy") is None
        else:
            assert (recipe["on_policy"]["source"], recipe["on_policy"]["lmbda"]) == policy
        assert recipe["run"]["output_dir"] == f"runs/instruct/{name}"
    arms = ci.plan_arms(RECIPES, Path("/tmp/out"))
    ci.check_fair(arms, dict(zip(arms, resolved)), None)  # raises if anything but on_policy / run differs
    assert ci.differences(resolved[0], resolved[1], skip=("run", "resume")) == ["on_policy: None vs " +
                                                                                repr(resolved[1]["on_policy"])]


def test_an_unfair_comparison_is_refused(tmp_path, capsys):
    assert ci.main([*RECIPES[:2], "--no-train", "--out", str(tmp_path)]) == 2  # no run yet: nothing to show
    assert "no finished run" in capsys.readouterr().err
    other = tmp_path / "instruct_other.yaml"
    other.write_text(Path(RECIPES[0]).read_text().replace("max_steps: 30 ", "max_steps: 31 "))
    assert ci.main([RECIPES[0], str(other), "--no-train", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "train.max_steps: 30 vs 31" in err and "only on_policy may differ" in err
    assert ci.main([*RECIPES, "resume=never", "--out", str(tmp_path)]) == 2
    assert "resume is set per run" in capsys.readouterr().err


def _fake_run(out: Path, recipe: str, *, kl: float, nll: float, top1: float, on: list[float]) -> None:
    """A finished run directory as kd train leaves it: recipe.yaml and metrics.jsonl (step-0 eval, steps, final eval)."""
    arm = ci.plan_arms([recipe], out)[0]
    arm.dir.mkdir(parents=True)
    (arm.dir / "recipe.yaml").write_text(dump_recipe(load_recipe(recipe, ci.arm_overrides(arm, []))))
    lines = [{"step": 0, "eval/kl": 9.0, "eval/student_nll": 12.0, "eval/top1_agreement": 0.01}]
    lines += [{"step": s, "loss": 1.0, **({"onpolicy/on": f} if f is not None else {})} for s, f in enumerate(on, 1)]
    lines[-1].update({"eval/kl": kl, "eval/student_nll": nll, "eval/top1_agreement": top1})
    (arm.dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_the_table_holds_each_runs_final_held_out_metrics(tmp_path, capsys):
    out = tmp_path / "cmp"
    steps = 30
    _fake_run(out, RECIPES[0], kl=1.25, nll=3.5, top1=0.4, on=[None] * steps)
    _fake_run(out, RECIPES[1], kl=1.0, nll=3.75, top1=0.45, on=[1.0, 0.0] * (steps // 2))
    assert ci.main([*RECIPES, "--no-train", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| (student before training) | 0 | - | 9.0000 | 12.0000 | 0.010 |" in table
    assert "| offpolicy | 30 | 0% | 1.2500 | 3.5000 | 0.400 |" in table
    assert "| onpolicy | 30 | 50% | 1.0000 | 3.7500 | 0.450 |" in table
    assert "| seqkd | - | - | not finished | not finished | not finished |" in table
    assert ci.main([*RECIPES, "--no-train", "--out", str(out), "train.lr=1e-3"]) == 2  # finished under another lr
    assert "is a finished run of another recipe (train.lr" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: Path(p).stem)
def test_kd_validate_accepts_each_recipe_with_the_real_teacher(recipe, capsys):
    from kd.cli import main

    assert main(["validate", recipe]) == 0
    assert "ok (forward_kl, 30 steps" in capsys.readouterr().out
