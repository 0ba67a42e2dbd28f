"""The teacher store (issue 15): the stored signal against a direct computation, both formats, shards that are
damaged or unfinished, manifests that do not fit the run, resumption of a killed precompute, and the store teacher
source serving exactly what the teacher said, all in one process on a tiny model."""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import pytest
import torch

from kd.config.loader import load_recipe
from kd.data import build_datasets
from kd.data.collate import collate, eval_batches, take
from kd.errors import UserError
from kd.labels import IGNORE_INDEX
from kd.preflight import load_recipe_tokenizer
from kd.store import format as fmt
from kd.store.identity import differences, expected_identity
from kd.store.precompute import batch_tokens, precompute, topk_signal
from tests.helpers.tiny_run import make_tiny_run


# ------------------------------------------------------------------ the signal
def test_topk_signal_matches_a_float64_computation():
    torch.manual_seed(0)
    logits, labels = torch.randn(7, 40) * 3, torch.randint(0, 37, (7,))
    ids, lp, tail, label = topk_signal(logits, labels, vocab_size=37, k=5, temperature=2.0)
    ref = torch.log_softmax(logits[:, :37].double() / 2.0, dim=-1)  # columns past the vocabulary are not tokens
    want_lp, want_ids = ref.topk(5, dim=-1)
    assert torch.equal(ids, want_ids) and torch.allclose(lp.double(), want_lp, atol=1e-6)
    assert torch.allclose(tail.double(), torch.log1p(-want_lp.exp().sum(-1)), atol=1e-5)
    assert torch.allclose(label.double(), ref.gather(-1, labels[:, None]).squeeze(-1), atol=1e-6)
    # k = V: nothing outside the top k
    _, _, tail_all, _ = topk_signal(logits, labels, vocab_size=37, k=37, temperature=1.0)
    assert torch.isinf(tail_all).all() and (tail_all < 0).all()


def test_batch_tokens_keep_the_loss_positions_of_each_sample_in_order():
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[IGNORE_INDEX, 3, IGNORE_INDEX, 4, 5], [IGNORE_INDEX, IGNORE_INDEX, 1, 2, IGNORE_INDEX]])
    tokens = batch_tokens(logits, labels, vocab_size=11, k=3, temperature=1.0)
    assert tokens.offsets.tolist() == [0, 3, 5]  # sample 0 predicts labels 3, 4, 5; sample 1 labels 1, 2
    positions = [(0, 0), (0, 2), (0, 3), (1, 1), (1, 2)]  # position i predicts label i + 1
    for row, (b, i) in enumerate(positions):
        want = torch.log_softmax(logits[b, i], -1).topk(3)
        assert torch.equal(tokens.ids[row], want.indices)
        assert tokens.label[row] == pytest.approx(torch.log_softmax(logits[b, i], -1)[labels[b, i + 1]].item())


