"""Which generated instructions join the pool: Lion's filters, each drop counted by its reason.

A candidate is dropped, in this order of reasons, when it is
- ``cut_off``: its generation stopped at the length limit (an instruction cut mid-sentence);
- ``too_short``: fewer than ``min_words`` word tokens (empty, "Sure!", a bare number);
- ``restates_prompt``: it mostly repeats the augmentor's own prompt (the seed or the request around it): at least
  ``restate_threshold`` of its tokens form a subsequence of the prompt's tokens;
- ``near_duplicate``: its ROUGE-L F against an instruction already in the pool, or a candidate kept before it in this
  round, exceeds ``rouge_threshold`` (Lion: 0.7).
Candidates are taken in their given order, so which of two near-duplicates survives is fixed: the earlier one.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

from kd.compete.rouge import lcs_length, tokens

REASONS = ("cut_off", "too_short", "restates_prompt", "near_duplicate")


@dataclass(frozen=True)
class Candidate:
    text: str
    prompt: str  # the augmentor prompt that produced it
    finish_reason: str = "eos"  # "eos" | "length" (from kd.generation)


@dataclass
class FilterResult:
    kept: list[int] = field(default_factory=list)  # indices into the candidates, in order
    reasons: list[Optional[str]] = field(default_factory=list)  # per candidate: None (kept) or its drop reason
    drops: Counter = field(default_factory=Counter)  # reason -> count (every reason present, 0 when none)


def _rouge_tokens(a: list[str], b: list[str]) -> float:
    lcs = lcs_length(a, b)
    return 0.0 if lcs == 0 else 2.0 * lcs / (len(a) + len(b))


def drop_reason(candidate: Candidate, *, min_words: int, restate_threshold: float) -> Optional[str]:
    """The reason a candidate fails on its own (without looking at the pool), or None."""
    if candidate.finish_reason == "length":
        return "cut_off"
    words = tokens(candidate.text)
    if len(words) < min_words:
        return "too_short"
    if lcs_length(words, tokens(candidate.prompt)) >= restate_threshold * len(words):
        return "restates_prompt"
    return None


def filter_candidates(candidates: Sequence[Candidate], pool: Iterable[str], *, min_words: int = 3,
                      restate_threshold: float = 0.8, rouge_threshold: float = 0.7) -> FilterResult:
    """Apply the filters (module docstring) to ``candidates`` against the instructions already in ``pool``."""
    seen = [tokens(text) for text in pool]
    result = FilterResult(drops=Counter({r: 0 for r in REASONS}))
    for i, cand in enumerate(candidates):
        reason = drop_reason(cand, min_words=min_words, restate_threshold=restate_threshold)
        if reason is None:
            words = tokens(cand.text)
            if any(_rouge_tokens(words, other) > rouge_threshold for other in seen):
                reason = "near_duplicate"
            else:
                seen.append(words)
                result.kept.append(i)
        result.reasons.append(reason)
        if reason is not None:
            result.drops[reason] += 1
    return result
