"""What building a dataset did to the data: counts the trainer logs once so users see truncation and packing losses.

`build_datasets` returns plain `datasets.Dataset`s (the trainer's contract), so the counts travel with each dataset
as JSON in `dataset.info.description`, read back with `stats_of(dataset)`. They describe the dataset as built;
later `datasets` operations (select, shuffle) copy the info but do not update the counts.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Optional

import datasets
import pyarrow as pa
import pyarrow.compute as pc

_PREFIX = "kd.data.stats="


@dataclass(frozen=True)
class DataStats:
    """Counts for one built split (train or eval)."""

    kind: str             # "text" or "chat"
    documents: int        # raw rows read (after max_documents and the held-out split)
    samples: int          # rows of the built dataset (packed blocks for text, conversations for chat)
    tokens: int           # tokens in all samples
    loss_tokens: int      # tokens whose label is not -100
    truncated: int = 0    # chat: conversations cut to seq_len (overlong: truncate)
    dropped_samples: int = 0  # chat: conversations dropped because no assistant token survived truncation
    dropped_tokens: int = 0   # text: tokens after the last full block, not used

    def summary(self) -> str:
        """One human-readable line for logs."""
        line = f"{self.samples} samples, {self.tokens} tokens ({self.loss_tokens} with loss) from {self.documents} documents"
        if self.kind == "chat":
            line += f"; {self.truncated} truncated to seq_len, {self.dropped_samples} dropped (no assistant token left)"
        else:
            line += f"; {self.dropped_tokens} tokens after the last full block unused"
        return line


def count_tokens(ds: datasets.Dataset, column: str, *, not_equal: Optional[int] = None) -> int:
    """Number of list elements in `column` (optionally only those != `not_equal`), computed in Arrow without copying."""
    total = 0
    for chunk in ds.data.column(column).chunks:
        values = chunk.flatten()  # honours slicing/offsets, zero-copy
        if not_equal is None:
            total += len(values)
        else:
            total += pc.sum(pc.not_equal(values, pa.scalar(not_equal, values.type))).as_py() or 0
    return total


def attach_stats(ds: datasets.Dataset, stats: DataStats) -> datasets.Dataset:
    """Store `stats` in `ds.info.description` (in place) and return `ds`."""
    ds.info.description = _PREFIX + json.dumps(dataclasses.asdict(stats), sort_keys=True)
    return ds


def stats_of(ds: datasets.Dataset) -> Optional[DataStats]:
    """The `DataStats` stored by `build_datasets`, or None for a dataset it did not build."""
    text = ds.info.description or ""
    if not text.startswith(_PREFIX):
        return None
    return DataStats(**json.loads(text[len(_PREFIX):]))
