"""The offline teacher end to end (issue 15): `kd precompute` on 2 ranks with a ZeRO-3 teacher writes the same store
as one process; training from it (no teacher model loaded) resumes bitwise; a store for another run is refused
before any rank starts; a 2-rank run from the store killed with SIGKILL resumes bitwise (-m slow)."""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys

import pytest
import torch

from kd.config.loader import load_recipe
from kd.errors import EXIT_USER_ERROR
from kd.store import format as fmt
from kd.store.precompute import precompute
from tests.helpers.tiny_run import make_tiny_run
from tests.integration.conftest import REPO, last_step, rank_pids, read_metrics, run_kd, start_kd, wait_for

pytestmark = pytest.mark.integration

SECTIONS = dict(
    data={"max_documents": 60},
    train={"max_steps": 4, "micro_batch_size": 2, "grad_accum": 2, "lr": 1e-3, "seed": 0},
    eval={"interval": 2, "max_batches": 1}, checkpoint={"interval": 2, "keep_last": 3},
)


def _one_process(recipe, *overrides):
    result = subprocess.run([sys.executable, "-m", "kd.launch", "--recipe", str(recipe), *overrides], cwd=REPO,
                            timeout=600, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return {r["step"]: r for r in read_metrics(recipe.parent / "run") if "loss" in r}


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    recipe = make_tiny_run(root, **SECTIONS)
    store = root / "store2"
    result = run_kd("precompute", str(recipe), "--k", "8", "--out", str(store), "--shard-samples", "64",
                    "--nproc", "2")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "store complete" in result.stderr
    return root, recipe, store


def test_two_ranks_write_the_store_one_process_writes(stored, tmp_path):
    root, recipe_path, store = stored
    recipe = load_recipe(str(recipe_path), ["teacher.zero_stage=0"])  # one process, a plain replica
    args = argparse.Namespace(k=8, format="plain", shard_samples=64, batch_size=None)
    single = precompute(args, recipe, str(tmp_path / "store1"), log=lambda m: None)
    two = fmt.read_manifest(str(store))
    for key in ("samples", "num_samples", "tokenizer_sha256", "vocab_size", "k", "temperature", "teacher"):
        assert two[key] == single[key], key
    assert [r["tokens"] for r in two["shards"]["train"]] == [r["tokens"] for r in single["shards"]["train"]]
    for split in ("train", "eval"):
        for a, b in zip(two["shards"][split], single["shards"][split]):
            x, y = fmt.read_shard(str(store), a, "plain"), fmt.read_shard(str(tmp_path / "store1"), b, "plain")
            assert torch.equal(x.offsets, y.offsets)
            # the same top 8 (a near-tie could swap the order of two, never the set)
            assert torch.equal(x.ids.sort(-1).values, y.ids.sort(-1).values)
            assert torch.allclose(x.logprobs.sort(-1).values, y.logprobs.sort(-1).values, atol=1e-5)
            assert torch.allclose(x.tail, y.tail, atol=1e-5) and torch.allclose(x.label, y.label, atol=1e-5)


def test_training_from_the_store_resumes_bitwise_and_a_foreign_store_is_refused(stored, tmp_path):
    root, recipe_path, store = stored
    sections = dict(SECTIONS, run={"nproc": 1}, teacher={"path": str(root / "teacher"), "store": str(store)},
                    data={**SECTIONS["data"], "train": {"path": str(root / "corpus.jsonl")}})
    run_a = make_tiny_run(tmp_path / "a", **sections)
    records = _one_process(run_a)
    assert sorted(records) == [1, 2, 3, 4]
    evals = [r for r in read_metrics(tmp_path / "a" / "run") if "eval/kl" in r]
    assert evals and all(0 <= r["eval/kl"] < 1 and r["eval/teacher_ppl"] > 1 for r in evals)
    run_b = make_tiny_run(tmp_path / "b", **sections, resume=str(tmp_path / "a" / "run" / "checkpoints" / "step_00000002"))
    resumed = _one_process(run_b)
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert (resumed[step]["loss"], resumed[step]["grad_norm"]) == (records[step]["loss"], records[step]["grad_norm"])
    # another temperature and sequence length than the store's: one message listing both, before any rank starts
    result = run_kd("train", str(run_a), "loss.temperature=2.0", "data.seq_len=24", "resume=never")
    assert result.returncode == EXIT_USER_ERROR, result.stderr[-3000:]
    assert "kd: launching" not in result.stderr
    assert "temperature: store 1.0, run 2.0" in result.stderr and "seq_len: store 32, run 24" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_two_ranks_from_the_store_sigkill_and_resume_bitwise(stored, tmp_path):
    root, _, store = stored
    sections = dict(SECTIONS, teacher={"path": str(root / "teacher"), "store": str(store)},
                    data={**SECTIONS["data"], "train": {"path": str(root / "corpus.jsonl")}},
                    train={**SECTIONS["train"], "max_steps": 6})
    reference = make_tiny_run(tmp_path / "ref", **sections)
    assert run_kd("train", str(reference)).returncode == 0
    ref = {r["step"]: r for r in read_metrics(tmp_path / "ref" / "run") if "loss" in r}
    recipe = make_tiny_run(tmp_path / "kill", **sections)
    job = start_kd("train", str(recipe), log_path=tmp_path / "first.log")
    wait_for(lambda: last_step(tmp_path / "kill" / "run") >= 3, timeout=300, what="step 3", proc=job)
    os.kill(rank_pids(str(recipe))[1], signal.SIGKILL)
    assert job.wait(timeout=120) != 0
    result = run_kd("train", str(recipe))
    assert result.returncode == 0, result.stderr[-3000:]
    got = {r["step"]: r for r in read_metrics(tmp_path / "kill" / "run") if "loss" in r}
    assert [got[s]["loss"] for s in range(1, 7)] == [ref[s]["loss"] for s in range(1, 7)]
