"""Failures every rank agrees on, and checkpoints no run loses (issue 10, items 2, 3, 4 and 7), through the real
entry points: `python -m kd.launch` for one rank (cheap), `kd train` -> deepspeed launcher for two."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from kd import checkpoint
from tests.helpers.tiny_run import build_teacher, recipe_dict, write_corpus
from tests.integration.conftest import REPO, read_metrics, run_kd, wait_for

pytestmark = pytest.mark.integration

QUIET = {"eval": {"interval": 0, "at_start": False, "max_batches": 1}}


def _setup(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    build_teacher(root / "teacher")
    write_corpus(root / "corpus.jsonl")


def _write(root: Path, name: str, **sections) -> Path:
    path = root / name
    path.write_text(yaml.safe_dump(recipe_dict(root, **QUIET, **sections), sort_keys=False))
    return path


def _one_rank(recipe: Path, *, env: dict | None = None, background: bool = False):
    cmd = [sys.executable, "-m", "kd.launch", "--recipe", str(recipe)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if background:
        return subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=600)


def _errors(result) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("kd: error:")]


def test_a_fresh_run_keeps_its_checkpoints_and_a_crash_resumes_it_not_the_old_run(tmp_path):
    """Item 4. The old run leaves step 6 (keep_last 1). A fresh run (resume: never) into the same directory writes
    step 2; on main before the fix, pruning kept the highest step names and deleted the new tag right after `latest`
    named it, and after a crash `resume: auto` continued the old run from step 6."""
    _setup(tmp_path)
    ckpts = tmp_path / "run" / "checkpoints"
    single = {"run": {"output_dir": str(tmp_path / "run"), "nproc": 1, "progress_bar": False}}
    old = _write(tmp_path, "old.yaml", **single, resume="never", train={"max_steps": 6, "micro_batch_size": 2,
                 "grad_accum": 1, "lr": 1e-3, "seed": 0}, checkpoint={"interval": 3, "keep_last": 1})
    result = _one_rank(old)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000006"]

    # the fresh run: saves step 2, then is killed (SIGKILL) while its step-4 save lingers
    train = {"max_steps": 4, "micro_batch_size": 2, "grad_accum": 1, "lr": 1e-3, "seed": 0}
    fresh = _write(tmp_path, "fresh.yaml", **single, resume="never", train=train,
                   checkpoint={"interval": 2, "keep_last": 1})
    proc = _one_rank(fresh, env={"KD_TEST_SAVE_DELAY": "60@4"}, background=True)
    try:
        wait_for(lambda: (ckpts / "step_00000004").is_dir(), timeout=300, what="the step-4 save", proc=proc)
        time.sleep(1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        output = proc.communicate()[0]
    (moved,) = (tmp_path / "run").glob("checkpoints.before-*")
    assert f"moved them to {moved}" in output
    assert sorted(p.name for p in moved.glob("step_*")) == ["step_00000006"]  # the old run's, kept aside
    assert checkpoint.read_latest(str(ckpts)) == "step_00000002"  # names an existing complete tag
    assert checkpoint.is_complete(str(ckpts / "step_00000002"))[0]

    # after the crash, `resume: auto` continues the fresh run from its step 2
    again = _write(tmp_path, "again.yaml", **single, resume="auto", train=train,
                   checkpoint={"interval": 2, "keep_last": 1})
    result = _one_rank(again)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {ckpts / 'step_00000002'} at step 2" in result.stdout
    assert "skipping checkpoint step_00000004: no manifest" in result.stdout
    assert checkpoint.read_latest(str(ckpts)) == "step_00000004"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000004"]
    steps = [r["step"] for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert steps == [1, 2, 3, 4]  # the old run's records were superseded, the fresh run's continue


SAVE_FAILS_ON_RANK_1 = """
import os
if os.environ.get("RANK") == "1":
    import torch
    _save = torch.save

    def save(obj, f, *args, **kwargs):  # a full disk, as torch's zip writer reports it (a RuntimeError)
        if "step_00000004" in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 0 vs 64 (file write failed)")
        return _save(obj, f, *args, **kwargs)

    torch.save = save
