"""The loss of a step is the mean over every loss token of the step, however the batch is split.

Chat data of uneven lengths (uneven padding). The same 4 samples per step run as 1 rank x 4 micro-batches,
2 ranks x 2 micro-batches and 2 ranks x 1 micro-batch of 2 (padded); loss and gradient norm must agree with each
other and with a direct computation: sum of per-token KL over the 4 samples / their total loss tokens, gradient of that.
A mean of means (per micro-batch or per rank) gives different numbers here.
"""
from __future__ import annotations

import pytest
import torch

from tests.helpers.tiny_run import make_tiny_run, write_chat
from tests.integration.conftest import run_kd, train_records

pytestmark = pytest.mark.integration

SPLITS = {"1x4": (1, 1, 4), "2x2": (2, 1, 2), "2x1x2": (2, 2, 1)}  # nproc, micro_batch_size, grad_accum


def _recipe(root, mbs, ga):
    root.mkdir(parents=True)
    write_chat(root / "chat.jsonl")
    return make_tiny_run(
        root,
        data={"kind": "chat", "train": {"path": str(root / "chat.jsonl")}, "seq_len": 64, "eval_fraction": 0.1},
        train={"max_steps": 2, "micro_batch_size": mbs, "grad_accum": ga, "lr": 1e-3, "seed": 0, "grad_clip": 0.0},
        eval={"interval": 0, "at_start": False, "max_batches": 1},
        checkpoint={"interval": 0, "at_end": False},
    )


def _reference_step1(recipe_path):
    """Step 1 computed in one process with plain torch: token-mean forward KL over the step's 4 samples."""
    from kd.config import load_recipe
    from kd.data import GlobalSampler, build_datasets
    from kd.models import load_student, load_teacher, load_tokenizer

    recipe = load_recipe(str(recipe_path))
    tokenizer = load_tokenizer(recipe.teacher.path)
    train_ds, _ = build_datasets(recipe.data, tokenizer, seed=recipe.train.seed)
    sampler = GlobalSampler(len(train_ds), seed=recipe.train.seed, shuffle=recipe.data.shuffle)
    teacher = load_teacher(recipe.teacher, zero3_config=None)
    student = load_student(recipe.student, teacher_cfg=recipe.teacher, seed=recipe.train.seed, zero3_config=None)
    total, tokens = 0.0, 0
    for g in range(4):
        sample = train_ds[sampler.sample_id(g)]
        ids = torch.tensor([sample["input_ids"]])
        labels = torch.tensor(sample["labels"])[1:]
        mask = labels != -100
        s = torch.log_softmax(student(ids).logits[0, :-1].float(), -1)[mask]
        with torch.no_grad():
            t = torch.log_softmax(teacher(ids).logits[0, :-1].float(), -1)[mask]
        total = total + torch.nn.functional.kl_div(s, t, log_target=True, reduction="sum")
        tokens += int(mask.sum())
    loss = total / tokens
    loss.backward()
    grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in student.parameters() if p.grad is not None))
    return float(loss.detach()), float(grad_norm)


def test_same_loss_and_gradients_for_any_split(tmp_path):
    results = {}
    for name, (nproc, mbs, ga) in SPLITS.items():
        recipe = _recipe(tmp_path / name, mbs, ga)
        result = run_kd("train", str(recipe), "--nproc", str(nproc))
        assert result.returncode == 0, result.stderr[-5000:]
        results[name] = train_records(tmp_path / name / "run")
    loss, grad_norm = _reference_step1(tmp_path / "1x4" / "recipe.yaml")
    for name, records in results.items():
        assert records[1]["loss"] == pytest.approx(loss, rel=1e-5), name
        assert records[1]["grad_norm"] == pytest.approx(grad_norm, rel=1e-4), name
        for step in (1, 2):
            assert records[step]["loss"] == pytest.approx(results["1x4"][step]["loss"], rel=1e-5), (name, step)
            assert records[step]["grad_norm"] == pytest.approx(results["1x4"][step]["grad_norm"], rel=1e-4), (name, step)
            assert records[step]["train/loss_tokens"] == results["1x4"][step]["train/loss_tokens"]
