"""tools/compare_losses.py on hand-written run directories: which runs it skips, continues or starts (with the
`kd train` commands it would run, subprocess mocked), the mean (min-max) table over seeds against hand-computed
values, the figure, and bad input as one line with exit code 2. A real resumed comparison on the tiny setup is the
slow test at the end."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers.tiny_run import recipe_dict

TOOL = Path(__file__).resolve().parents[3] / "tools" / "compare_losses.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("compare_losses", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules["compare_losses"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("compare_losses", None)


@pytest.fixture
def recipe(tmp_path) -> Path:
    """A valid tiny recipe (validation reads no model or data file): max_steps 4."""
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(tmp_path / "setup")))
    return path


def _eval(step: int, nll: float, kl: float, top1: float = 0.5) -> dict:
    return {"step": step, "eval/student_nll": nll, "eval/student_ppl": math.exp(nll), "eval/kl": kl,
            "eval/top1_agreement": top1, "eval/teacher_ppl": 3.0}


def _write_run(path: Path, records: list[dict], tail: str = "") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


def _finished(path: Path, kl: float, *, steps: int = 4, nll: float = 2.0, top1: float = 0.5) -> Path:
    return _write_run(path, [_eval(0, 3.0, 1.0, 0.1), *({"step": s, "loss": 2.0} for s in range(1, steps)),
                             {**_eval(steps, nll, kl, top1), "loss": 1.5}])


def test_run_state_finished_unfinished_missing(tool, tmp_path):
    assert tool.run_state(tmp_path / "none", 4).status == "missing"
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    assert tool.run_state(tmp_path / "empty", 4).status == "unfinished"
    # killed after step 3: an eval at step 2, none at the final step 4, a half-written last line
    cut = _write_run(tmp_path / "cut", [_eval(0, 3.0, 1.0), {"step": 1, "loss": 2.0}, {**_eval(2, 2.5, 0.9), "loss": 1.9},
                                        {"step": 3, "loss": 1.8}], tail='{"step": 4, "lo')
    state = tool.run_state(cut, 4)
    assert (state.status, state.step, state.final, state.start["eval/kl"]) == ("unfinished", 3, None, 1.0)
    done = _finished(tmp_path / "done", 0.4)
    state = tool.run_state(done, 4)
    assert (state.status, state.step, state.final["eval/kl"], state.final["step"]) == ("finished", 4, 0.4, 4)
    # the same run asked for 6 steps now (train.max_steps raised): not finished, kd's resume continues it
    assert tool.run_state(done, 6).status == "unfinished"
    # asked for fewer steps than it trained: its step-2 eval had another lr schedule, not a finished 2-step run
    assert tool.run_state(done, 2).status == "past_end"
    # train.epochs: no known final step; the table takes the last eval
    state = tool.run_state(cut, None)
    assert (state.status, state.final["step"]) == ("unknown", 2)


def test_table_mean_min_max_over_seeds(tool, tmp_path):
    planned = tool.plan_runs(tmp_path, ["ce", "taid"], [0, 1])
    # seed-major: a comparison stopped early has every loss at seed 0
    assert [(r.loss, r.seed, r.dir) for r in planned] == [
        ("ce", 0, tmp_path / "ce" / "seed_0"), ("taid", 0, tmp_path / "taid" / "seed_0"),
        ("ce", 1, tmp_path / "ce" / "seed_1"), ("taid", 1, tmp_path / "taid" / "seed_1")]
    runs = sorted(planned, key=lambda r: (r.loss, r.seed))
    _finished(runs[0].dir, 0.5, nll=2.0, top1=0.30)
    _finished(runs[1].dir, 0.7, nll=2.5, top1=0.34)
    _finished(runs[2].dir, 0.4, nll=1.8)
    _write_run(runs[3].dir, [_eval(0, 3.2, 1.2), {"step": 1, "loss": 2.0}])  # unfinished: not averaged
    states = {r: tool.run_state(r.dir, 4) for r in runs}
    rows = tool.table_rows(runs, states)
    assert [(r["loss"], r["seeds"], r["steps"]) for r in rows] == [
        ("(student before training)", [0, 1], [0]), ("ce", [0, 1], [4]), ("taid", [0], [4])]
    ce = rows[1]
    assert ce["eval/kl"]["mean"] == pytest.approx(0.6) and (ce["eval/kl"]["min"], ce["eval/kl"]["max"]) == (0.5, 0.7)
    assert ce["eval/kl"]["std"] == pytest.approx(0.1414213562)  # sample std of 0.5, 0.7: 0.2 / sqrt(2)
    assert ce["eval/student_ppl"]["mean"] == pytest.approx((math.exp(2.0) + math.exp(2.5)) / 2)
    assert rows[2]["eval/kl"]["std"] is None
    assert rows[0]["eval/kl"]["values"] == [1.0, 1.0]  # step 0 per seed from the first loss's run (not taid's 1.2)
    table = tool.markdown(rows)
    assert "| ce | 4 | 0 1 | 2.2500 (2.0000–2.5000) | 9.8 (7.4–12.2) | 0.6000 (0.5000–0.7000) | " \
           "0.320 (0.300–0.340) |" in table.replace(",", "")
    assert "| taid | 4 | 0 | 1.8000 | 6.0 | 0.4000 | 0.500 |" in table.replace(",", "")
    assert table.splitlines()[0].count("|") == table.splitlines()[-1].count("|") == 8  # no stray | in a header


class _FakeKd:
    """subprocess.Popen stand-in: records each command and 'trains' the run to its run.output_dir's final step
    (or fails with `fail`)."""

    def __init__(self, tool, fail: int = 0):
        self.tool, self.fail, self.commands = tool, fail, []

    def __call__(self, cmd, **kwargs):
        self.commands.append(cmd)
        args = dict(a.split("=", 1) for a in cmd if "=" in a)
        if not self.fail:
            run_dir = Path(args["run.output_dir"])
            _finished(run_dir, kl=0.3 + 0.1 * int(args["train.seed"]), steps=int(args.get("train.max_steps", 4)))
        return self

    def wait(self):
        return self.fail


def test_resume_skips_finished_continues_unfinished_starts_missing(tool, recipe, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cmp"
    _finished(out / "ce" / "seed_0", 0.5)
    _finished(out / "ce" / "seed_1", 0.7)
    _write_run(out / "taid" / "seed_0", [_eval(0, 3.0, 1.0), {"step": 1, "loss": 2.0}, {**_eval(2, 2.5, 0.9)}])
    fake = _FakeKd(tool)
    monkeypatch.setattr(tool.subprocess, "Popen", fake)
    assert tool.main([str(recipe), "--losses", "ce", "taid", "--seeds", "0", "1", "--out", str(out),
                      "loss.temperature=2.0", "--nproc", "2"]) == 0
    # ce: both finished, skipped; taid seed 0 continued, seed 1 started; both with resume=auto, user overrides last
    assert fake.commands == [
        [sys.executable, "-m", "kd.cli", "train", str(recipe), f"run.output_dir={out / 'taid' / f'seed_{s}'}",
         "loss.name=taid", f"train.seed={s}", "resume=auto", "loss.temperature=2.0", "--nproc", "2"] for s in (0, 1)]
    captured = capsys.readouterr()
    progress = [line for line in captured.err.splitlines() if line.startswith("compare_losses: [")]
    assert len(progress) == 6, captured.err  # skipped, skipped, continuing + done, starting + done
    assert progress[0].startswith("compare_losses: [1/4] ce seed 0: finished (eval at step 4), skipped")
    assert "[2/4] taid seed 0: continuing (last logged step 2), steps 2 -> 4" in progress[1]
    assert "done in" in progress[2] and "KL 0.3000" in progress[2] and "left for 1 run(s)" in progress[2]
    assert progress[3].startswith("compare_losses: [3/4] ce seed 1: finished (eval at step 4), skipped")
    assert "[4/4] taid seed 1: starting, steps 0 -> 4" in progress[4]
    assert "| taid | 4 | 0 1 | " in captured.out and "0.3500 (0.3000–0.4000)" in captured.out

    fake.commands.clear()  # everything finished now: the same command trains nothing
    assert tool.main([str(recipe), "--losses", "ce", "taid", "--seeds", "0", "1", "--out", str(out),
                      "loss.temperature=2.0"]) == 0
    assert fake.commands == []


def test_no_train_prints_what_exists_and_draws_the_figure(tool, recipe, tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "cmp"
    _finished(out / "ce" / "seed_0", 0.5)
    _write_run(out / "taid" / "seed_0", [_eval(0, 3.0, 1.0), {"step": 1, "loss": 2.0}])
    real_popen = tool.subprocess.Popen

    def popen(cmd, *args, **kwargs):  # matplotlib may run fc-list through the same module on a fresh install
        if "kd.cli" in cmd:
            pytest.fail("--no-train trained")
        return real_popen(cmd, *args, **kwargs)

    monkeypatch.setattr(tool.subprocess, "Popen", popen)
    png = tmp_path / "fig" / "curves.png"
    assert tool.main([str(recipe), "--losses", "ce", "taid", "forward_kl", "--out", str(out), "--no-train",
                      "--plot", str(png)]) == 0
    captured = capsys.readouterr()
    assert "| ce | 4 | 0 | 2.0000 |" in captured.out
    assert "| taid | - | none finished | n/a | n/a | n/a | n/a |" in captured.out
    assert "taid seed 0: at step 1 of 4, not in the table" in captured.err
    assert "forward_kl seed 0: not trained, not in the table" in captured.err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failing_run_stops_the_comparison_with_its_code(tool, recipe, tmp_path, monkeypatch, capsys):
    fake = _FakeKd(tool, fail=3)
    monkeypatch.setattr(tool.subprocess, "Popen", fake)
    assert tool.main([str(recipe), "--losses", "ce", "taid", "--out", str(tmp_path / "cmp")]) == 3
    assert len(fake.commands) == 1
    assert "ce seed 0: the run failed (exit 3); run the same command again to continue" in capsys.readouterr().err


def test_a_finished_run_of_another_recipe_is_an_error(tool, recipe, tmp_path, capsys):
    out = tmp_path / "cmp"
    run = _finished(out / "ce" / "seed_0", 0.5)
    saved = tool.requested_recipe(str(recipe), tool.Run("ce", 0, run), [])
    (run / "recipe.yaml").write_text(yaml.safe_dump(saved))
    assert tool.main([str(recipe), "--losses", "ce", "--out", str(out), "--no-train"]) == 0  # same recipe: fine
    capsys.readouterr()
    assert tool.main([str(recipe), "--losses", "ce", "--out", str(out), "--no-train", "data.seq_len=16"]) == 2
    err = capsys.readouterr().err.strip()
    assert "finished run of a different recipe (data.seq_len: 32 -> 16)" in err and "\n" not in err


@pytest.mark.parametrize("case", ["no_recipe", "no_run", "bad_line", "duplicate", "seed_override", "dup_seed",
                                  "past_end"])
def test_bad_input_is_one_line_exit_2(tool, recipe, tmp_path, capsys, case):
    losses, extra = ["ce"], []
    if case == "bad_line":
        _write_run(tmp_path / "ce" / "seed_0", [], tail="garbage\n" + json.dumps(_eval(4, 2.0, 0.5)) + "\n")
    elif case == "duplicate":
        losses = ["ce", "ce"]
    elif case == "seed_override":
        extra = ["train.seed=3"]
    elif case == "dup_seed":
        extra = ["--seeds", "1", "1"]
    elif case == "past_end":
        _finished(tmp_path / "ce" / "seed_0", 0.5, steps=6)
    args = [str(recipe if case != "no_recipe" else tmp_path / "missing.yaml"), "--out", str(tmp_path), "--no-train",
            "--losses", *losses, *extra]
    assert tool.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("compare_losses: error:") and "\n" not in err
    if case == "seed_override":
        assert "use --seeds" in err
    if case == "past_end":
        assert "trained to step 6, past the requested final step 4" in err


@pytest.mark.slow
def test_real_tiny_comparison_resumes(tmp_path):
    """Two real 2-rank tiny runs, then the same command again (nothing trained), then 6 steps (both continued)."""
    import subprocess

    from tests.helpers.tiny_run import make_tiny_run

    recipe = make_tiny_run(tmp_path / "setup")
    base = [sys.executable, str(TOOL), str(recipe), "--losses", "ce", "forward_kl", "--out", str(tmp_path / "cmp"),
            "--json"]

    def run(*extra: str) -> tuple[list[dict], str]:
        proc = subprocess.run([*base, *extra], capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout), proc.stderr

    rows, _ = run()
    assert [r["steps"] for r in rows[1:]] == [[4], [4]]
    again, err = run()
    assert again == rows and err.count("skipped") == 2 and "kd train" not in err
    longer, err = run("train.max_steps=6")
    assert [r["steps"] for r in longer[1:]] == [[6], [6]] and err.count("continuing (last logged step 4)") == 2
