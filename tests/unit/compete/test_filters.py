"""Candidate filters: each drop reason on its own, their order, dedupe against the pool and against the kept
candidates by ROUGE-L computed here independently (plain dynamic program)."""
from __future__ import annotations

import random

from kd.compete.filters import Candidate, filter_candidates
from tests.unit.compete.test_rouge import lcs_dp


def rouge_reference(a: str, b: str) -> float:
    import re

    ta, tb = re.findall(r"[a-z0-9]+", a.lower()), re.findall(r"[a-z0-9]+", b.lower())
    lcs = lcs_dp(ta, tb)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(ta), lcs / len(tb)
    return 2 * p * r / (p + r)


PROMPT = "Here is an example instruction: list three fruits. Write one new instruction."


def test_each_reason_is_counted():
    cands = [
        Candidate("Name five large rivers of Europe and their sources", PROMPT, "length"),  # cut off
        Candidate("Sure!", PROMPT),  # too short
        Candidate("Here is an example instruction: list three fruits", PROMPT),  # restates the prompt (echo)
        Candidate("Explain how tides are caused by the moon", PROMPT),  # kept
        Candidate("Explain how the tides are caused by the moon.", PROMPT),  # near-duplicate of the kept one
        Candidate("List three fruits please now", PROMPT),  # 3 of 5 tokens echo the prompt (< 0.8): judged against the pool
    ]
    result = filter_candidates(cands, pool=["List three fruits please"], min_words=3)
    assert result.reasons[:5] == ["cut_off", "too_short", "restates_prompt", None, "near_duplicate"]
    assert result.reasons[5] == "near_duplicate"  # against the pool
    assert result.kept == [3]
    assert dict(result.drops) == {"cut_off": 1, "too_short": 1, "restates_prompt": 1, "near_duplicate": 2}


def test_dedupe_agrees_with_a_reference_computation():
    rng = random.Random(0)
    words = "how why what list explain the a river moon sea tide city poem write three five name".split()
    pool = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 9))) for _ in range(15)]
    cands = [Candidate(" ".join(rng.choice(words) for _ in range(rng.randint(4, 9))), "zzz") for _ in range(60)]
    result = filter_candidates(cands, pool, min_words=3, rouge_threshold=0.5)
    seen = list(pool)
    expected = []
    for i, c in enumerate(cands):
        if all(rouge_reference(c.text, other) <= 0.5 for other in seen):
            expected.append(i)
            seen.append(c.text)
    assert result.kept == expected
    assert 0 < len(expected) < len(cands)  # the threshold actually cuts
    assert result.drops["near_duplicate"] == len(cands) - len(expected)
