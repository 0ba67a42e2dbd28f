"""Training data: load with `datasets`, tokenize (packed text or chat with assistant-only labels), order and batch.

Public API:
- `build_datasets(cfg, tokenizer, *, seed, resolve_path)` -> (train, eval) datasets with `input_ids`/`labels`.
- `stats_of(ds)` -> `DataStats` (samples, tokens, truncated conversations, ...) of a built dataset.
- `GlobalSampler` -> dataset rows for each rank and micro-batch from one global sample index (resumable).
- `SampledBatches` -> a step's micro-batches from the sampler (the `BatchProducer` the step runner takes).
- `collate(samples, pad_token_id)`, `take(ds, ids)`, `eval_batches(...)`, `num_eval_batches(...)`.
"""
from kd.data.build import build_datasets
from kd.data.collate import collate, eval_batches, num_eval_batches, take
from kd.data.producer import BatchProducer, SampledBatches
from kd.data.sampler import GlobalSampler
from kd.data.stats import DataStats, stats_of

__all__ = ["BatchProducer", "SampledBatches", "build_datasets", "collate", "eval_batches", "num_eval_batches", "take",
           "GlobalSampler", "DataStats", "stats_of"]