def _tokens(n_tok=30, k=6, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    lp_full = torch.log_softmax(torch.randn(n_tok, vocab, generator=g) * 2, -1)
    lp, ids = lp_full.topk(k, -1)
    tail = torch.logsumexp(lp_full.scatter(-1, ids, float("-inf")), -1)
    return fmt.ShardTokens(torch.tensor([0, 10, 10, n_tok]), ids, lp, tail, lp_full[:, 0]), lp_full


def test_plain_is_exact_and_compact_is_close_and_still_a_distribution():
    tokens, lp_full = _tokens()
    plain = fmt.decode(fmt.encode(tokens, "plain", 50), "plain")
    for name in ("offsets", "ids", "logprobs", "tail", "label"):
        assert torch.equal(getattr(plain, name), getattr(tokens, name).to(getattr(plain, name).dtype)), name
    compact = fmt.decode(fmt.encode(tokens, "compact", 50), "compact")
    assert torch.equal(compact.offsets, tokens.offsets)
    for row in range(tokens.ids.shape[0]):  # the same tokens (stored sorted by id), close log-probs
        order = tokens.ids[row].argsort()
        assert torch.equal(compact.ids[row], tokens.ids[row][order])
        span = (tokens.logprobs[row].max() - tokens.logprobs[row].min()).item()
        assert (compact.logprobs[row] - tokens.logprobs[row][order]).abs().max() <= span / 255 + 2e-2
    total = torch.logsumexp(torch.cat([compact.logprobs, compact.tail[:, None]], -1), -1)
    assert torch.allclose(total, torch.zeros_like(total), atol=1e-5)
    assert len(fmt.encode(tokens, "compact", 50)) < len(fmt.encode(tokens, "plain", 50))


def test_damaged_and_unfinished_shards_are_refused_or_redone(tmp_path):
    tokens, _ = _tokens()
    record = fmt.write_shard(str(tmp_path), "train", 3, tokens, fmt="plain", vocab_size=50, first=0)
    assert fmt.finished_shard(str(tmp_path), "train", 3) == record
    assert fmt.read_shard(str(tmp_path), record, "plain").ids.shape == tokens.ids.shape
    data = tmp_path / record["file"]
    raw = data.read_bytes()
    data.write_bytes(raw[:-7])  # truncated
    assert fmt.finished_shard(str(tmp_path), "train", 3) is None  # a precompute writes it again
    with pytest.raises(UserError, match=r"shard shards/train-00003.st has \d+ bytes, the manifest says .*truncated"):
        fmt.read_shard(str(tmp_path), record, "plain")
    data.write_bytes(raw[:100] + bytes([raw[100] ^ 1]) + raw[101:])  # one flipped bit
    with pytest.raises(UserError, match="does not match its checksum"):
        fmt.read_shard(str(tmp_path), record, "plain")
    data.unlink()
    with pytest.raises(UserError, match="cannot read shard shards/train-00003.st"):
        fmt.read_shard(str(tmp_path), record, "plain")
    assert fmt.finished_shard(str(tmp_path), "train", 4) is None  # never written


def test_a_store_without_manifest_or_of_another_version_is_not_read(tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        fmt.read_manifest(str(tmp_path / "none"))
    with pytest.raises(UserError, match="has no manifest.json: the precompute that writes it did not finish"):
        fmt.read_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 99, "format": "plain"}))
    with pytest.raises(UserError, match="version 99 is not one this kd reads"):
        fmt.read_manifest(str(tmp_path))


# ------------------------------------------------------------------ a real store of a tiny teacher
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    recipe_path = make_tiny_run(root, run={"nproc": 1}, teacher={"path": str(root / "teacher"), "zero_stage": 0},
                                data={"max_documents": 40})
    recipe = load_recipe(str(recipe_path))
    tokenizer = load_recipe_tokenizer(recipe)
    train, evaluation = build_datasets(recipe.data, tokenizer, seed=recipe.train.seed)
    args = argparse.Namespace(k=7, format="plain", shard_samples=8, batch_size=3)
    store = str(root / "store")
    manifest = precompute(args, recipe, store, log=lambda m: None)
    return dict(root=root, recipe_path=recipe_path, recipe=recipe, tokenizer=tokenizer, train=train,
                eval=evaluation, store=store, manifest=manifest, args=args)


def _teacher_logits(tiny, batch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny["root"] / "teacher").eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_the_store_teacher_serves_what_the_teacher_said(tiny):
    from kd.teachers.store import build_store_teacher
    from kd.teachers.base import TeacherRequest

    recipe = tiny["recipe"].model_copy(update={"teacher": tiny["recipe"].teacher.model_copy(
        update={"store": tiny["store"]})})
    source = build_store_teacher(recipe, device=torch.device("cpu"), resolve_path=lambda p: p,
                                 tokenizer=tiny["tokenizer"], splits={"train": tiny["train"], "eval": tiny["eval"]})
    assert source.info.signals == ("sparse",) and source.info.vocab_size == len(tiny["tokenizer"])
    pad = tiny["tokenizer"].pad_token_id
    for split, rows in (("train", [17, 3, 30]), ("eval", [1, 0])):
        batch = collate(take(tiny[split], rows), pad)
        out = source(batch, TeacherRequest(signal="sparse"))
        logits = _teacher_logits(tiny, batch)
        vocab = len(tiny["tokenizer"])
        for b in range(len(rows)):
            for i in range(batch["input_ids"].shape[1] - 1):
                label = batch["labels"][b, i + 1].item()
                if label == IGNORE_INDEX:
                    continue
                lp = torch.log_softmax(logits[b, i, :vocab].double(), -1)
                top = lp.topk(7)
                assert set(out.topk_ids[b, i].tolist()) == set(top.indices.tolist())
                assert torch.allclose(out.topk_logprobs[b, i].double(), top.values, atol=1e-5)
                assert out.tail_logprob[b, i].item() == pytest.approx(math.log1p(-top.values.exp().sum().item()),
                                                                      abs=1e-4)
                assert out.label_logprob[b, i].item() == pytest.approx(lp[label].item(), abs=1e-5)
    # the weightless filler of an uneven eval share (row 0, every label ignored) is served too
    filler = next(b for b in eval_batches(tiny["eval"], rank=1, world_size=len(tiny["eval"]) + 1,
                                          micro_batch_size=1))
    assert source(collate(filler, pad), TeacherRequest(signal="sparse")).topk_ids.shape[-1] == 7
    with pytest.raises(ValueError, match="only holds a sparse top-k signal"):
        source(batch)


