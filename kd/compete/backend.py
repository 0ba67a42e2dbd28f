"""The model side of the judges and the augmentor: chat prompts in, replies or answer log-probs out, on every rank.

`ModelBackend` wraps one `kd.generation.Target` (the student inside its training engine, the teacher source's engine
or replica, or a separate judge model). Work is cut into batches in list order and dealt to the ranks round-robin;
every rank runs the same number of rollouts / forwards (a rank without a batch in the last round runs an inactive
filler row: under ZeRO-3 every forward is a collective), and the results are gathered with `dist.all_gather_object`,
so every rank returns the same list. Batch b of a call samples from its own seeded stream (stream, b), so the
results do not depend on the number of ranks, and a call repeated after a resume with the same list gives the same
replies.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from kd.engine import dist
from kd.generation import SamplingConfig, Target, generate, left_pad, make_sampler, rollout


def chat_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` as a user turn followed by the assistant's generation prompt (the chat template), or of
    the plain text when the tokenizer has no template."""
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True)
        return tokenizer(rendered, add_special_tokens=False)["input_ids"]
    return tokenizer(text)["input_ids"]


class ModelBackend:
    def __init__(self, target: Target, tokenizer: Any, *, seed: int, batch_size: int, max_prompt_tokens: int,
                 vocab_size: Optional[int] = None, gather: str = "auto"):
        self.target, self.tokenizer = target, tokenizer
        self.seed, self.batch_size, self.max_prompt_tokens = seed, batch_size, max_prompt_tokens
        self.vocab_size, self.gather = vocab_size, gather
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos = {tokenizer.eos_token_id}
        extra = getattr(getattr(target.model, "generation_config", None), "eos_token_id", None)
        eos |= set(extra if isinstance(extra, list) else [extra] if extra is not None else [])
        self.eos_ids = sorted(e for e in eos if e is not None)
        self.device = dist.device()

    def _prompt(self, text: str, room: int) -> list[int]:
        ids = chat_ids(self.tokenizer, text) or [self.pad_id]
        return ids[-room:]  # keep the end: the generation prompt and the text right before it

    def _rounds(self, n: int) -> list[list[list[int]]]:
        """round -> rank -> the item indices of that rank's batch (maybe empty)."""
        batches = [list(range(i, min(i + self.batch_size, n))) for i in range(0, n, self.batch_size)]
        world = dist.world_size()
        rounds = -(-len(batches) // world)
        return [[batches[r * world + k] if r * world + k < len(batches) else [] for k in range(world)]
                for r in range(rounds)]

    # ------------------------------------------------------------------ replies
    def generate_full(self, prompts: Sequence[str], *, temperature: float, stream: int, max_new_tokens: int
                      ) -> list[tuple[str, str]]:
        """(reply text, finish reason "eos" | "length") per prompt, the same on every rank."""
        config = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature)
        room = max(1, self.max_prompt_tokens - max_new_tokens)
        mine: list[tuple[int, str, str]] = []
        rank = dist.rank()
        for r, per_rank in enumerate(self._rounds(len(prompts))):
            rows = per_rank[rank]
            b = r * dist.world_size() + rank
            ids, mask = left_pad([self._prompt(prompts[i], room) for i in rows] or [[self.pad_id]], self.pad_id,
                                 self.device)
            out = generate(self.target, ids, mask,
                           sampler=make_sampler(config, seed=self.seed, stream=stream * 100_003 + b, device=self.device),
                           eos_ids=self.eos_ids, pad_id=self.pad_id, gather=self.gather, vocab_size=self.vocab_size,
                           active=torch.tensor([True] * len(rows) or [False]))
            for j, i in enumerate(rows):
                text = self.tokenizer.decode(out.completion(j), skip_special_tokens=True)
                mine.append((i, text, out.finish_reasons[j]))
        everyone = sorted((row for part in dist.all_gather_object(mine) for row in part), key=lambda row: row[0])
        return [(text, reason) for _, text, reason in everyone]

    def generate(self, prompts: Sequence[str], *, temperature: float, stream: int, max_new_tokens: int) -> list[str]:
        return [text for text, _ in self.generate_full(prompts, temperature=temperature, stream=stream,
                                                       max_new_tokens=max_new_tokens)]

    # ------------------------------------------------------------------ log-probs
    def mean_logprob(self, prompts: Sequence[str], answers: Sequence[str]) -> list[Optional[float]]:
        """Mean log-prob per answer token given its chat prompt (fp32 log-softmax over the first ``vocab_size``
        logits). An answer is scored as written, whitespace included (a student that answers with blank lines is
        judged on them); an empty answer is scored as the EOS token alone (the log-prob of answering nothing), so it
        competes instead of being left out. Sequences longer than ``max_prompt_tokens`` keep the answer's first
        tokens and the prompt's last ones."""
        rows = []
        for prompt, answer in zip(prompts, answers):
            a = self.tokenizer(answer, add_special_tokens=False)["input_ids"] if answer else []
            a = (a or [self.eos_ids[0]])[: self.max_prompt_tokens - 1]
            p = self._prompt(prompt, max(1, self.max_prompt_tokens - len(a)))
            rows.append((p, a))
        rank = dist.rank()
        mine: list[tuple[int, Optional[float]]] = []
        with rollout(self.target.model, engine=self.target.engine, gather=self.gather) as r:
            for per_rank in self._rounds(len(rows)):
                idx = per_rank[rank]
                batch = [rows[i] for i in idx] or [([self.pad_id], [])]
                if r.before_forward is not None:
                    r.before_forward()
                values = _mean_logprobs(r.model, batch, self.pad_id, self.vocab_size, self.device)
                mine += list(zip(idx, values))
        everyone = sorted((row for part in dist.all_gather_object(mine) for row in part), key=lambda row: row[0])
        return [value for _, value in everyone]


@torch.no_grad()
def _mean_logprobs(model: torch.nn.Module, rows: Sequence[tuple[list[int], list[int]]], pad_id: int,
                   vocab_size: Optional[int], device: torch.device) -> list[Optional[float]]:
    """One right-padded forward over prompt + answer rows; per row the mean log-prob of its answer tokens."""
    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (p, a) in enumerate(rows):
        ids[i, : len(p) + len(a)] = torch.tensor(p + a, dtype=torch.long)
        mask[i, : len(p) + len(a)] = 1
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits.float()
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids.to(device)[:, 1:, None]).squeeze(-1).cpu()
    out: list[Optional[float]] = []
    for i, (p, a) in enumerate(rows):
        if not a:
            out.append(None)
            continue
        # the token at position t is predicted by the logits at t - 1
        out.append(float(logp[i, len(p) - 1: len(p) - 1 + len(a)].double().mean()))
    return out
