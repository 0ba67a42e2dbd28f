"""kind: text — tokenization, packing into seq_len blocks, held-out split, caching, errors."""
from __future__ import annotations

import os
import random

import datasets
import pytest

from kd.config.schema import DataConfig
from kd.data import build_datasets, stats_of
from kd.data.build import hold_out
from kd.data.text import pack_blocks
from kd.errors import UserError
from tests.unit.data.data_helpers import documents, text_cfg, write_jsonl


def _stream(tokenizer, docs):
    """Reference token stream: each document's tokens followed by EOS, concatenated."""
    out = []
    for doc in docs:
        out += tokenizer.encode(doc, add_special_tokens=False) + [tokenizer.eos_token_id]
    return out


def _flat(ds):
    return [t for row in ds["input_ids"] for t in row]


def test_packing_equals_concatenated_documents(tmp_path, tokenizer):
    docs = documents(30)
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": d, "id": i} for i, d in enumerate(docs)])
    train, evaluation = build_datasets(text_cfg(path, seq_len=16, eval_fraction=0.0), tokenizer, seed=0)
    assert evaluation is None
    assert train.column_names == ["input_ids", "labels"]
    stream = _stream(tokenizer, docs)
    n_blocks = len(stream) // 16
    assert len(train) == n_blocks
    assert all(len(row) == 16 for row in train["input_ids"])
    assert _flat(train) == stream[: n_blocks * 16]
    assert train["labels"] == train["input_ids"]
    stats = stats_of(train)
    assert (stats.documents, stats.samples, stats.tokens, stats.dropped_tokens) == (
        30, n_blocks, n_blocks * 16, len(stream) - n_blocks * 16)


def test_max_documents_takes_the_first(tmp_path, tokenizer):
    docs = documents(30)
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in docs])
    train, _ = build_datasets(text_cfg(path, seq_len=8, eval_fraction=0.0, max_documents=5), tokenizer, seed=0)
    stream = _stream(tokenizer, docs[:5])
    assert _flat(train) == stream[: len(stream) // 8 * 8]


@pytest.mark.parametrize("seq_len", [1, 3, 7, 64])
def test_pack_blocks_across_arrow_chunks(seq_len):
    rng = random.Random(seq_len)
    # Several separately built datasets concatenated: the token column has one Arrow chunk each, so blocks straddle
    # chunk boundaries, and some chunks are shorter than one block.
    parts, rows = [], []
    for _ in range(7):
        part = [[rng.randrange(500) for _ in range(rng.choice([0, 1, 2, 5, 40]))] for _ in range(rng.randrange(1, 4))]
        rows += part
        parts.append(datasets.Dataset.from_dict({"input_ids": part},
                                                features=datasets.Features({"input_ids": datasets.List(datasets.Value("int32"))})))
    tokens = datasets.concatenate_datasets(parts)
    assert tokens.data.column("input_ids").num_chunks > 1
    packed, dropped = pack_blocks(tokens, seq_len)
    stream = [t for row in rows for t in row]
    n = len(stream) // seq_len
    assert packed["input_ids"] == [stream[i * seq_len:(i + 1) * seq_len] for i in range(n)]
    assert dropped == len(stream) - n * seq_len


def test_hold_out_is_disjoint_and_sized(tmp_path):
    rows = datasets.Dataset.from_dict({"id": list(range(40))})
    train, evaluation = hold_out(rows, 0.25, seed=3)
    assert len(evaluation) == 10 and len(train) == 30
    assert set(train["id"]).isdisjoint(evaluation["id"])
    assert set(train["id"]) | set(evaluation["id"]) == set(range(40))
    assert hold_out(rows, 0.25, seed=3)[1]["id"] == evaluation["id"]
    assert hold_out(rows, 0.25, seed=4)[1]["id"] != evaluation["id"]


def test_held_out_documents_are_not_trained_on(tmp_path, tokenizer):
    # One document per distinct token id, so the packed streams reveal which documents went where.
    words = ["fox", "dog", "teacher", "student", "France", "Paris", "seven", "eight", "nine", "ten"]
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": w} for w in words])
    train, evaluation = build_datasets(text_cfg(path, seq_len=8, eval_fraction=0.2), tokenizer, seed=0)
    assert (stats_of(train).documents, stats_of(evaluation).documents) == (8, 2)
    eos = tokenizer.eos_token_id

    def complete_documents(ds):
        # The stream is doc EOS doc EOS ...; the text after the last EOS may be cut by packing, so skip it.
        segments, current = [], []
        for token in _flat(ds):
            if token == eos:
                segments.append(tokenizer.decode(current))
                current = []
            else:
                current.append(token)
        return segments

    train_docs, eval_docs = complete_documents(train), complete_documents(evaluation)
    assert set(train_docs) <= set(words) and set(eval_docs) <= set(words)
    assert eval_docs and set(train_docs).isdisjoint(eval_docs)


def test_explicit_eval_source(tmp_path, tokenizer):
    train_path = write_jsonl(tmp_path / "train.jsonl", [{"text": d} for d in documents(10)])
    eval_path = write_jsonl(tmp_path / "eval.jsonl", [{"text": d} for d in documents(4)])
    cfg = DataConfig(train={"path": str(train_path)}, eval={"path": str(eval_path)}, seq_len=8)
    train, evaluation = build_datasets(cfg, tokenizer, seed=0)
    assert stats_of(train).documents == 10 and stats_of(evaluation).documents == 4
    stream = _stream(tokenizer, documents(4))
    assert _flat(evaluation) == stream[: len(stream) // 8 * 8]


def test_missing_text_field_lists_columns(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"body": "hello", "id": 1}])
    with pytest.raises(UserError) as err:
        build_datasets(text_cfg(path), tokenizer, seed=0)
    assert err.value.key == "data.text_field"
    assert "'text'" in err.value.message and "body" in err.value.message and "id" in err.value.message


