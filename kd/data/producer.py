"""Batch producers: where a step's micro-batches come from. The step runner takes whatever a producer hands it and
counts the step's loss tokens from those batches, so a producer that builds batches (completions generated on the
engines, for on-policy distillation) plugs in beside the sampled one without touching the normalization.

A producer hands out one optimizer step at a time, `grad_accum` micro-batches per rank (every rank the same number:
ZeRO-3 forwards are collectives), and its position is a small state that checkpoints restore directly.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch

from kd.data.collate import collate, take
from kd.data.sampler import GlobalSampler


class BatchProducer(Protocol):
    def next_step(self, step: int) -> tuple[list[dict[str, torch.Tensor]], list[list[int]]]:
        """This rank's micro-batches for the 1-based optimizer `step` (on the device) and the sample ids behind
        them. (kd.generation.on_policy.OnPolicyBatches generates some steps' batches instead of sampling them.)"""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class SampledBatches:
    """Micro-batches drawn by the global sampler from a tokenized dataset. The position is the global sample index
    (the next sample in the global order), the same on every rank, so a resume on any number of ranks continues the
    order exactly, with no sample repeated or skipped."""

    def __init__(self, dataset, *, seed: int, shuffle: bool, rank: int, world_size: int, micro_batch_size: int,
                 grad_accum: int, pad_id: int, device: torch.device):
        self.dataset = dataset
        self.sampler = GlobalSampler(len(dataset), seed=seed, shuffle=shuffle)
        self.rank, self.world_size = rank, world_size
        self.micro_batch_size, self.grad_accum = micro_batch_size, grad_accum
        self.global_batch = micro_batch_size * grad_accum * world_size
        self.pad_id, self.device = pad_id, device
        self.sample_index = 0

    def next_step(self, step: int = 0) -> tuple[list[dict[str, torch.Tensor]], list[list[int]]]:
        ids = self.sampler.step_indices(self.sample_index, rank=self.rank, world_size=self.world_size,
                                        micro_batch_size=self.micro_batch_size, grad_accum=self.grad_accum)
        self.sample_index += self.global_batch
        return [self.to_device(take(self.dataset, mb)) for mb in ids], ids

    def to_device(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in collate(samples, self.pad_id).items()}

    def state_dict(self) -> dict[str, Any]:
        return {"global_sample_index": self.sample_index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sample_index = int(state["global_sample_index"])
