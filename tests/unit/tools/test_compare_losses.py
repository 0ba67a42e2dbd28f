"""tools/compare_losses.py on hand-written run directories: the table picks each run's last eval, and bad input is
one line with exit code 2. (Training through it is checked by hand on the tiny setup; see the TAID note.)"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[3] / "tools" / "compare_losses.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("compare_losses", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_run(path: Path, records: list[dict], tail: str = "") -> None:
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def _eval(step: int, nll: float, kl: float) -> dict:
    return {"step": step, "eval/student_nll": nll, "eval/student_ppl": 2.718281828459045 ** nll, "eval/kl": kl,
            "eval/top1_agreement": 0.5, "eval/teacher_ppl": 3.0}


def test_table_uses_the_last_eval_of_each_run(tool, tmp_path, capsys):
    _write_run(tmp_path / "ce", [_eval(0, 3.0, 1.0), {"step": 1, "loss": 2.0}, {**_eval(2, 2.5, 0.9), "loss": 1.9}])
    _write_run(tmp_path / "taid", [_eval(0, 3.0, 1.0), _eval(1, 2.9, 0.7), {**_eval(2, 2.4, 0.5), "loss": 0.5},
                                   _eval(2, 2.2, 0.4)], tail='{"step": 3, "lo')  # resumed rewrite; cut last line
    rows = tool.table_rows(tmp_path, ["ce", "taid"])
    assert [r["loss"] for r in rows] == ["(student before training)", "ce", "taid"]
    assert rows[0]["eval/student_nll"] == 3.0 and rows[0]["step"] == 0
    assert (rows[1]["eval/student_nll"], rows[1]["eval/kl"]) == (2.5, 0.9)
    assert (rows[2]["eval/student_nll"], rows[2]["eval/kl"], rows[2]["step"]) == (2.2, 0.4, 2)

    assert tool.main([str(tmp_path / "ce" / "metrics.jsonl"), "--losses", "ce", "taid", "--out", str(tmp_path),
                      "--no-train"]) == 0  # any existing file serves as the recipe argument here
    table = capsys.readouterr().out
    assert "| taid | 2 | 2.2000 | 9.03 | 0.4000 | 0.500 |" in table
    assert "| ce | 2 | 2.5000 | 12.18 | 0.9000 | 0.500 |" in table


def test_train_command_puts_user_overrides_last(tool, tmp_path):
    cmd = tool.train_command("r.yaml", "taid", tmp_path, ["train.max_steps=5"], 2)
    assert cmd[:4] == [sys.executable, "-m", "kd.cli", "train"]
    assert cmd[4:] == ["r.yaml", f"run.output_dir={tmp_path / 'taid'}", "loss.name=taid", "resume=never",
                       "train.max_steps=5", "--nproc", "2"]


@pytest.mark.parametrize("case", ["no_recipe", "no_run", "no_eval", "bad_line", "duplicate"])
def test_bad_input_is_one_line_exit_2(tool, tmp_path, capsys, case):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("run: {}\n")
    losses = ["ce"]
    if case == "no_eval":
        _write_run(tmp_path / "ce", [{"step": 1, "loss": 2.0}])
    elif case == "bad_line":
        (tmp_path / "ce").mkdir()
        (tmp_path / "ce" / "metrics.jsonl").write_text('garbage\n' + json.dumps(_eval(1, 2.0, 0.5)) + "\n")
    elif case == "duplicate":
        losses = ["ce", "ce"]
    args = [str(recipe if case != "no_recipe" else tmp_path / "missing.yaml"), "--out", str(tmp_path), "--no-train",
            "--losses", *losses]
    assert tool.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("compare_losses: error:") and "\n" not in err
