"""kind: text — tokenize documents, then pack them into blocks of exactly `seq_len` tokens.

Each document becomes its tokens followed by one EOS (no other special tokens), so the model sees where documents
end. The token streams of all documents are concatenated in order and cut into `seq_len` blocks; the tail that does
not fill a last block is dropped. Labels equal the input ids (the trainer shifts them).

Tokenization runs through `Dataset.map`, so `datasets` caches it under a fingerprint of (data, tokenizer, settings)
and a second build reads the cache. Packing is then a zero-copy Arrow view over the cached, memory-mapped token
column: blocks are new list offsets over the same token buffer, so packing costs no tokenization and almost no memory
even for large corpora (only a block that straddles two Arrow chunks is copied, `seq_len` tokens at a time).
"""
from __future__ import annotations

from typing import Any

import datasets
import numpy as np
import pyarrow as pa

from kd.config.schema import DataConfig
from kd.data.sources import require_columns
from kd.data.stats import DataStats, attach_stats
from kd.errors import UserError

TOKEN_FEATURES = datasets.Features({"input_ids": datasets.List(datasets.Value("int32"))})
# Documents handed to Arrow per packing step; bounds the memory of one step, not the result.
_PACK_BATCH = 10_000


def _tokenize_batch(batch: dict[str, list], indices: list[int], *, tokenizer: Any, text_field: str,
                    eos_id: int) -> dict[str, list]:
    """`Dataset.map` function: tokens of each document + EOS; empty or missing documents give no tokens."""
    texts = batch[text_field]
    for index, text in zip(indices, texts):
        if text is not None and not isinstance(text, str):
            raise UserError(f"sample {index}: {text_field!r} holds {type(text).__name__}, expected a string",
                            key="data.text_field")
    present = [i for i, text in enumerate(texts) if text]
    out: list[list[int]] = [[] for _ in texts]
    if not present:  # tokenizers fail on an empty batch
        return {"input_ids": out}
    encoded = tokenizer([texts[i] for i in present], add_special_tokens=False, verbose=False)["input_ids"]
    for i, ids in zip(present, encoded):
        out[i] = ids + [eos_id]
    return {"input_ids": out}


def check_columns(rows: datasets.Dataset, cfg: DataConfig, split: str) -> None:
    """Raise `UserError` (naming the columns present) when `rows` lacks `cfg.text_field`."""
    require_columns(rows, {"data.text_field": cfg.text_field}, what=split)


def tokenize_documents(rows: datasets.Dataset, tokenizer: Any, cfg: DataConfig, *, split: str) -> datasets.Dataset:
    """Tokenize the `cfg.text_field` column of `rows` (cached by `datasets`); returns one `input_ids` row per document."""
    check_columns(rows, cfg, split)
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise UserError("the tokenizer has no EOS token, which kind: text appends after every document; "
                        "use a tokenizer that defines eos_token", key="tokenizer")
    return rows.map(
        _tokenize_batch,
        with_indices=True,
        batched=True,
        remove_columns=rows.column_names,
        features=TOKEN_FEATURES,
        fn_kwargs={"tokenizer": tokenizer, "text_field": cfg.text_field, "eos_id": eos_id},
        num_proc=cfg.num_proc if cfg.num_proc > 1 else None,
        desc=f"Tokenizing {split} documents",
    )


def _blocks(values: pa.Array, seq_len: int) -> pa.ListArray:
    """`values` (a multiple of seq_len long) viewed as a list array of seq_len blocks, sharing its buffer."""
    offsets = pa.array(np.arange(0, len(values) + 1, seq_len, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, values)


def pack_blocks(tokens: datasets.Dataset, seq_len: int) -> tuple[datasets.Dataset, int]:
    """Concatenate every row's `input_ids` in order and cut into `seq_len` blocks.

    Returns (dataset with `input_ids` and `labels` (the same blocks), number of tokens dropped after the last block).
    """
    chunks: list[pa.Array] = []
    pending: list[pa.Array] = []  # tokens carried into the next block, fewer than seq_len in total
    n_pending = 0
    for table in tokens.with_format("arrow").iter(batch_size=_PACK_BATCH):
        for chunk in table.column("input_ids").chunks:
            values = chunk.flatten()
            if n_pending:
                need = seq_len - n_pending
                if len(values) < need:
                    pending.append(values)
                    n_pending += len(values)
                    continue
                # The one copy: a block assembled from the carried tail and the head of this chunk.
                chunks.append(_blocks(pa.concat_arrays(pending + [values.slice(0, need)]), seq_len))
                values = values.slice(need)
                pending, n_pending = [], 0
            full = len(values) // seq_len * seq_len
            if full:
                chunks.append(_blocks(values.slice(0, full), seq_len))
            if full < len(values):
                pending, n_pending = [values.slice(full)], len(values) - full
    column = pa.chunked_array(chunks, type=pa.list_(pa.int32()))
    table = pa.Table.from_arrays([column, column], names=["input_ids", "labels"])
    return datasets.Dataset(datasets.table.InMemoryTable(table)), n_pending


def build_text(rows: datasets.Dataset, tokenizer: Any, cfg: DataConfig, *, split: str) -> datasets.Dataset:
    """Documents -> packed `seq_len` blocks with labels, with `DataStats` attached (see kd.data.stats)."""
    tokens = tokenize_documents(rows, tokenizer, cfg, split=split)
    packed, dropped = pack_blocks(tokens, cfg.seq_len)
    n_tokens = len(packed) * cfg.seq_len
    if len(packed) == 0:
        raise UserError(
            f"no samples: the {split} data ({len(rows)} documents) holds {dropped} tokens, fewer than "
            f"seq_len={cfg.seq_len}; add data or lower data.seq_len",
            key="data.eval_fraction" if split == "held-out eval" else "data.seq_len")
    stats = DataStats(kind="text", documents=len(rows), samples=len(packed), tokens=n_tokens,
                      loss_tokens=n_tokens, dropped_tokens=dropped)
    return attach_stats(packed, stats)
