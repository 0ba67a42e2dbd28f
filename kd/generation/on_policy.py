"""On-policy batches: a batch producer that, on a seeded fraction of the optimizer steps, replaces the step's chat
samples by their prompts completed on the engines (GKD when the student writes, sequence-level KD when the teacher
does), so the loss runs on what the student itself would say.

- Which steps: step s is on-policy iff a uniform draw seeded by (train.seed, s) is below `lmbda`. Every rank computes
  the same draw, so no rank ever disagrees (TRL draws per rank and relies on identical seeding instead).
- The prompt of a chat sample is its conversation up to its last assistant turn: the tokens before the last run of
  loss labels (the data pipeline labels assistant tokens only). A prompt longer than seq_len - max_new_tokens keeps
  its last tokens (counted), or stops the run (`long_prompts: error`), decided by all ranks together.
- The completion, its EOS included, is the loss; the prompt and padding are not (`Completions.training_batch`), so
  the step's global loss-token count comes from the produced batches and the normalization stays exact. EOS is
  counted as a loss token even when the tokenizer's pad id is EOS: padding is told apart by the generation mask.
- The step is still exactly grad_accum micro-batches per rank: each sampled micro-batch becomes one generated one.
- The sampler is per rank (stream = rank); its generator state is part of every checkpoint's per-rank state.
- Samples for people to read (`sample_interval`): the first on-policy step of every block of N steps keeps rank 0's
  first `sample_count` prompt/completion pairs as text (`step_samples`), which kd.metrics writes to samples.jsonl and
  TensorBoard. Which steps is a function of (seed, step, lmbda, N) alone, so a resumed run that re-does steps writes
  the same pairs for them (bitwise resume), and the logger drops the superseded ones first.
"""
from __future__ import annotations

import random
import time
from typing import Any, Callable, Optional

import torch

from kd.config.schema import OnPolicyConfig
from kd.data.producer import SampledBatches
from kd.engine import dist
from kd.errors import UserError
from kd.generation.engines import Target, generate
from kd.generation.decode import left_pad
from kd.generation.sampling import SamplingConfig, make_sampler
from kd.labels import IGNORE_INDEX


def is_on_policy(seed: int, step: int, lmbda: float) -> bool:
    """The same decision on every rank for the 1-based optimizer `step` (no collective needed)."""
    if lmbda >= 1.0:
        return True
    if lmbda <= 0.0:
        return False
    return random.Random(f"kd-on-policy:{seed}:{step}").random() < lmbda


def logs_samples(seed: int, step: int, lmbda: float, interval: int) -> bool:
    """Whether the 1-based `step` writes samples: it is the first on-policy step of its block of `interval` steps
    (steps 1..N, N+1..2N, ...); `interval` 0 = never. A block without an on-policy step writes none."""
    if interval <= 0 or not is_on_policy(seed, step, lmbda):
        return False
    block_start = (step - 1) // interval * interval + 1
    return not any(is_on_policy(seed, s, lmbda) for s in range(block_start, step))


def prompt_of(input_ids: list[int], labels: list[int]) -> list[int]:
    """The tokens before the last contiguous run of loss labels (the last assistant turn); the whole sample when no
    token carries a label (its assistant turn was cut off by data.seq_len)."""
    end = len(labels)
    while end > 0 and labels[end - 1] == IGNORE_INDEX:
        end -= 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return list(input_ids[:start]) if end > 0 else list(input_ids)


