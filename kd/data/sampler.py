"""The order of training samples as a pure function of one global sample index, so resuming needs only a number.

Sample g (g = 0, 1, 2, ... counted over the whole run and all ranks) is in epoch e = g // N at position g % N of a
permutation of range(N) seeded by (seed, e). An optimizer step consumes `global_batch = micro_batch_size *
grad_accum * world_size` consecutive g's starting at g0, and each rank derives its own ids from (g0, rank, world):

    micro-batch m of rank r takes g0 + m * (world * mbs) + r * mbs + [0, mbs)

So a checkpoint stores g0 and nothing else about the data. Resuming at any g0, even with a different world size
(with the same global batch), continues exactly the same global sequence: no replay of earlier batches, nothing
repeated or skipped. Micro-batch m of all ranks together covers one contiguous range of g, so the set of samples
in each step does not depend on how it is split over ranks and micro-batches.
"""
from __future__ import annotations

import hashlib

import torch


def _epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed derived from (seed, epoch) without collisions between nearby pairs (unlike seed + epoch)."""
    digest = hashlib.sha256(f"kd.sampler:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class GlobalSampler:
    """Deterministic order of training samples driven by a single global sample index (see the module docstring)."""

    def __init__(self, num_samples: int, *, seed: int, shuffle: bool = True):
        if num_samples < 1:
            raise ValueError("GlobalSampler needs at least one sample")
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        # Permutations of the epochs used last; two, because one step may straddle an epoch boundary.
        self._perms: dict[int, torch.Tensor] = {}

    def _permutation(self, epoch: int) -> torch.Tensor:
        """The order of epoch `epoch` (computed once, then cached)."""
        perm = self._perms.get(epoch)
        if perm is None:
            generator = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
            perm = torch.randperm(self.num_samples, generator=generator)
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = perm
        return perm

    def epoch_of(self, g: int) -> int:
        """The epoch that global sample index `g` belongs to."""
        return g // self.num_samples

    def sample_id(self, g: int) -> int:
        """Dataset row of global sample index `g`."""
        if g < 0:
            raise ValueError(f"global sample index must be >= 0, got {g}")
        epoch, position = divmod(g, self.num_samples)
        if not self.shuffle:
            return position
        return int(self._permutation(epoch)[position])

    def step_indices(self, g0: int, *, rank: int, world_size: int, micro_batch_size: int,
                     grad_accum: int) -> list[list[int]]:
        """Dataset rows for rank `rank` in the step starting at `g0`: `grad_accum` lists of `micro_batch_size` ids."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        stride = world_size * micro_batch_size
        return [
            [self.sample_id(g0 + m * stride + rank * micro_batch_size + i) for i in range(micro_batch_size)]
            for m in range(grad_accum)
        ]
