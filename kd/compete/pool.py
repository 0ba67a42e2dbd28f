"""The instruction pool: instructions with the teacher's answers, one JSON object a line, written atomically.

A pool item is ``{"id": int, "instruction": str, "answer": str, "round": int, "origin": "seed" | "hard" | "easy"}``
(origin: what kind of seed the augmentor was given; "seed" for the initial instructions). Ids are positions in the
pool and never change: the pool only grows.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Sequence

from kd.errors import UserError
from kd.files import atomic_write


def write_jsonl(path: str, rows: Iterable[dict[str, Any]]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_jsonl(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def instruction_of(row: dict[str, Any], *, prompt_field: str = "prompt", messages_field: str = "messages") -> str:
    """The instruction of a data row: its prompt, or the last user turn of its messages ("" when it has neither)."""
    if isinstance(row.get(prompt_field), str):
        return row[prompt_field]
    turns = row.get(messages_field)
    if isinstance(turns, list):
        users = [t.get("content", "") for t in turns if isinstance(t, dict) and t.get("role") == "user"]
        return users[-1] if users else ""
    return ""


def seed_instructions(rows: Sequence[dict[str, Any]], *, minimum: int, key: str, **fields: str) -> list[str]:
    """The distinct, non-empty instructions of the seed data, in order; an error when fewer than ``minimum``."""
    out, seen = [], set()
    for row in rows:
        text = instruction_of(row, **fields).strip()
        if text and text not in seen:
            seen.add(text)
            out.append(text)
    if len(out) < minimum:
        raise UserError(f"the instruction pool holds {len(out)} distinct instruction(s), fewer than "
                        f"compete.min_pool ({minimum}); give more seed instructions or lower compete.min_pool", key=key)
    return out


def grow(pool: list[dict[str, Any]], instructions: Sequence[str], answers: Sequence[str], *, round: int,
         origins: Sequence[str]) -> list[dict[str, Any]]:
    """A new pool: ``pool`` plus the answered instructions (ids continue)."""
    start = len(pool)
    return [*pool, *({"id": start + i, "instruction": q, "answer": a, "round": round, "origin": o}
                     for i, (q, a, o) in enumerate(zip(instructions, answers, origins)))]


def as_chat(pool: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The pool as kd chat training data (kd.data.chat: one user turn, the teacher's answer as the assistant turn)."""
    return [{"id": item["id"], "messages": [{"role": "user", "content": item["instruction"]},
                                            {"role": "assistant", "content": item["answer"]}]}
            for item in pool if item["answer"].strip()]


def split_hard_easy(scored: Sequence[dict[str, Any]], threshold: float) -> tuple[list[int], list[int]]:
    """(hard ids, easy ids) of scored rows ``{"id", "teacher", "student"}``: hard when teacher - student >=
    threshold; rows left out by the judge (a score of None) are in neither."""
    hard, easy = [], []
    for row in scored:
        if row["teacher"] is None or row["student"] is None:
            continue
        (hard if row["teacher"] - row["student"] >= threshold else easy).append(row["id"])
    return hard, easy
