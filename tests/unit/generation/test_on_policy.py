"""On-policy batches (issue 12 item 2): the per-step decision every rank makes alike, the prompt of a chat sample,
and the recipe checks."""
from __future__ import annotations

import pytest

from kd.config.schema import Recipe
from kd.generation.on_policy import is_on_policy, prompt_of

IGN = -100


def test_the_decision_is_a_function_of_seed_and_step_with_the_asked_frequency():
    steps = range(1, 2001)
    a = [is_on_policy(0, s, 0.3) for s in steps]
    assert a == [is_on_policy(0, s, 0.3) for s in steps]  # what another rank computes
    assert abs(sum(a) / len(a) - 0.3) < 0.04
    assert a != [is_on_policy(1, s, 0.3) for s in steps]  # another seed, another schedule
    assert all(is_on_policy(0, s, 1.0) for s in steps) and not any(is_on_policy(0, s, 0.0) for s in steps)


def test_the_prompt_is_the_conversation_up_to_the_last_assistant_turn():
    ids = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    labels = [IGN, IGN, 3, 4, IGN, IGN, 7, 8, IGN]  # two assistant turns, then an end-of-turn marker
    assert prompt_of(ids, labels) == [1, 2, 3, 4, 5, 6]
    assert prompt_of(ids[:4], labels[:4]) == [1, 2]
    assert prompt_of([1, 2, 3], [IGN, IGN, IGN]) == [1, 2, 3]  # the answer was cut off: complete the whole sample


def _raw(**on_policy):
    return {"run": {"output_dir": "/tmp/x"}, "teacher": {"path": "/t"}, "student": {"init_from_teacher_layers": [0]},
            "data": {"kind": "chat", "train": {"path": "/d.jsonl"}, "seq_len": 128}, "train": {"max_steps": 2},
            "on_policy": on_policy}


def test_recipe_checks():
    assert Recipe.model_validate(_raw(lmbda=0.5)).on_policy.lmbda == 0.5
    text = _raw()
    text["data"]["kind"] = "text"
    with pytest.raises(ValueError, match="needs prompts to complete: set data.kind: chat"):
        Recipe.model_validate(text)
    with pytest.raises(ValueError, match="leaves no room for a prompt"):
        Recipe.model_validate(_raw(max_new_tokens=128))
    for bad in ({"max_new_tokens": 0}, {"lmbda": 1.5}, {"top_p": 0.0}, {"source": "oracle"}):
        with pytest.raises(ValueError):
            Recipe.model_validate(_raw(**bad))
