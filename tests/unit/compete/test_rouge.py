"""ROUGE-L F: the bit-parallel LCS against the textbook dynamic program and against brute force over subsequences,
and hand-checked pairs."""
from __future__ import annotations

import itertools
import random

import pytest

from kd.compete.rouge import lcs_length, rouge_l_f, tokens


def lcs_dp(a, b):
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            table[i][j] = table[i - 1][j - 1] + 1 if a[i - 1] == b[j - 1] else max(table[i - 1][j], table[i][j - 1])
    return table[-1][-1]


def lcs_brute(a, b):
    """Longest subsequence of a (tried longest first) that is also a subsequence of b."""
    def is_subsequence(s, t):
        it = iter(t)
        return all(x in it for x in s)

    for n in range(len(a), 0, -1):
        if any(is_subsequence(s, b) for s in itertools.combinations(a, n)):
            return n
    return 0


def test_lcs_matches_brute_force_on_small_random_sequences():
    rng = random.Random(0)
    for _ in range(300):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 8))]
        b = [rng.choice("abcd") for _ in range(rng.randint(0, 8))]
        assert lcs_length(a, b) == lcs_brute(a, b) == lcs_length(b, a)


def test_lcs_matches_dynamic_program_on_long_sequences():
    rng = random.Random(1)
    for _ in range(40):
        a = [rng.randrange(12) for _ in range(rng.randint(50, 200))]
        b = [rng.randrange(12) for _ in range(rng.randint(50, 200))]
        assert lcs_length(a, b) == lcs_dp(a, b)


def test_hand_checked_pairs():
    # "the cat sat on the mat" vs "the cat lay on a mat": LCS = the cat on mat (4); F = 2*4 / (6 + 6)
    assert rouge_l_f("The cat sat on the mat.", "the cat lay on a mat") == pytest.approx(8 / 12)
    assert rouge_l_f("Write a poem about the sea", "write a poem about the sea!") == 1.0
    assert rouge_l_f("alpha beta", "gamma delta") == 0.0
    assert rouge_l_f("", "anything") == 0.0
    # order matters: "b a" vs "a b" share one token in order -> F = 2 * 1 / 4
    assert rouge_l_f("a b", "b a") == pytest.approx(0.5)
    assert tokens("Hello, World! 42x") == ["hello", "world", "42x"]
