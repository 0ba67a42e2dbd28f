"""collate (padding, masks, labels) and the eval split over ranks."""
from __future__ import annotations

import datasets
import torch

from kd.data import collate, eval_batches, num_eval_batches, take


def test_collate_pads_right_and_masks_labels():
    samples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = collate(samples, pad_token_id=1)
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 6, 7], [8, 1, 1]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1], [1, 0, 0]]))
    assert torch.equal(batch["labels"], torch.tensor([[-100, 6, 7], [8, -100, -100]]))
    assert all(t.dtype == torch.long for t in batch.values())


def _eval_set(n):
    return datasets.Dataset.from_dict({"input_ids": [[i, i] for i in range(n)], "labels": [[i, i] for i in range(n)]})


def test_eval_shards_cover_every_sample_once_with_equal_batch_counts():
    for n, world, mbs in [(10, 3, 2), (7, 2, 4), (2, 4, 1), (12, 2, 3)]:
        ds = _eval_set(n)
        seen, counts = [], []
        for rank in range(world):
            batches = list(eval_batches(ds, rank=rank, world_size=world, micro_batch_size=mbs))
            counts.append(len(batches))
            for batch in batches:
                assert 1 <= len(batch) <= mbs
                seen += [s["input_ids"][0] for s in batch if any(label != -100 for label in s["labels"])]
        assert sorted(seen) == list(range(n)), (n, world, mbs)
        # Every rank runs the same number of forwards: ceil(ceil(n / world) / mbs).
        assert counts == [-(-(-(-n // world)) // mbs)] * world
        assert counts[0] == num_eval_batches(n, world_size=world, micro_batch_size=mbs)


def test_filler_batch_adds_no_loss_tokens():
    ds = _eval_set(3)  # 2 ranks, mbs 1: rank 1 has one row, rank 0 two -> rank 1 gets a filler
    batches = list(eval_batches(ds, rank=1, world_size=2, micro_batch_size=1))
    assert len(batches) == 2 and batches[0] == [{"input_ids": [1, 1], "labels": [1, 1]}]
    assert batches[1] == [{"input_ids": [0, 0], "labels": [-100, -100]}]


def test_max_batches_limits_each_rank():
    ds = _eval_set(20)
    batches = list(eval_batches(ds, rank=0, world_size=2, micro_batch_size=2, max_batches=3))
    assert [[s["input_ids"][0] for s in b] for b in batches] == [[0, 2], [4, 6], [8, 10]]


def test_take_returns_rows_in_order():
    ds = _eval_set(5)
    assert take(ds, [3, 0, 3]) == [{"input_ids": [3, 3], "labels": [3, 3]}, {"input_ids": [0, 0], "labels": [0, 0]},
                                   {"input_ids": [3, 3], "labels": [3, 3]}]