def test_a_store_for_another_run_is_refused_with_every_difference(tiny):
    from kd.teachers.store import build_store_teacher

    recipe = load_recipe(str(tiny["recipe_path"]), [f"teacher.store={tiny['store']}", "loss.temperature=2.0",
                                                    "data.seq_len=24"])
    tokenizer = tiny["tokenizer"]
    train, evaluation = build_datasets(recipe.data, tokenizer, seed=recipe.train.seed)
    with pytest.raises(UserError) as info:
        build_store_teacher(recipe, device=torch.device("cpu"), resolve_path=lambda p: p, tokenizer=tokenizer,
                            splits={"train": train, "eval": evaluation})
    message = str(info.value)
    assert "computed for another run" in message and "temperature: store 1.0, run 2.0 (set loss.temperature" in message
    assert "seq_len: store 32, run 24" in message and "samples:" in message and "tokenizer" not in message
    expected = expected_identity(recipe, tokenizer, len(tokenizer), train, evaluation)
    assert [line.split(":")[0] for line in differences(tiny["manifest"], expected)] == [
        "temperature", "seq_len", "samples", "num_samples"]


def test_a_killed_precompute_redoes_only_its_unfinished_shards(tiny, tmp_path):
    import shutil

    store = tmp_path / "store"
    shutil.copytree(tiny["store"], store)
    (store / "manifest.json").unlink()  # killed before the end ...
    (store / "shards" / "train-00001.json").unlink()  # ... while shard 1 was being written
    (store / "shards" / "train-00001.st").write_bytes(b"partial")
    before = {p.name: p.stat().st_mtime_ns for p in (store / "shards").iterdir()}
    manifest = precompute(tiny["args"], tiny["recipe"], str(store), log=lambda m: None)
    after = {p.name: p.stat().st_mtime_ns for p in (store / "shards").iterdir()}
    assert sorted(n for n in after if after[n] != before.get(n)) == ["train-00001.json", "train-00001.st"]
    strip = lambda m: {k: v for k, v in m.items() if k != "created_unix"}  # noqa: E731
    assert strip(manifest) == strip(tiny["manifest"])  # the same store as an uninterrupted precompute
    # resumed with other settings into the same directory: refused, nothing written
    other = argparse.Namespace(**{**vars(tiny["args"]), "k": 5})
    with pytest.raises(UserError, match=r"already holds \(part of\) another store; it differs in: k: store 7, run 5"):
        precompute(other, tiny["recipe"], str(store), log=lambda m: None)


def test_held_out_metrics_from_a_full_store_equal_the_dense_ones():
    from kd.eval_metrics import batch_sums, sparse_batch_sums

    torch.manual_seed(3)
    student, teacher = torch.randn(2, 6, 13), torch.randn(2, 6, 13) * 2
    labels = torch.randint(0, 13, (2, 6))
    labels[0, :2] = IGNORE_INDEX
    lp = torch.log_softmax(teacher, -1)
    values, ids = lp.topk(13, -1)  # k = V: the store holds the whole distribution
    tail = torch.full((2, 6), -torch.inf)
    sparse = sparse_batch_sums(student, ids, values, tail, lp.gather(-1, labels.clamp_min(0)[..., None])[..., 0],
                               labels)
    assert torch.allclose(sparse, batch_sums(student, teacher, labels), atol=1e-5)


@pytest.mark.parametrize("field", ["tokenizer_sha256", "chat_template_sha256", "vocab_size", "temperature", "seq_len",
                                   "data_kind", "teacher", "samples", "num_samples"])
def test_each_identity_field_of_the_manifest_is_checked(tiny, field):
    from kd.teachers.store import check_store

    expected = expected_identity(tiny["recipe"], tiny["tokenizer"], len(tiny["tokenizer"]), tiny["train"], tiny["eval"])
    assert differences(tiny["manifest"], expected) == []
    altered = {**tiny["manifest"], field: "something else"}
    with pytest.raises(UserError) as info:
        check_store(tiny["store"], altered, expected)
    assert f"differs in: {field}: store \"something else\"" in str(info.value)
