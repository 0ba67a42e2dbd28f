"""The augmentor's prompt: the teacher, shown one seed instruction, writes one new instruction.

Lion's two asks, in our words: from a hard seed (the student lost), a new instruction of the same domain, task type,
length and difficulty, so the student practises what it is bad at; from an easy seed, a new instruction of the same
domain that is rarer or more specific, so the pool does not collapse onto what the student already does well. The
reply is the instruction alone; `clean_candidate` strips the labels and quotes models like to add.
"""
from __future__ import annotations

import re

HARD_PROMPT = """Here is an example instruction:

{seed}

Write one new instruction that belongs to the same domain and is the same type of task, with a similar length and a
similar level of difficulty, but asks about something different. Reply with the new instruction only."""

EASY_PROMPT = """Here is an example instruction:

{seed}

Write one new instruction in the same domain as the example, but on a rarer, more specific topic that the example
does not cover. Keep a similar length. Reply with the new instruction only."""

_LABEL = re.compile(r"^\s*(?:new\s+)?instruction\s*[:\-]\s*", re.IGNORECASE)


def augment_prompt(seed: str, kind: str) -> str:
    """The user turn for the augmentor; ``kind`` is "hard" or "easy"."""
    if kind not in ("hard", "easy"):
        raise ValueError(f"kind must be 'hard' or 'easy', got {kind!r}")
    return (HARD_PROMPT if kind == "hard" else EASY_PROMPT).format(seed=seed.strip())


def clean_candidate(reply: str) -> str:
    """The instruction in a reply: its first paragraph, without an "Instruction:" label or surrounding quotes."""
    text = reply.strip().split("\n\n")[0].strip()
    text = _LABEL.sub("", text).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


def pick_seeds(ids: list[int], count: int) -> list[int]:
    """``count`` seeds cycling through ``ids`` in order (a seed may be used more than once; sampling differs per
    candidate), or none when there are no ids."""
    return [ids[i % len(ids)] for i in range(count)] if ids else []