def test_non_string_document_names_sample(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": "fine"}, {"text": "fine"}, {"text": 3}])
    with pytest.raises(UserError, match="sample 2") as err:
        build_datasets(text_cfg(path, eval_fraction=0.0), tokenizer, seed=0)
    assert err.value.key == "data.text_field"


def test_too_little_text_is_an_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": "tiny"}])
    with pytest.raises(UserError, match="no samples") as err:
        build_datasets(text_cfg(path, seq_len=64, eval_fraction=0.0), tokenizer, seed=0)
    assert err.value.key == "data.seq_len"


def _cache_state(cache_dir):
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, files in os.walk(cache_dir) for f in files if f.endswith(".arrow")}


def test_second_build_reads_the_cache(tmp_path, tokenizer, datasets_cache):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in documents(20)])
    cfg = text_cfg(path, seq_len=8, eval_fraction=0.2)
    first = build_datasets(cfg, tokenizer, seed=0)
    state = _cache_state(datasets_cache)
    assert any("cache-" in f for f in state)  # the tokenized documents were written to the cache
    second = build_datasets(cfg, tokenizer, seed=0)
    assert _cache_state(datasets_cache) == state  # nothing re-tokenized or rewritten
    assert second[0]["input_ids"] == first[0]["input_ids"] and second[1]["input_ids"] == first[1]["input_ids"]


def test_num_proc_gives_the_same_blocks(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in documents(20)])
    two, _ = build_datasets(text_cfg(path, seq_len=8, eval_fraction=0.0, num_proc=2), tokenizer, seed=0)
    one, _ = build_datasets(text_cfg(path, seq_len=8, eval_fraction=0.0), tokenizer, seed=0)
    assert one["input_ids"] == two["input_ids"]


def test_held_out_split_errors_point_at_eval_fraction(tmp_path, tokenizer):
    one_doc = write_jsonl(tmp_path / "one.jsonl", [{"text": documents(1)[0]}])
    with pytest.raises(UserError, match="cannot hold out") as err:
        build_datasets(text_cfg(one_doc, seq_len=8, eval_fraction=0.5), tokenizer, seed=0)
    assert err.value.key == "data.eval_fraction"
    # 30 documents, 2 held out: enough training blocks, but any 2 documents together fill no 256-token block.
    many = write_jsonl(tmp_path / "many.jsonl", [{"text": d} for d in documents(30)])
    lengths = sorted(len(_stream(tokenizer, [d])) for d in documents(30))
    assert sum(lengths[-2:]) < 256 <= sum(lengths[:-2])
    with pytest.raises(UserError, match="no samples") as err:
        build_datasets(text_cfg(many, seq_len=256, eval_fraction=0.04), tokenizer, seed=0)
    assert err.value.key == "data.eval_fraction"
