"""Readable samples of generated steps (issue 12 item 5): which steps write them, what a pair holds (checked against
the data sample and the produced training batch, not against the producer's own bookkeeping), samples.jsonl and
TensorBoard text on rank 0, and what a resume does to the file (superseded steps dropped, re-done steps written
once, a line cut short by a crash ignored). One process, a tiny random Llama, no DeepSpeed."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kd.config.schema import DataConfig, OnPolicyConfig
from kd.data import SampledBatches, build_datasets
from kd.generation.engines import Target
from kd.generation.on_policy import OnPolicyBatches, is_on_policy, logs_samples, prompt_of
from kd.labels import IGNORE_INDEX
from kd.metrics import SAMPLES_FILE, MetricsLogger
from tests.helpers.tiny import build_tiny_tokenizer
from tests.helpers.tiny_run import write_chat

SEQ_LEN, NEW = 64, 6


def test_sample_steps_are_the_first_generated_step_of_each_block():
    for seed, lmbda, interval in [(0, 0.5, 4), (3, 0.2, 5), (1, 1.0, 3), (2, 0.7, 1), (0, 0.5, 0), (0, 0.0, 2)]:
        expected, logged_blocks = [], set()
        for step in range(1, 61):  # walk the steps: a block logs its first on-policy step, once
            block = (step - 1) // interval if interval else None
            if interval and is_on_policy(seed, step, lmbda) and block not in logged_blocks:
                logged_blocks.add(block)
                expected.append(step)
        assert [s for s in range(1, 61) if logs_samples(seed, s, lmbda, interval)] == expected
    assert [s for s in range(1, 10) if logs_samples(0, s, 1.0, 3)] == [1, 4, 7]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("samples")
    tok = build_tiny_tokenizer()
    cfg = DataConfig(kind="chat", train={"path": str(write_chat(root / "chat.jsonl", samples=24))}, eval_fraction=0.0,
                     seq_len=SEQ_LEN)
    ds, _ = build_datasets(cfg, tok, seed=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=None, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)).eval()
    with torch.no_grad():  # make EOS likely, so that some rows end by EOS and some by length
        model.lm_head.weight[tok.eos_token_id] = model.lm_head.weight[tok.eos_token_id] * 0 + 0.4
    return tok, ds, model


def _producer(setup, **on_policy):
    tok, ds, model = setup
    sampled = SampledBatches(ds, seed=0, shuffle=True, rank=0, world_size=1, micro_batch_size=2, grad_accum=2,
                             pad_id=tok.pad_token_id, device=torch.device("cpu"))
    cfg = OnPolicyConfig(max_new_tokens=NEW, **on_policy)
    return OnPolicyBatches(sampled, cfg, target=Target(model), seed=0, seq_len=SEQ_LEN, eos_id=tok.eos_token_id,
                           pad_id=tok.pad_token_id, vocab_size=len(tok), decode=tok.decode)


def test_a_pair_is_the_samples_prompt_and_the_trained_completion(setup):
    tok, ds, _ = setup
    producer = _producer(setup, lmbda=1.0, sample_interval=2, sample_count=3)
    reasons = set()
    for step in range(1, 5):
        batches, ids = producer.next_step(step)
        pairs = producer.step_samples()
        if step not in (1, 3):  # lmbda 1: every step generates, steps 1 and 3 open a block of 2
            assert pairs == []
            continue
        assert [p["sample"] for p in pairs] == [0, 1, 2]  # rank 0's first three rows: 2 of micro-batch 0, 1 of 1
        rows = [(0, 0), (0, 1), (1, 0)]
        for pair, (mb, r) in zip(pairs, rows):
            assert pair["sample_id"] == ids[mb][r]
            data = ds[ids[mb][r]]
            assert pair["prompt"] == tok.decode(prompt_of(data["input_ids"], data["labels"]))
            labels = batches[mb]["labels"][r]
            completion = batches[mb]["input_ids"][r][labels != IGNORE_INDEX].tolist()  # what the loss trained on
            assert pair["completion"] == tok.decode(completion) and pair["tokens"] == len(completion) >= 1
            ended = completion[-1] == tok.eos_token_id
            assert pair["finish_reason"] == ("eos" if ended else "length")
            assert ended or len(completion) == NEW
            reasons.add(pair["finish_reason"])
    assert reasons == {"eos", "length"}, reasons  # both kinds of ending were checked
    quiet = _producer(setup, lmbda=1.0, sample_interval=0)
    quiet.next_step(1)
    assert quiet.step_samples() == []


def test_a_resumed_producer_writes_the_same_pairs_for_the_steps_it_re_does(setup):
    first = _producer(setup, lmbda=1.0, sample_interval=1, sample_count=2, temperature=1.0)
    first.next_step(1)
    state, rank_state = first.state_dict(), first.rank_state()  # what the step-1 checkpoint holds
    after = [(first.next_step(s), first.step_samples())[1] for s in (2, 3)]
    resumed = _producer(setup, lmbda=1.0, sample_interval=1, sample_count=2, temperature=1.0)
    resumed.load_state_dict(state)
    resumed.load_rank_state(rank_state)
    assert [(resumed.next_step(s), resumed.step_samples())[1] for s in (2, 3)] == after


def _pairs(n: int, tag: str) -> list[dict]:
    return [{"sample": i, "sample_id": 7 + i, "prompt": f"<|user|>q{i} `x`", "completion": f"{tag} {i}",
             "tokens": 3, "finish_reason": "eos"} for i in range(n)]


def _lines(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / SAMPLES_FILE).read_text().splitlines()]


def _logger(run_dir, start):
    return MetricsLogger(str(run_dir), enabled=True, total_steps=10, start_step=start, progress_bar=False,
                         log_interval=1)


def test_samples_jsonl_on_resume_keeps_the_checkpointed_steps_and_gets_the_re_done_ones_once(tmp_path):
    run = _logger(tmp_path, 0)
    run.truncate_after(0)
    for step in (1, 2, 3, 4):
        run.log_samples(step, _pairs(2, f"first-{step}"))
    run.log_samples(5, [])  # a step without pairs writes nothing
    run.close()
    assert [(r["step"], r["sample"]) for r in _lines(tmp_path)] == [(s, i) for s in (1, 2, 3, 4) for i in (0, 1)]
    with open(tmp_path / SAMPLES_FILE, "a") as f:
        f.write('{"step": 5, "sample": 0, "prompt": "cut sh')  # the crash cut the last write short
    resumed = _logger(tmp_path, 2)  # the newest checkpoint is step 2: steps 3.. are done again
    resumed.truncate_after(2)
    for step in (3, 4, 5):
        resumed.log_samples(step, _pairs(1, f"again-{step}"))
    resumed.close()
    got = _lines(tmp_path)
    assert [(r["step"], r["completion"]) for r in got] == [
        (1, "first-1 0"), (1, "first-1 1"), (2, "first-2 0"), (2, "first-2 1"),
        (3, "again-3 0"), (4, "again-4 0"), (5, "again-5 0")]
    assert got[0] == {"step": 1, **_pairs(2, "first-1")[0]}
    fresh = _logger(tmp_path, 0)
    fresh.truncate_after(0)  # a fresh start in the same directory begins an empty file
    fresh.close()
    assert (tmp_path / SAMPLES_FILE).read_text() == ""


def test_samples_reach_tensorboard_as_text(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = _logger(tmp_path, 0)
    run.log_samples(3, _pairs(2, "tb"))
    run.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0}).Reload()
    (entry,) = events.Tensors("onpolicy/samples/text_summary")
    text = entry.tensor_proto.string_val[0].decode()
    assert entry.step == 3 and "**sample 1** (data sample 8, 3 tokens, ended by eos)" in text
    assert "    <|user|>q0 `x`" in text and "    tb 1" in text


def test_other_ranks_write_nothing(tmp_path):
    quiet = MetricsLogger(str(tmp_path / "r1"), enabled=False, total_steps=1, start_step=0, progress_bar=False,
                          log_interval=1)
    quiet.log_samples(1, _pairs(1, "x"))
    assert not (tmp_path / "r1").exists()


@pytest.mark.slow
@pytest.mark.integration
def test_a_run_writes_samples_and_a_resume_from_its_checkpoint_rewrites_only_the_re_done_steps(tmp_path):
    """Through the trainer (kd.launch, one process): an uninterrupted run's samples.jsonl, and the same run directory
    resumed from its step-2 checkpoint after a crash cut the file short: the file ends up identical (steps 3-4 once,
    the same text: the resume is bitwise)."""
    import os
    import subprocess
    import sys

    from tests.helpers.tiny_run import make_tiny_run
    from tests.integration.conftest import REPO

    write_chat(tmp_path / "chat.jsonl")
    sections = dict(
        run={"nproc": 1}, data={"kind": "chat", "train": {"path": str(tmp_path / "chat.jsonl")}, "seq_len": 48,
                                "eval_fraction": 0.1},
        loss={"name": "jsd", "beta": 0.5}, eval={"interval": 0, "at_start": False, "max_batches": 1},
        checkpoint={"interval": 2, "keep_last": 3},
        on_policy={"lmbda": 1.0, "max_new_tokens": 8, "gather": "always", "sample_interval": 1, "sample_count": 2})

    def run(recipe):
        result = subprocess.run([sys.executable, "-m", "kd.launch", "--recipe", str(recipe)], cwd=REPO, timeout=600,
                                capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-3000:]

    recipe = make_tiny_run(tmp_path / "a", **sections)
    run(recipe)
    samples = tmp_path / "a" / "run" / SAMPLES_FILE
    complete = samples.read_text()
    lines = [json.loads(line) for line in complete.splitlines()]
    assert [(r["step"], r["sample"]) for r in lines] == [(s, i) for s in (1, 2, 3, 4) for i in (0, 1)]
    assert all(r["prompt"] and 1 <= r["tokens"] <= 8 and r["finish_reason"] in ("eos", "length") for r in lines)
    samples.write_text(complete[: complete.index('{"step": 4') + 30])  # a crash during step 4's write
    resume = make_tiny_run(tmp_path / "a", **sections,
                           resume=str(tmp_path / "a" / "run" / "checkpoints" / "step_00000002"))
    run(resume)
    assert samples.read_text() == complete
