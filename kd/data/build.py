"""`build_datasets`: the one call the trainer makes to get tokenized train and eval sets from the recipe's data section.

Steps: load the raw rows of each source, keep the first `max_documents`, hold out `eval_fraction` of the training
documents when no eval source is given (split before packing, so no document is in both), then tokenize by kind
(text: packed blocks; chat: one conversation per sample). Every expensive step is a cached `datasets` operation, so
the trainer lets rank 0 build first and the other ranks then read the cache. Nothing here touches torch.distributed.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import datasets

from kd.config.schema import DataConfig
from kd.data import chat, text
from kd.data.sources import load_source
from kd.errors import UserError


def _first(rows: datasets.Dataset, max_documents: Optional[int]) -> datasets.Dataset:
    """The first `max_documents` rows (all of them when unset)."""
    if max_documents is None or max_documents >= len(rows):
        return rows
    return rows.select(range(max_documents))


def hold_out(rows: datasets.Dataset, fraction: float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split documents into (train, eval) with `fraction` of them (rounded up) held out, shuffled by `seed`."""
    try:
        parts = rows.train_test_split(test_size=fraction, seed=seed)
    except ValueError as exc:  # too few documents for the fraction: datasets explains the sizes
        raise UserError(f"cannot hold out {fraction} of {len(rows)} documents: {exc}. Change data.eval_fraction "
                        "(0 disables eval) or set data.eval", key="data.eval_fraction") from exc
    # train_test_split leaves an indices mapping over the source; tokenization (map) writes rows in that order.
    return parts["train"], parts["test"]


def build_datasets(cfg: DataConfig, tokenizer: Any, *, seed: int,
                   resolve_path: Callable[[str], str] = lambda p: p
                   ) -> tuple[datasets.Dataset, Optional[datasets.Dataset]]:
    """Build (train, eval) datasets with `input_ids` and `labels` columns (labels unshifted, -100 = no loss).

    `eval` is None when `cfg.eval` is unset and `cfg.eval_fraction` is 0. `max_documents` applies to each source
    (train and eval) before the held-out split. Counts (truncated conversations, unused tokens) are attached to each
    dataset: `kd.data.stats_of(ds)`. Raises `UserError` for anything the recipe or the data must fix.
    """
    if cfg.kind == "text":
        build, check = text.build_text, text.check_columns
    else:
        build, check = chat.build_chat, chat.sample_fields
    train_rows = _first(load_source(cfg.train, key="data.train", resolve_path=resolve_path), cfg.max_documents)
    check(train_rows, cfg, "train")  # before splitting, so a wrong column is reported as such
    eval_rows: Optional[datasets.Dataset] = None
    eval_name = "eval"
    if cfg.eval is not None:
        eval_rows = _first(load_source(cfg.eval, key="data.eval", resolve_path=resolve_path), cfg.max_documents)
        check(eval_rows, cfg, "eval")
    elif cfg.eval_fraction > 0:
        train_rows, eval_rows = hold_out(train_rows, cfg.eval_fraction, seed)
        eval_name = "held-out eval"
    train = build(train_rows, tokenizer, cfg, split="train")
    evaluation = build(eval_rows, tokenizer, cfg, split=eval_name) if eval_rows is not None else None
    return train, evaluation
