"""Batching: pad a list of samples into tensors, and split the eval set over ranks.

Samples are dicts with `input_ids` and `labels` lists of equal length (labels unshifted, -100 = no loss).
"""
from __future__ import annotations

import math
from typing import Iterator, Optional

import datasets
import torch

from kd.labels import IGNORE_INDEX


def collate(samples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad `samples` to the longest one.

    Returns int64 tensors of shape [B, L]: `input_ids` (padded with `pad_token_id`), `attention_mask` (1 = real
    token, 0 = padding) and `labels` (-100 on padding, so padding never counts as a loss token).
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    length = max(len(s["input_ids"]) for s in samples)
    input_ids = torch.full((len(samples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample["input_ids"])
        if len(sample["labels"]) != n:
            raise ValueError(f"sample {row}: {n} input_ids but {len(sample['labels'])} labels")
        input_ids[row, :n] = torch.as_tensor(sample["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.as_tensor(sample["labels"], dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def take(ds: datasets.Dataset, ids: list[int]) -> list[dict]:
    """Rows `ids` of `ds` as samples (one batched read instead of one read per row)."""
    columns = ds[ids]
    return [{"input_ids": x, "labels": y} for x, y in zip(columns["input_ids"], columns["labels"])]


def num_eval_batches(num_samples: int, *, world_size: int, micro_batch_size: int,
                     max_batches: Optional[int] = None) -> int:
    """Micro-batches every rank runs in `eval_batches` (the same on all ranks)."""
    per_rank = math.ceil(num_samples / world_size)
    batches = math.ceil(per_rank / micro_batch_size)
    return batches if max_batches is None else min(batches, max_batches)


def eval_batches(ds: datasets.Dataset, *, rank: int, world_size: int, micro_batch_size: int,
                 max_batches: Optional[int] = None) -> Iterator[list[dict]]:
    """Yield this rank's eval micro-batches (lists of samples, ready for `collate`).

    Rank r takes rows r, r + world, r + 2 * world, ... (strided, so with `max_batches` the evaluated rows are the
    first ones of the set whatever the world size). Without `max_batches` every row is seen by exactly one rank.

    Every rank yields the same number of micro-batches (`num_eval_batches`), because under ZeRO-3 each forward is a
    collective and a rank that stopped early would hang the others. A rank whose share is one row short gets, in
    place of the missing micro-batch, one copy of row 0 with every label -100: it runs the forward but adds no loss
    tokens, so sums and token counts are unchanged. The last real micro-batch of a rank may be smaller than
    `micro_batch_size`.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    rows = list(range(rank, len(ds), world_size))
    for b in range(num_eval_batches(len(ds), world_size=world_size, micro_batch_size=micro_batch_size,
                                    max_batches=max_batches)):
        ids = rows[b * micro_batch_size:(b + 1) * micro_batch_size]
        if ids:
            yield take(ds, ids)
        else:
            filler = take(ds, [0])[0]
            yield [{"input_ids": filler["input_ids"], "labels": [IGNORE_INDEX] * len(filler["labels"])}]
