"""Pool: seed instructions (distinct, too few is an error), growth, chat form, hard/easy split; augmentor prompts."""
from __future__ import annotations

import pytest

from kd.compete.augment import augment_prompt, clean_candidate, pick_seeds
from kd.compete.pool import as_chat, grow, read_jsonl, seed_instructions, split_hard_easy, write_jsonl
from kd.errors import UserError


def test_seed_instructions_dedupe_and_minimum():
    rows = [{"prompt": "a?"}, {"messages": [{"role": "user", "content": "b?"}, {"role": "assistant", "content": "x"}]},
            {"prompt": "a?"}, {"prompt": "  "}]
    assert seed_instructions(rows, minimum=2, key="data.train.path") == ["a?", "b?"]
    with pytest.raises(UserError) as e:
        seed_instructions(rows, minimum=3, key="data.train.path")
    assert e.value.key == "data.train.path" and "2 distinct" in e.value.message


def test_grow_chat_split_and_atomic_roundtrip(tmp_path):
    pool = grow([], ["q0", "q1"], ["a0", "a1"], round=0, origins=["seed", "seed"])
    pool = grow(pool, ["q2"], [""], round=1, origins=["hard"])
    assert [p["id"] for p in pool] == [0, 1, 2] and pool[2]["origin"] == "hard"
    assert [c["id"] for c in as_chat(pool)] == [0, 1]  # an empty answer is no training sample
    write_jsonl(str(tmp_path / "p" / "pool.jsonl"), pool)
    assert read_jsonl(str(tmp_path / "p" / "pool.jsonl")) == pool
    assert not [f for f in (tmp_path / "p").iterdir() if ".tmp" in f.name]
    scored = [{"id": 0, "teacher": 7.0, "student": 6.0}, {"id": 1, "teacher": 6.5, "student": 6.0},
              {"id": 2, "teacher": None, "student": None}]
    assert split_hard_easy(scored, 1.0) == ([0], [1])


def test_augment_prompts_and_cleaning():
    assert "same domain" in augment_prompt("List three fruits.", "hard") and "List three fruits." in augment_prompt("List three fruits.", "easy")
    assert "rarer" in augment_prompt("x", "easy") and "difficulty" in augment_prompt("x", "hard")
    with pytest.raises(ValueError):
        augment_prompt("x", "medium")
    assert clean_candidate('New instruction: "Name two oceans."\n\nThis asks for...') == "Name two oceans."
    assert pick_seeds([4, 7], 5) == [4, 7, 4, 7, 4] and pick_seeds([], 3) == []