"""


def test_a_save_failing_inside_deepspeed_on_one_rank_stops_every_rank_with_one_message(tmp_path):
    """Item 2. torch.save fails (RuntimeError, not OSError) inside DeepSpeed's engine.save_checkpoint on rank 1 only,
    the other rank is inside DeepSpeed's barriers: both ranks exit non-zero with one message, the partial tag is gone
    and `latest` still names the previous tag."""
    _setup(tmp_path)
    recipe = _write(tmp_path, "recipe.yaml", checkpoint={"interval": 2, "keep_last": 3})
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(textwrap.dedent(SAVE_FAILS_ON_RANK_1))
    start = time.time()
    result = run_kd("train", str(recipe), "--nproc", "2", timeout=400,
                    env={"PYTHONPATH": os.pathsep.join([str(inject), os.environ.get("PYTHONPATH", "")])})
    assert result.returncode == 3, (result.stdout + result.stderr)[-3000:]
    (error,) = _errors(result)
    assert "writing checkpoint" in error and "step_00000004 failed on rank 1: RuntimeError:" in error
    assert "file write failed" in error and "still step_00000002" in error
    assert "Traceback" not in result.stderr
    ckpts = tmp_path / "run" / "checkpoints"
    assert not (ckpts / "step_00000004").exists()
    assert checkpoint.read_latest(str(ckpts)) == "step_00000002" and checkpoint.is_complete(str(ckpts / "step_00000002"))[0]
    print(f"failed run took {time.time() - start:.0f} s")  # launch + 4 steps; a hang would hit the timeout


class _Payload:
    """Unpickling this would run a shell command (here: create a marker file)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_resumed_on_another_world_size_is_checked_and_a_failed_conversion_reaches_every_rank(tmp_path):
    """Items 7 and 3. A one-rank checkpoint resumed on two ranks goes through ds_to_universal and load_universal,
    which unpickle with weights_only=False: a tampered file must be refused before either reads it. A conversion
    that fails on rank 0 must end both ranks with its one message, not leave rank 1 in a barrier."""
    _setup(tmp_path)
    single = {"run": {"output_dir": str(tmp_path / "run"), "nproc": 1, "progress_bar": False}}
    train = {"max_steps": 2, "micro_batch_size": 2, "grad_accum": 2, "lr": 1e-3, "seed": 0}
    written = _write(tmp_path, "one.yaml", **single, train=train, checkpoint={"interval": 2, "keep_last": 2})
    result = _one_rank(written)
    assert result.returncode == 0, result.stderr[-3000:]
    original = tmp_path / "run" / "checkpoints" / "step_00000002"
    (optim,) = original.glob("*optim_states.pt")

    def resume_on_two(name: str, edit) -> subprocess.CompletedProcess:
        run = tmp_path / name
        tag_dir = run / "checkpoints" / "step_00000002"
        import shutil

        shutil.copytree(original.parent, run / "checkpoints")
        edit(tag_dir)
        (tag_dir / checkpoint.MANIFEST).unlink()
        checkpoint._write_manifest(str(tag_dir))  # an attacker (or a broken copy) keeps the manifest consistent
        recipe = _write(tmp_path, f"{name}.yaml", run={"output_dir": str(run), "nproc": 2, "progress_bar": False},
                        train={**train, "max_steps": 3, "grad_accum": 1})
        return run_kd("train", str(recipe), "--nproc", "2", timeout=400)

    marker = tmp_path / "pwned"

    def tamper(tag_dir: Path) -> None:
        path = tag_dir / optim.name
        state = torch.load(path, weights_only=False)
        state["extra"] = _Payload(str(marker))
        torch.save(state, path)

    result = resume_on_two("tampered", tamper)
    assert result.returncode == 2, (result.stdout + result.stderr)[-3000:]
    (error,) = _errors(result)
    assert f"{optim.name} contains a pickled" in error and ".system" in error
    assert not marker.exists() and "Traceback" not in result.stderr
    assert not (tmp_path / "tampered" / "checkpoints" / "universal" / "step_00000002").exists()

    result = resume_on_two("broken", lambda tag_dir: (tag_dir / optim.name).unlink())
    assert result.returncode == 2, (result.stdout + result.stderr)[-3000:]
    (error,) = _errors(result)
    assert "converting" in error and "to a universal checkpoint failed" in error
    assert "Traceback" not in result.stderr
