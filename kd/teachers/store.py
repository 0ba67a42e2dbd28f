"""A teacher store as a teacher source: the stored top-k signal of each sample, no teacher model in memory.

The store is addressed by sample: the rows of the tokenized train and eval splits it was computed on. The run's
datasets must be exactly those (the manifest's fingerprint of every sample is checked before training), so a row
index names the same tokens here as in `kd precompute`, on any number of ranks and across resumes.

A batch does not carry row indices (producers hand the trainer collated tensors), so rows are found by content: each
sample's unpadded input ids and labels hash to its row. A weightless filler row (a copy of row 0 with every label
ignored, see kd.data.collate.eval_batches) is found by its input ids alone; its loss positions are masked anyway.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from collections import OrderedDict
from typing import Any, Iterator, Optional

import numpy as np
import torch

from kd.errors import UserError
from kd.labels import IGNORE_INDEX
from kd.store.format import ShardTokens, read_manifest, read_shard
from kd.teachers.base import TeacherInfo, TeacherOutput, TeacherRequest

CACHED_SHARDS = 8  # decoded shards kept in memory (a shuffled step touches many; they are re-read when evicted)


def _key(ids: Any, labels: Optional[Any] = None) -> bytes:
    digest = hashlib.blake2b(np.asarray(ids, dtype=np.int64).tobytes(), digest_size=16)
    if labels is not None:
        digest.update(b"|")
        digest.update(np.asarray(labels, dtype=np.int64).tobytes())
    return digest.digest()


def check_store(store_dir: str, manifest: dict[str, Any], expected: dict[str, Any]) -> None:
    """Refuse a store that does not fit the run (every differing field listed) or whose shards are not all there."""
    from kd.store.identity import differences

    diff = differences(manifest, expected)
    if diff:
        raise UserError(f"the teacher store {store_dir} was computed for another run; it differs in: " +
                        "; ".join(diff) + ". Run `kd precompute` with this recipe to write a store for it",
                        key="teacher.store")
    for split, records in manifest["shards"].items():
        for record in records:
            path = os.path.join(store_dir, record["file"])
            if not os.path.isfile(path):
                raise UserError(f"shard {record['file']} of the store is missing", key="teacher.store", file=path)
            if os.path.getsize(path) != record["bytes"]:
                raise UserError(f"shard {record['file']} has {os.path.getsize(path)} bytes, the manifest says "
                                f"{record['bytes']} (truncated?); run `kd precompute` again", key="teacher.store",
                                file=path)


class StoreTeacher:
    """Serves `TeacherOutput`s of kind "sparse" from a store: [B, L, K] ids and log-probs, [B, L] log tail mass,
    aligned like logits (position i holds the teacher's distribution of token i + 1)."""

    def __init__(self, store_dir: str, manifest: dict[str, Any], splits: dict[str, Any], *, device: torch.device,
                 config: Any = None):
        self.store_dir, self.manifest, self.device = store_dir, manifest, device
        self.k = int(manifest["k"])
        self.format = manifest["format"]
        self._records = {split: records for split, records in manifest["shards"].items()}
        self._cache: OrderedDict[tuple[str, int], ShardTokens] = OrderedDict()
        self._rows: dict[bytes, tuple[str, int]] = {}
        self._by_ids: dict[bytes, tuple[str, int]] = {}
        self._splits = splits  # labels are read from the datasets when needed, not copied into Python lists
        for split, ds in splits.items():
            if ds is None:
                continue
            for start in range(0, len(ds), 1024):
                chunk = ds[start:start + 1024]
                for offset, (ids, labels) in enumerate(zip(chunk["input_ids"], chunk["labels"])):
                    row = (split, start + offset)
                    self._rows.setdefault(_key(ids, labels), row)
                    self._by_ids.setdefault(_key(ids), row)
        vocab = int(manifest["vocab_size"])
        self._info = TeacherInfo(
            name=f"store {store_dir}", vocab_size=vocab,
            hidden_size=int(getattr(config, "hidden_size", 0) or 0),
            num_layers=int(getattr(config, "num_hidden_layers", 0) or 0),
            has_linear_head=False, config=config, signals=("sparse",))

    @property
    def info(self) -> TeacherInfo:
        return self._info

    def _shard(self, split: str, row: int) -> tuple[ShardTokens, int]:
        records = self._records[split]
        size = records[0]["count"] if records else 1
        index = row // size
        record = records[index]
        cached = self._cache.get((split, index))
        if cached is None:
            cached = read_shard(self.store_dir, record, self.format)  # size and checksum checked here
            self._cache[(split, index)] = cached
            while len(self._cache) > CACHED_SHARDS:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end((split, index))
        return cached, row - record["first"]

    def _find(self, ids: list[int], labels: list[int]) -> tuple[str, int]:
        row = self._rows.get(_key(ids, labels))
        if row is None and all(y == IGNORE_INDEX for y in labels):
            row = self._by_ids.get(_key(ids))  # a weightless filler copy
        if row is None:
            raise UserError("a batch holds a sample that is not in the teacher store (the run's data differs from "
                            "the store's; this should have been caught by the manifest check)", key="teacher.store")
        return row

    @torch.no_grad()
    def __call__(self, batch: dict[str, torch.Tensor], request: TeacherRequest = TeacherRequest()) -> TeacherOutput:
        if request.signal != "sparse" or request.hidden:
            raise ValueError(f"a teacher store only holds a sparse top-k signal, not {request.signal!r}"
                             + (" with hidden states" if request.hidden else ""))
        input_ids, labels, mask = (batch[k].cpu() for k in ("input_ids", "labels", "attention_mask"))
        b, length = input_ids.shape
        # positions without a stored token get a harmless uniform top-k and no tail (they are never loss tokens)
        ids = torch.arange(self.k).expand(b, length, self.k).clone()
        logprobs = torch.full((b, length, self.k), -float(np.log(self.k)))
        tail = torch.full((b, length), -torch.inf)
        label = torch.zeros((b, length))
        for i in range(b):
            keep = mask[i].bool()
            split, row = self._find(input_ids[i][keep].tolist(), labels[i][keep].tolist())
            shard, local = self._shard(split, row)
            s_ids, s_lp, s_tail, s_label = shard.sample(local)
            row_labels = torch.tensor(self._splits[split][row]["labels"])
            # stored tokens sit at the positions predicting a loss label of the stored row, in order
            positions = torch.nonzero(keep, as_tuple=True)[0][:-1][row_labels[1:] != IGNORE_INDEX]
            if positions.numel() != s_ids.shape[0]:
                raise UserError(f"store row {split}/{row} holds {s_ids.shape[0]} tokens, the sample has "
                                f"{positions.numel()} loss tokens: the store is inconsistent; precompute it again",
                                key="teacher.store")
            ids[i, positions], logprobs[i, positions], tail[i, positions] = s_ids, s_lp, s_tail
            label[i, positions] = s_label
        return TeacherOutput(topk_ids=ids.to(self.device), topk_logprobs=logprobs.to(self.device),
                             tail_logprob=tail.to(self.device), label_logprob=label.to(self.device))

    @contextlib.contextmanager
    def head_weight(self) -> Iterator[torch.Tensor]:
        raise ValueError("a teacher store has no lm_head")
        yield  # pragma: no cover


def checked_manifest(recipe: Any, tokenizer: Any, splits: dict[str, Any]) -> dict[str, Any]:
    """The manifest of the store the recipe names, after checking it against the run (tokenizer, data, temperature,
    vocabulary, teacher) and that its shards are all there. `kd train` calls this before it starts any rank."""
    from kd.store.identity import expected_identity

    store_dir = os.path.abspath(recipe.teacher.store)
    manifest = read_manifest(store_dir)
    expected = expected_identity(recipe, tokenizer, len(tokenizer), splits.get("train"), splits.get("eval"))
    check_store(store_dir, manifest, expected)
    return manifest


def build_store_teacher(recipe: Any, *, device: torch.device, resolve_path, tokenizer: Any, splits: dict[str, Any]
                        ) -> StoreTeacher:
    """The store the recipe names as a teacher source (checked by `checked_manifest`)."""
    from kd.models import source_config

    manifest = checked_manifest(recipe, tokenizer, splits)
    config = source_config(recipe.teacher, section="teacher", resolve_path=resolve_path)
    return StoreTeacher(os.path.abspath(recipe.teacher.store), manifest, splits, device=device, config=config)
