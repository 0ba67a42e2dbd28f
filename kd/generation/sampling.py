"""Choosing the next token: greedy or sampled (temperature, top-k, top-p), from a generator of its own.

The generator is separate from torch's global one so that generating never shifts the training run's random stream
(dropout, shuffling), and so that its state can be saved and restored on its own: `Sampler.state_dict` holds plain
values and a uint8 tensor, which `torch.load(..., weights_only=True)` accepts, for the trainer's checkpoints.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch


@dataclass(frozen=True)
class SamplingConfig:
    """How completions are decoded. ``temperature`` 0 means greedy (argmax); ``top_k`` 0 and ``top_p`` 1 switch those
    filters off. A row stops at its first EOS token or after ``max_new_tokens`` tokens."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        # ValueError, not UserError: the CLI checks its flags (with their names) before building one of these
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_logits(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """Scaled logits [B, V] (fp32) with the tokens that top-k / top-p exclude set to -inf; same order as Hugging Face
    (temperature, then top-k, then top-p), and top-p always keeps at least the most likely token."""
    logits = logits.float() / config.temperature
    if config.top_k and config.top_k < logits.shape[-1]:
        kth = torch.topk(logits, config.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass of the tokens strictly more likely than it already reaches top_p
        drop = (probs.cumsum(-1) - probs) >= config.top_p
        drop[:, 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


class Sampler:
    """Picks next tokens for a batch of rows. Greedy needs no randomness; sampling draws from a `torch.Generator` on
    the logits' device, seeded here and nowhere else."""

    def __init__(self, config: SamplingConfig, *, seed: int = 0, device: torch.device | str = "cpu"):
        self.config = config
        self.seed = int(seed)
        self.generator = torch.Generator(device=torch.device(device))
        self.generator.manual_seed(self.seed)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Next token ids [B] (int64) for logits [B, V]."""
        if self.config.greedy:
            return logits.argmax(dim=-1)
        probs = filter_logits(logits, self.config).softmax(-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        self.generator.set_state(state["generator"])


def stream_seed(seed: int, stream: int) -> int:
    """A seed for one of several independent streams (a rank, a batch) derived from the run's seed, so that streams
    never share random numbers and a stream's draws do not depend on how many others there are."""
    return (int(seed) * 1_000_003 + int(stream) * 7_919 + 12_345) % (2**63 - 1)


def make_sampler(config: SamplingConfig, *, seed: int, stream: int = 0,
                 device: Optional[torch.device] = None) -> Sampler:
    return Sampler(config, seed=stream_seed(seed, stream), device=device or "cpu")
