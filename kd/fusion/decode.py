"""Decoding with the fused model: the large base steered by the experts, a* solved again at every decoding step.

kd.generation's decode loop (left padding, positions from the mask, per-step EOS, rank lockstep) drives a `FusedLM`:
an object that looks to that loop like one Hugging Face causal LM, but runs every model of the fusion (large base,
small base, experts, in the recipe's order on every rank) on the step's tokens, each with its own KV cache, and
returns the fused logits of the last position. The loop's "cache" is the list of the models' caches.

Per step and row, the solver sees exactly what teacher forcing would give it at that position (every model's logits
for the same prefix), so fused decoding equals recomputing the whole fused model from scratch for the prefix at each
step (tests/unit/fusion/test_decode.py checks this against a loop without any cache).

    out = fused_generate(fusion, input_ids, mask, sampler=..., eos_ids=[eos], pad_id=pad)   # a FusionTeacher
    out.completions.completion(0); out.weight_means(0)    # tokens; mean a* per expert over row 0's tokens
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Optional, Sequence

import torch

from kd.generation.decode import Completions, LogitsProcessor, _cache_argument, decode
from kd.generation.gather import GatherMode, rollout
from kd.generation.sampling import Sampler


class FusedLM:
    """The fusion as one causal LM for `kd.generation.decode.decode` (only what that loop calls).

    ``models``: [large, small, *experts] as `kd.generation.gather.Rollout`s (each with its own ZeRO-3 gathering plan);
    ``solve``: [N, V] logits of large, small, experts -> `kd.fusion.solver.FusionResult` (`FusionTeacher.solve`);
    ``vocab_size``: every model's logits are cut to the shared vocabulary before fusing. The a* and selected expert of
    every step are kept (``weights``, ``selected``: one [B, T] / [B] tensor per step), for the completions' stats."""

    def __init__(self, models: Sequence[Any], solve, vocab_size: int):
        self.models = list(models)
        self.solve = solve
        self.vocab_size = vocab_size
        self._cache_args = [_cache_argument(r.model) for r in self.models]
        self.weights: list[torch.Tensor] = []
        self.selected: list[torch.Tensor] = []

    # decode() reads the cache argument's name from this signature
    def forward(self, input_ids, attention_mask, position_ids, use_cache=True, logits_to_keep=1,
                past_key_values=None):
        caches = past_key_values if past_key_values is not None else [None] * len(self.models)
        last, new_caches = [], []
        for r, arg, cache in zip(self.models, self._cache_args, caches):
            if r.before_forward is not None:  # ZeRO-3 layer by layer: each model's own fetch step
                r.before_forward()
            out = r.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=True, logits_to_keep=1, **({arg: cache} if cache is not None else {}))
            # cut to the shared vocabulary (a padded head's extra rows), one [B, V] row block per model
            last.append(out.logits[:, -1, :self.vocab_size])
            new_caches.append(out.cache if getattr(out, "cache", None) is not None else out.past_key_values)
        result = self.solve(last[0], last[1], last[2:])
        self.weights.append(result.weights)
        self.selected.append(result.selected)
        return SimpleNamespace(logits=result.logits[:, None, :], past_key_values=new_caches, cache=None)

    __call__ = forward


@dataclass
class FusedCompletions:
    """`completions` as from kd.generation; ``weights`` [B, S, T] a* of every step (S = the steps run, the step that
    chose token s at index s) and ``selected`` [B, S] (single mode: the active expert, -1 for a* = 0)."""

    completions: Completions
    weights: torch.Tensor
    selected: torch.Tensor

    def weight_means(self, row: int) -> list[float]:
        """Mean a*_t over the row's generated tokens, per expert."""
        real = self.completions.mask[row].bool()
        return self.weights[row][real].double().mean(0).tolist() if bool(real.any()) else []

    def selected_fractions(self, row: int) -> list[float]:
        """Fraction of the row's generated tokens at which each expert was the selected one (single mode)."""
        real = self.completions.mask[row].bool()
        if not bool(real.any()):
            return []
        picked = self.selected[row][real]
        return [float((picked == t).double().mean()) for t in range(self.weights.shape[-1])]


def fusion_models(fusion: Any) -> list[Any]:
    """The `ModelTeacher`s of a `FusionTeacher`, in the order they run on every rank."""
    return [fusion.large, fusion.small, *fusion.experts]


@torch.no_grad()
def fused_generate(fusion: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, sampler: Sampler,
                   eos_ids: Sequence[int], pad_id: int, gather: GatherMode = "auto",
                   active: Optional[torch.Tensor] = None,
                   logits_processor: Optional[LogitsProcessor] = None) -> FusedCompletions:
    """Completions of the fused model (a `kd.teachers.fusion.FusionTeacher`) for left-padded prompts [B, P].

    Each model is gathered for the rollout on its own (kd.generation.gather: a replica, ZeRO-3 once, or layer by
    layer); collective under ZeRO-3, like `kd.generation.generate`: every rank calls it the same number of times."""
    with contextlib.ExitStack() as stack:
        rollouts = [stack.enter_context(rollout(m.module, engine=m.engine, gather=gather))
                    for m in fusion_models(fusion)]
        lm = FusedLM(rollouts, fusion.solve, fusion.vocab_size)
        out = decode(lm, input_ids, attention_mask, sampler=sampler, eos_ids=eos_ids, pad_id=pad_id,
                     vocab_size=fusion.vocab_size, active=active, logits_processor=logits_processor)
    steps = out.tokens.shape[1]  # one solve per step: the prefill chose token 0, the s-th extra forward token s
    return FusedCompletions(out, torch.stack(lm.weights[:steps], 1), torch.stack(lm.selected[:steps], 1))