class OnPolicyBatches:
    """`SampledBatches` whose on-policy steps are generated (see the module docstring). ``target`` is what writes the
    completions (the student's training engine or the teacher source, kd.generation.engines)."""

    def __init__(self, sampled: SampledBatches, cfg: OnPolicyConfig, *, target: Target, seed: int, seq_len: int,
                 eos_id: int, pad_id: int, vocab_size: int, decode: Optional[Callable[[list[int]], str]] = None):
        """`decode` (token ids -> text, e.g. the tokenizer's) turns rank 0's sampled pairs into text; None = none."""
        self.sampled, self.cfg, self.target, self.decode = sampled, cfg, target, decode
        self.seed, self.seq_len, self.eos_id, self.pad_id, self.vocab_size = seed, seq_len, eos_id, pad_id, vocab_size
        self.sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                       top_k=cfg.top_k, top_p=cfg.top_p)
        self.sampler = make_sampler(self.sampling, seed=seed, stream=dist.rank(), device=dist.device())
        self.stats: dict[str, float] = {}
        self.samples: list[dict[str, Any]] = []  # this step's readable pairs (rank 0, sample steps only)

    @property
    def sample_index(self) -> int:
        return self.sampled.sample_index

    @property
    def global_batch(self) -> int:
        return self.sampled.global_batch

    def to_device(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return self.sampled.to_device(samples)

    def next_step(self, step: int) -> tuple[list[dict[str, torch.Tensor]], list[list[int]]]:
        """This rank's micro-batches for the 1-based `step` and the sample ids behind them."""
        batches, ids = self.sampled.next_step(step)
        on = is_on_policy(self.seed, step, self.cfg.lmbda)
        self.stats = {"onpolicy/on": 1.0 if on else 0.0}
        self.samples = []
        if not on:
            return batches, ids
        keep = self.decode is not None and dist.is_main() and logs_samples(
            self.seed, step, self.cfg.lmbda, self.cfg.sample_interval)
        return [self._generated(b, i if keep else None) for b, i in zip(batches, ids)], ids

    def step_samples(self) -> list[dict[str, Any]]:
        """This step's readable pairs: [{sample, sample_id, prompt, completion, tokens, finish_reason}], `sample` =
        the pair's index among rank 0's rows of the step, `sample_id` = the data sample it was made from. Empty
        except on rank 0 at a sample step (`logs_samples`)."""
        return self.samples

    def _generated(self, batch: dict[str, torch.Tensor], sample_ids: Optional[list[int]] = None
                   ) -> dict[str, torch.Tensor]:
        room = self.seq_len - self.cfg.max_new_tokens
        prompts, truncated = [], 0
        for row_ids, row_labels, row_mask in zip(batch["input_ids"].tolist(), batch["labels"].tolist(),
                                                 batch["attention_mask"].tolist()):
            n = sum(row_mask)
            prompt = prompt_of(row_ids[:n], row_labels[:n]) or row_ids[:1]
            if len(prompt) > room:
                truncated += 1
                prompt = prompt[len(prompt) - room:]  # keep the end: the turn being answered
            prompts.append(prompt)
        if self.cfg.long_prompts == "error" and dist.any_rank(truncated > 0):
            raise UserError(f"a prompt is longer than data.seq_len - on_policy.max_new_tokens ({room} tokens); raise "
                            "data.seq_len, lower max_new_tokens, or set on_policy.long_prompts: truncate",
                            key="on_policy.long_prompts")
        ids, mask = left_pad(prompts, self.pad_id, dist.device())
        t0 = time.perf_counter()
        out = generate(self.target, ids, mask, sampler=self.sampler, eos_ids=[self.eos_id], pad_id=self.pad_id,
                       gather=self.cfg.gather, vocab_size=self.vocab_size)
        seconds = time.perf_counter() - t0
        lengths = out.num_tokens
        self._add("onpolicy/generate_s", seconds)
        self._add("onpolicy/completion_tokens", float(sum(lengths)))
        self._add("onpolicy/completions", float(len(lengths)))
        self._add("onpolicy/ended_by_eos", float(sum(r == "eos" for r in out.finish_reasons)))
        self._add("onpolicy/truncated_prompts", float(truncated))
        if sample_ids is not None:
            self._keep_samples(prompts, out, sample_ids)
        return out.training_batch()

    def _keep_samples(self, prompts: list[list[int]], out, sample_ids: list[int]) -> None:
        """Decode rows of this micro-batch until the step holds `sample_count` pairs (the prompt as the model saw
        it, after any truncation; special tokens kept, so the chat markup and the EOS show)."""
        lengths = out.num_tokens
        for row, prompt in enumerate(prompts):
            if len(self.samples) >= self.cfg.sample_count:
                return
            self.samples.append({
                "sample": len(self.samples), "sample_id": int(sample_ids[row]),
                "prompt": self.decode(prompt), "completion": self.decode(out.completion(row)),
                "tokens": int(lengths[row]),
                "finish_reason": out.finish_reasons[row]})

    def _add(self, key: str, value: float) -> None:
        self.stats[key] = self.stats.get(key, 0.0) + value

    def step_scalars(self) -> dict[str, float]:
        """The step's generation metrics, reduced over ranks (one collective; every rank calls it every step)."""
        keys = ("onpolicy/generate_s", "onpolicy/completion_tokens", "onpolicy/completions", "onpolicy/ended_by_eos",
                "onpolicy/truncated_prompts")
        gen_s, tokens, rows, eos, truncated = dist.sum_values([self.stats.get(k, 0.0) for k in keys])
        out = {"onpolicy/on": self.stats.get("onpolicy/on", 0.0)}
        if rows > 0:
            world = dist.world_size()
            out.update({"onpolicy/generate_s": gen_s / world, "onpolicy/tokens_per_s": tokens / max(gen_s / world, 1e-9),
                        "onpolicy/mean_completion_len": tokens / rows, "onpolicy/eos_fraction": eos / rows,
                        "onpolicy/truncated_prompts": truncated})
        return out

    def state_dict(self) -> dict[str, Any]:
        return self.sampled.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampled.load_state_dict(state)

    def rank_state(self) -> dict[str, Any]:
        """Per-rank state for the checkpoint's rank file: the sampler's generator."""
        return {"sampler": self.sampler.state_dict()}

    def load_rank_state(self, state: Optional[dict[str, Any]]) -> None:
        if state and "sampler" in state:  # a rank new to the run (the world grew) keeps its freshly seeded stream
            self.sampler.load_state_dict(state["sampler"])
