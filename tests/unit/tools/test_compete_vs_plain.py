"""tools/compete_vs_plain.py without training: its readers and table on hand-written result files (values checked
against the numbers written, not recomputed), and which parts a re-run skips (subprocess mocked: nothing launched)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
TOOL = REPO / "tools" / "compete_vs_plain.py"
RECIPE = REPO / "recipes" / "compete_quickstart.yaml"  # 3 rounds of 20 imitation steps


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("compete_vs_plain", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _eval_json(path: Path, nll: float, kl: float, top1: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"student": "x", "metrics": {"eval/student_nll": nll, "eval/kl": kl,
                                                            "eval/top1_agreement": top1, "eval/tokens": 100.0}}))


def _finished_run(out: Path) -> None:
    """Everything a finished invocation leaves: compete done, plain checkpoints, every eval and duel file."""
    root = out / "compete" / "compete"
    _jsonl(root / "state.json", [])
    (root / "state.json").write_text(json.dumps({"round": 3, "phase": "done", "item": 0}))
    _jsonl(root / "rounds.jsonl", [{"round": r, "win_rate": [0.125, 0.25, 0.375][r - 1], "pool_size": 40 + r,
                                    "judged": 32, "eval/student_nll": 5.0 - r, "eval/kl": 1.5 - r / 4,
                                    "eval/top1_agreement": 0.25, "eval_start/kl": 9.0} for r in (1, 2, 3)])
    _jsonl(out / "plain" / "metrics.jsonl", [{"step": 20, "train/loss": 3.0}, {"step": 20, "eval/kl": 0.5},
                                             {"step": 40, "eval/kl": 0.25}])
    for r in (1, 2, 3):
        step = 20 * r
        (out / "plain" / "checkpoints" / f"step_{step:08d}").mkdir(parents=True)
        for side, base in (("compete", 1.0), ("plain", 2.0)):
            _eval_json(out / "evals" / f"{side}_step_{step:08d}.eval.json", base + r, base / 10 + r, 0.5)
            _jsonl(out / "evals" / f"{side}_step_{step:08d}.duel.jsonl", [{"win_rate": base / 10 + r / 100}])


def test_readers_and_rows(tool, tmp_path):
    _finished_run(tmp_path)
    assert tool.compete_finished(str(tmp_path / "compete/compete/state.json"))
    assert not tool.compete_finished(str(tmp_path / "nowhere.json"))
    rounds = tool.read_rounds(str(tmp_path / "compete/compete/rounds.jsonl"))
    assert sorted(rounds) == [1, 2, 3] and rounds[2]["pool_size"] == 42
    assert tool.eval_metrics(str(tmp_path / "evals/plain_step_00000040.eval.json")) == \
        {"student_nll": 4.0, "kl": 2.2, "top1_agreement": 0.5, "tokens": 100.0}
    evals = {("compete", 20): {"student_nll": 2.5, "kl": 0.7}, ("plain", 20): {"student_nll": 2.75, "kl": 0.8}}
    duels = {("plain", 20): {"win_rate": 0.25}}
    rows = tool.table_rows({1: {"win_rate": 0.375, "pool_size": 60, "judged": 32}}, 20, evals, duels)
    assert tool.run_evals({2: {"eval/kl": 0.5, "eval_start/kl": 9.0, "win_rate": 0.1}}, 20) == {40: {"kl": 0.5}}
    assert rows == [{"round": 1, "step": 20, "pool_size": 60, "judged": 32, "win_rate/compete_in_run": 0.375,
                     "win_rate/compete": None, "win_rate/plain": 0.25,
                     "student_nll/compete": 2.5, "kl/compete": 0.7, "top1_agreement/compete": None,
                     "student_nll/plain": 2.75, "kl/plain": 0.8, "top1_agreement/plain": None}]
    table = tool.markdown_table(rows).splitlines()
    assert len(table) == 3 and table[1] == "|" + "---|" * 11
    assert table[2] == "| 1 | 20 | 60 | 0.375 | 0.250 | 2.500 | 2.750 | 0.700 | 0.800 | - | - |"


def test_a_duel_file_with_more_than_one_record_is_refused(tool, tmp_path):
    _jsonl(tmp_path / "d.jsonl", [{"win_rate": 0.1}, {"win_rate": 0.2}])
    with pytest.raises(ValueError, match="expected one record, found 2"):
        tool.head_to_head(str(tmp_path / "d.jsonl"))


def test_a_rerun_skips_every_finished_part(tool, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    _finished_run(tmp_path)
    result = tool.Evidence(str(RECIPE), str(tmp_path), 2, []).run()
    assert calls == []
    rows = result["rows"]
    assert [row["win_rate/plain"] for row in rows] == pytest.approx([0.21, 0.22, 0.23])
    assert [row["student_nll/plain"] for row in rows] == [3.0, 4.0, 5.0]  # kd eval's files
    # the compete side is the run's own record (no --recheck-compete): win rate and eval/* of rounds.jsonl
    assert [row["win_rate/compete_in_run"] for row in rows] == [0.125, 0.25, 0.375]
    assert [row["student_nll/compete"] for row in rows] == [4.0, 3.0, 2.0]
    assert [row["kl/compete"] for row in rows] == [1.25, 1.0, 0.75]
    assert all(row["win_rate/compete"] is None for row in rows)
    assert "rechecked" not in tool.markdown_table(rows).splitlines()[0]
    assert result["plain_in_training_evals"] == {20: {"kl": 0.5}, 40: {"kl": 0.25}}
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == rows

    # --recheck-compete reads the compete checkpoints' kd eval and duel files instead
    rechecked = tool.Evidence(str(RECIPE), str(tmp_path), 2, [], recheck_compete=True).run()["rows"]
    assert calls == []
    assert [row["student_nll/compete"] for row in rechecked] == [2.0, 3.0, 4.0]
    assert [row["win_rate/compete"] for row in rechecked] == pytest.approx([0.11, 0.12, 0.13])
    assert "rechecked" in tool.markdown_table(rechecked).splitlines()[0]

    # one missing evaluation and one unfinished plain run: exactly those two are run again (then it reads the files)
    (tmp_path / "evals" / "plain_step_00000040.eval.json").unlink()
    (tmp_path / "plain" / "checkpoints" / "step_00000060").rmdir()
    with pytest.raises(FileNotFoundError):  # the mocked commands write nothing
        tool.Evidence(str(RECIPE), str(tmp_path), 2, []).run()
    assert [c[3] for c in calls] == ["train", "eval"]
    train, evaluate = calls
    assert "train.max_steps=60" in train and "checkpoint.interval=20" in train and train[-2:] == ["--nproc", "2"]
    assert f"data.train.path={tmp_path / 'compete/compete/round_01/train.jsonl'}" in train
    assert evaluate[evaluate.index("--student") + 1] == str(tmp_path / "plain/checkpoints/step_00000040")

    # --parts plain: only the training run is looked at (the compete run may still be going elsewhere)
    calls.clear()
    assert tool.Evidence(str(RECIPE), str(tmp_path), 2, [], parts=("plain",)).run() == {}
    assert [c[3] for c in calls] == ["train"]


def test_a_compete_run_still_going_gives_the_rounds_it_finished(tool, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    _finished_run(tmp_path)
    rounds = tmp_path / "compete/compete/rounds.jsonl"
    rounds.write_text(rounds.read_text().splitlines()[0] + "\n")
    rows = tool.Evidence(str(RECIPE), str(tmp_path), 2, [], parts=("evals",)).run()["rows"]
    assert calls == [] and [row["round"] for row in rows] == [1]
