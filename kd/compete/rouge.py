"""ROUGE-L F over word tokens (lowercased alphanumeric runs), the similarity Lion uses to drop near-duplicate
instructions.

The longest common subsequence is computed bit-parallel (Allison-Dix / Hyyro): one Python integer holds a row of
the dynamic-programming table as bits, so a pair of n- and m-token texts costs m big-integer operations instead of
n x m Python steps. Deduplicating a candidate against a pool of thousands of instructions is then cheap enough to
run on every rank.
"""
from __future__ import annotations

import re
from typing import Sequence

_WORD = re.compile(r"[a-z0-9]+")


def tokens(text: str) -> list[str]:
    """Lowercased runs of letters and digits; punctuation and whitespace separate them."""
    return _WORD.findall(text.lower())


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence of two token sequences."""
    if not a or not b:
        return 0
    # match[t]: bit i set where a[i] == t
    match: dict = {}
    for i, t in enumerate(a):
        match[t] = match.get(t, 0) | (1 << i)
    mask = (1 << len(a)) - 1
    row = mask  # all ones: no column of the table has taken a step yet
    for t in b:
        m = match.get(t, 0)
        if not m:
            continue
        low = row & m
        row = ((row + low) | (row - low)) & mask
    return len(a) - bin(row).count("1")


def rouge_l_f(a: str | Sequence[str], b: str | Sequence[str]) -> float:
    """ROUGE-L F1 = 2 P R / (P + R) with P = LCS / |a|, R = LCS / |b| (symmetric); 0.0 when either side is empty."""
    ta = tokens(a) if isinstance(a, str) else list(a)
    tb = tokens(b) if isinstance(b, str) else list(b)
    lcs = lcs_length(ta, tb)
    if lcs == 0:
        return 0.0
    return 2.0 * lcs / (len(ta) + len(tb))
