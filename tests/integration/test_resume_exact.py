"""Runs that lose nothing: SIGKILL of one rank mid-run, a crash in the middle of a save, preemption by SIGTERM.

Every resumed run must produce the same per-step losses (bitwise, fp32 on CPU) and the same sample order as an
uninterrupted run of the same recipe. The runs are on-policy distillation at lambda = 0.5 on chat data (issue 12
item 6), the hardest state to restore: besides the engine, optimizer, data position and RNGs, each rank's sampling
generator decides the completions the student generates on the on-policy steps.
"""
from __future__ import annotations

import json
import os
import signal
import time

import pytest

from tests.helpers.tiny_run import make_tiny_run as _make_tiny_run
from tests.helpers.tiny_run import write_chat
from tests.integration.conftest import last_step, rank_pids, run_kd, start_kd, train_records, wait_for

pytestmark = pytest.mark.integration

SECTIONS = dict(
    train={"max_steps": 6, "micro_batch_size": 2, "grad_accum": 2, "lr": 1e-3, "seed": 0},
    loss={"name": "jsd", "beta": 0.5},
    on_policy={"lmbda": 0.5, "max_new_tokens": 6, "temperature": 1.0, "gather": "always"},
    eval={"interval": 0, "at_start": False, "max_batches": 1},
    checkpoint={"interval": 2, "keep_last": 3},
)


def make_tiny_run(root, **sections):
    """The tiny run on a chat data set (prompts for the student to complete)."""
    root.mkdir(parents=True, exist_ok=True)
    write_chat(root / "chat.jsonl")
    data = {"kind": "chat", "train": {"path": str(root / "chat.jsonl")}, "seq_len": 48, "eval_fraction": 0.1}
    return _make_tiny_run(root, data=data, **sections)


def sample_ids(run_dir):
    """step -> sorted ids consumed by all ranks."""
    steps = {}
    folder = run_dir / "sample_ids"
    for name in os.listdir(folder):
        for line in open(folder / name):
            record = json.loads(line)
            steps.setdefault(record["step"], []).extend(i for mb in record["ids"] for i in mb)
    return {step: sorted(ids) for step, ids in steps.items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run every interrupted one is compared with."""
    root = tmp_path_factory.mktemp("reference")
    recipe = make_tiny_run(root, **SECTIONS)
    result = run_kd("train", str(recipe), "run.record_sample_ids=true")
    assert result.returncode == 0, result.stderr[-4000:]
    return train_records(root / "run"), sample_ids(root / "run")


def test_sigkill_one_rank_then_resume_is_bitwise_identical(tmp_path, reference):
    recipe = make_tiny_run(tmp_path, **SECTIONS)
    run_dir = tmp_path / "run"
    job = start_kd("train", str(recipe), "run.record_sample_ids=true", log_path=tmp_path / "first.log")
    wait_for(lambda: last_step(run_dir) >= 3, timeout=300, what="step 3", proc=job)
    os.kill(rank_pids(str(recipe))[1], signal.SIGKILL)  # one rank dies; the launcher takes the others down
    assert job.wait(timeout=120) != 0

    result = run_kd("train", str(recipe), "run.record_sample_ids=true")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "resumed from" in result.stdout + result.stderr
    records, ids = train_records(run_dir), sample_ids(run_dir)
    ref_records, ref_ids = reference
    assert sorted(records) == list(range(1, 7))
    flags = [ref_records[s]["onpolicy/on"] for s in range(1, 7)]
    assert 0 < sum(flags) < 6, flags  # both kinds of step, on both sides of the kill at step 3
    assert [records[s]["onpolicy/on"] for s in range(1, 7)] == flags
    for step in range(1, 7):
        assert records[step]["loss"] == ref_records[step]["loss"], step  # bitwise: exact float equality
        assert records[step]["grad_norm"] == ref_records[step]["grad_norm"], step
    assert ids == ref_ids


def test_crash_during_save_never_leaves_latest_on_a_partial_checkpoint(tmp_path, reference):
    recipe = make_tiny_run(tmp_path, **SECTIONS)
    ckpts = tmp_path / "run" / "checkpoints"
    # test hook: the step-4 save lingers 15 s between the shards and the manifest
    job = start_kd("train", str(recipe), env={"KD_TEST_SAVE_DELAY": "15@4"}, log_path=tmp_path / "first.log")
    wait_for(lambda: (ckpts / "step_00000004").is_dir(), timeout=300, what="the step-4 save to start", proc=job)
    time.sleep(2)
    assert (ckpts / "latest").read_text() == "step_00000002"
    os.killpg(job.pid, signal.SIGKILL)  # the whole job dies in the middle of the save
    job.wait(timeout=60)
    for pid in rank_pids(str(recipe)).values():
        os.kill(pid, signal.SIGKILL)
    assert not (ckpts / "step_00000004" / "kd_manifest.json").exists()

    result = run_kd("train", str(recipe))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "skipping checkpoint step_00000004: no manifest" in output
    assert "at step 2" in output
    records = train_records(tmp_path / "run")
    assert [records[s]["loss"] for s in range(1, 7)] == [reference[0][s]["loss"] for s in range(1, 7)]
    assert (ckpts / "latest").read_text() == "step_00000006"


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    recipe = make_tiny_run(tmp_path, **{**SECTIONS, "train": {**SECTIONS["train"], "max_steps": 200},
                                        "checkpoint": {"interval": 0}})
    run_dir = tmp_path / "run"
    job = start_kd("train", str(recipe), log_path=tmp_path / "first.log")
    wait_for(lambda: last_step(run_dir) >= 2, timeout=300, what="step 2", proc=job)
    started = time.time()
    os.kill(rank_pids(str(recipe))[1], signal.SIGTERM)  # only one rank is told; both must stop together
    assert job.wait(timeout=120) == 0  # every rank finished its step, saved and exited 0
    assert time.time() - started < 60
    stopped_at = last_step(run_dir)
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{stopped_at:08d}"
    assert "stop requested" in (tmp_path / "first.log").read_text()
    assert sorted(train_records(run_dir)) == list(range(1, stopped_at + 1))
