"""`kd compete` end to end on the tiny models (issue 14): a whole round, a run killed in every phase that resumes to
the same pool, scores, candidates and bitwise the same student weights as an uninterrupted run; on 2 ranks the pool
is the same on every rank (and round 0's, which only the teacher writes, equals the 1-rank run's), and a SIGKILL
inside imitation resumes exactly. All slow: each run builds the student's and the teacher's engines per round."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.integration.compete_setup import make_compete_run
from tests.integration.conftest import REPO, run_kd, start_kd, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _launch(recipe: Path, *, exit_at: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("KD_COMPETE_EXIT_AT", None)
    if exit_at:
        env["KD_COMPETE_EXIT_AT"] = exit_at
    return subprocess.run([sys.executable, "-m", "kd.compete.launch", "--recipe", str(recipe)], cwd=REPO,
                          timeout=900, capture_output=True, text=True, env=env)


def _files(run_dir: Path) -> dict[str, bytes]:
    root = run_dir / "compete"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = run_dir / "student" / "checkpoints"
    tag = (ckpt / "latest").read_text().strip()
    state = torch.load(ckpt / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return state["module"]


def _same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """An uninterrupted one-round run (one process); returns its root (teacher/, run/)."""
    root = tmp_path_factory.mktemp("compete_straight")
    result = _launch(make_compete_run(root))
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def test_a_round_killed_in_every_phase_resumes_to_the_same_run(straight, tmp_path):
    run_a = straight / "run"
    record = json.loads((run_a / "compete" / "rounds.jsonl").read_text())
    pool = [json.loads(line) for line in (run_a / "compete" / "round_01" / "pool.jsonl").read_text().splitlines()]
    assert record["round"] == 1 and record["pool_size"] == len(pool) == 8 + record["new_instructions"]
    assert record["judged"] + record["left_out"] > 0 and 0.0 <= record["win_rate"] <= 1.0
    assert sum(v for k, v in record.items() if k.startswith("dropped/")) + record["new_instructions"] == record["candidates"]
    assert "eval/kl" in record and "eval_start/kl" in record
    assert [p["id"] for p in pool] == list(range(len(pool)))
    assert (run_a / "tensorboard").is_dir()

    killed = make_compete_run(tmp_path / "b", teacher=straight / "teacher")
    for point in ("0:answer:4", "1:imitation:end", "1:discrimination:4", "1:augment:4", "1:answer:end"):
        result = _launch(killed, exit_at=point)
        assert result.returncode == 137, (point, result.stderr[-3000:])
    state = json.loads((tmp_path / "b" / "run" / "compete" / "state.json").read_text())
    assert state["phase"] == "answer"  # the last kill came after the answer phase's work, before the state moved on
    result = _launch(killed)
    assert result.returncode == 0, result.stderr[-3000:]
    run_b = tmp_path / "b" / "run"
    assert _files(run_b) == _files(run_a)
    _same_weights(_weights(run_b), _weights(run_a))


def test_the_teacher_phase_trains_the_teacher_and_leaves_the_student_untouched(straight, tmp_path):
    from transformers import AutoModelForCausalLM

    recipe = make_compete_run(tmp_path, teacher=straight / "teacher", teacher_steps=2)
    result = _launch(recipe)
    assert result.returncode == 0, result.stderr[-3000:]
    run_a, run_t = straight / "run", tmp_path / "run"
    # the student trains, answers and is judged before the teacher phase, and this round's augment and answer
    # phases keep the round's teacher: everything but the teacher's own files is the run without a teacher phase
    mine = {"round_01/teacher_train.jsonl", "rounds.jsonl"}
    files_t = {k: v for k, v in _files(run_t).items() if k not in mine and not k.startswith("round_01/teacher_hf/")}
    assert files_t == {k: v for k, v in _files(run_a).items() if k != "rounds.jsonl"}
    _same_weights(_weights(run_t), _weights(run_a))
    won = [json.loads(line) for line in (run_t / "compete/round_01/teacher_train.jsonl").read_text().splitlines()]
    scores = [json.loads(line) for line in (run_t / "compete/round_01/scores.jsonl").read_text().splitlines()]
    assert len(won) == sum(s["teacher"] is not None and s["student"] > s["teacher"] and bool(s["student_answer"].strip())
                           for s in scores) > 0
    assert won[0]["messages"][1]["content"] == next(s["student_answer"] for s in scores if s["id"] == won[0]["id"])
    before = AutoModelForCausalLM.from_pretrained(straight / "teacher").state_dict()
    after = AutoModelForCausalLM.from_pretrained(run_t / "compete/round_01/teacher_hf").state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and "lm_head.weight" in changed
    record = json.loads((run_t / "compete/rounds.jsonl").read_text())
    assert record["teacher_eval/kl"] > 0  # the trained teacher moved away from the frozen reference


def test_two_ranks_same_pool_everywhere_and_a_kill_inside_imitation(tmp_path):
    import fcntl

    one = make_compete_run(tmp_path / "one")
    assert _launch(one).returncode == 0
    with open("/tmp/kd-launch.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        sections = dict(imitation_steps=4)
        straight = make_compete_run(tmp_path / "a", teacher=tmp_path / "one" / "teacher", **sections)
        result = run_kd("compete", str(straight), "--nproc", "2", timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        out = result.stdout + result.stderr
        assert "round 0's pool is the same on all 2 ranks" in out and "round 1's pool is the same on all 2 ranks" in out
        run_a = tmp_path / "a" / "run"
        # round 0 is the teacher's alone: batches dealt to 2 ranks and gathered give the 1-rank pool
        assert (run_a / "compete/round_00/pool.jsonl").read_bytes() == \
            (tmp_path / "one/run/compete/round_00/pool.jsonl").read_bytes()

        killed = make_compete_run(tmp_path / "b", teacher=tmp_path / "one" / "teacher", **sections)
        proc = start_kd("compete", str(killed), "--nproc", "2", log_path=tmp_path / "b.log")
        first = tmp_path / "b" / "run" / "student" / "checkpoints" / "latest"
        wait_for(lambda: first.is_file() and first.read_text().strip() == "step_00000001", timeout=600,
                 what="the first imitation checkpoint", proc=proc, interval=0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        state = json.loads((tmp_path / "b" / "run" / "compete" / "state.json").read_text())
        assert state["phase"] == "imitation", state
        result = run_kd("compete", str(killed), "--nproc", "2", timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
    run_b = tmp_path / "b" / "run"
    assert _files(run_b) == _files(run_a)
    _same_weights(_weights(run_b), _weights(run_a))
