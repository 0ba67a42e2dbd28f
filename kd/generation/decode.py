"""The decode loop: batched, left-padded prompts, KV cache, every rank in lockstep.

Prompts are left-padded ([pad pad p0 p1 p2]) so that every row's next token sits in the last column; positions come
from the attention mask (cumsum - 1), so a padded row is the same computation as the unpadded prompt. After the
prefill, each step feeds one token per row and reuses the model's KV cache.

Lockstep: under ZeRO-3 layer-by-layer gathering every forward is a collective, so a rank that stops early would leave
the others waiting in an all-gather forever. After every step all ranks vote once (`dist.any_rank`) whether anyone
still has an unfinished row; a rank whose rows are all done keeps running forwards on pad tokens (masked out) until
the vote says stop or ``max_new_tokens`` is reached. Every rank therefore runs the same number of forwards.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from kd.engine import dist
from kd.generation.sampling import Sampler
from kd.labels import IGNORE_INDEX

# (logits [B, V] fp32, step index) -> logits; runs before the sampler (tests force tokens with it)
LogitsProcessor = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass
class Completions:
    """What one rollout produced, on the prompts' device.

    ``prompt_ids`` / ``prompt_mask``: the left-padded prompts [B, P]. ``tokens`` [B, T]: the generated tokens, T the
    number of steps run (<= max_new_tokens), the EOS token included, ``pad_id`` after a row's end; ``mask`` [B, T]:
    1 on generated tokens. ``finish_reasons``: "eos" or "length" per row ("none" for a row that was inactive).
    ``forwards``: model forwards run (the same on every rank)."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor
    finish_reasons: list[str]
    forwards: int
    pad_id: int

    @property
    def num_tokens(self) -> list[int]:
        return self.mask.sum(-1).tolist()

    def completion(self, row: int) -> list[int]:
        return self.tokens[row][self.mask[row].bool()].tolist()

    def training_batch(self, rows: Optional[Sequence[int]] = None) -> dict[str, torch.Tensor]:
        """Prompt + completion as a training micro-batch in kd's layout (kd.data.collate: right-padded, unshifted
        labels, IGNORE_INDEX on the prompt and padding), so the trainer counts only completion tokens as loss tokens.
        Right-padding matters: the trained module passes no position ids, so a left-padded row would be shifted."""
        from kd.data.collate import collate

        samples = []
        for r in range(self.tokens.shape[0]) if rows is None else rows:
            prompt = self.prompt_ids[r][self.prompt_mask[r].bool()].tolist()
            completion = self.completion(r)
            samples.append({"input_ids": prompt + completion, "labels": [IGNORE_INDEX] * len(prompt) + completion})
        return {k: v.to(self.tokens.device) for k, v in collate(samples, self.pad_id).items()}


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> left-padded input_ids and attention_mask [B, P] (int64). Empty prompts are refused: a row with
    nothing to attend to has no defined next token."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("left_pad: every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def _cache_argument(model: torch.nn.Module) -> str:
    """The name of the KV-cache argument: `cache` in recent transformers (5.2x), `past_key_values` before (the old
    name still works there, with a deprecation warning)."""
    import inspect

    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


@torch.no_grad()
def decode(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, sampler: Sampler,
           eos_ids: Sequence[int], pad_id: int, vocab_size: Optional[int] = None,
           active: Optional[torch.Tensor] = None, logits_processor: Optional[LogitsProcessor] = None,
           forward_hook: Optional[Callable[[], None]] = None) -> Completions:
    """Decode completions for left-padded prompts with a Hugging Face causal LM (called directly, with its cache).

    ``vocab_size``: only ids below it may be generated (a model whose embedding is padded past the tokenizer).
    ``active`` [B] bool: rows that are real; the others (fillers that keep ranks in lockstep) count as finished from
    the start. ``forward_hook`` runs before every forward (layer-by-layer ZeRO-3 resets DeepSpeed's step with it).
    Collective when a process group is up: every rank must call it (see the module docstring).
    """
    config = sampler.config
    if not eos_ids:
        raise ValueError("decode: at least one EOS id is needed (a row would never stop before max_new_tokens)")
    device = input_ids.device
    mask = attention_mask.to(device=device, dtype=torch.long)
    eos = torch.tensor(sorted(set(int(e) for e in eos_ids)), device=device)
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=device)
    if active is not None:
        done |= ~active.to(device=device, dtype=torch.bool)
    inactive = done.clone()
    hit_eos = torch.zeros_like(done)
    # left padding: a row's first real token has position 0 whatever its padding
    positions = (mask.cumsum(-1) - 1).clamp(min=0)

    cache_arg = _cache_argument(model)

    def forward(ids: torch.Tensor, pos: torch.Tensor, cache) -> tuple[torch.Tensor, object]:
        if forward_hook is not None:
            forward_hook()
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                    **({cache_arg: cache} if cache is not None else {}))
        return out.logits[:, -1, :], (out.cache if getattr(out, "cache", None) is not None else out.past_key_values)

    logits, cache = forward(input_ids, positions, None)
    forwards = 1
    next_pos = positions[:, -1:] + 1
    tokens, real = [], []
    for step in range(config.max_new_tokens):
        logits = logits.float()
        if vocab_size is not None and vocab_size < logits.shape[-1]:
            logits[:, vocab_size:] = float("-inf")
        if logits_processor is not None:
            logits = logits_processor(logits, step)
        token = torch.where(done, torch.full_like(done, pad_id, dtype=torch.long), sampler(logits))
        is_real = ~done  # this step's token belongs to the row (an EOS does too)
        ended = is_real & torch.isin(token, eos)
        hit_eos |= ended
        done = done | ended
        tokens.append(token)
        real.append(is_real)
        if step + 1 == config.max_new_tokens:
            break
        # the one vote per step: every rank continues while any rank has an unfinished row
        if not dist.any_rank(not bool(done.all())):
            break
        mask = torch.cat([mask, is_real.long()[:, None]], dim=1)
        logits, cache = forward(token[:, None], next_pos, cache)
        forwards += 1
        next_pos = next_pos + 1
    reasons = ["none" if inactive[i] else "eos" if hit_eos[i] else "length" for i in range(len(done))]
    return Completions(prompt_ids=input_ids, prompt_mask=attention_mask, tokens=torch.stack(tokens, 1),
                       mask=torch.stack(real, 1).long(), finish_reasons=reasons, forwards=forwards, pad_id=pad_id)
