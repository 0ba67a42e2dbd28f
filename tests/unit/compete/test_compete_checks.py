"""`kd compete`'s checks before anything launches: each bad input is one UserError naming its key."""
from __future__ import annotations

import json

import pytest
import yaml

from kd.compete.cli import check
from kd.errors import UserError
from tests.helpers.tiny_run import build_teacher, recipe_dict
from tests.integration.compete_setup import compete_sections, write_instructions


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("compete_checks")
    build_teacher(root / "teacher")
    write_instructions(root / "seeds.jsonl", count=8, seed=1)
    write_instructions(root / "heldout.jsonl", count=4, seed=2)
    return root


def _recipe(root, name="recipe.yaml", **compete):
    recipe = recipe_dict(root, **compete_sections(root, **compete))
    path = root / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return str(path)


def _error(path, *overrides) -> UserError:
    with pytest.raises(UserError) as e:
        check(path, list(overrides))
    assert "\n" not in e.value.report().strip(), e.value.report()
    return e.value


def test_a_good_recipe_passes(root):
    recipe = check(_recipe(root), [])
    assert recipe.compete.rounds == 1


@pytest.mark.parametrize("override, key, words", [
    ("compete.rounds=0", "compete.rounds", "greater than or equal to 1"),
    ("compete.judge.threshold=0", "compete.judge", "outside the likelihood judge's scale"),
    ("compete.judge.name=prompted", "compete.judge", "outside the prompted judge's scale"),  # threshold 12 below
    ("compete.judge.name=judgy", "compete.judge.name", "unknown judge"),
    ("compete.min_pool=20", "data.train.path", "fewer than compete.min_pool (20)"),
    ("data.kind=text", "", "set data.kind: chat"),
    ("compete.answer_max_new_tokens=64", "compete.answer_max_new_tokens", "no room"),
])
def test_bad_input_is_one_line(root, override, key, words):
    extra = ["compete.judge.threshold=12"] if override == "compete.judge.name=prompted" else []
    e = _error(_recipe(root), override, *extra)
    assert words in e.report() and key in e.report(), e.report()


def test_empty_pool_and_missing_eval(root):
    (root / "empty.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": " "}]}) + "\n")
    e = _error(_recipe(root), f"data.train.path={root / 'empty.jsonl'}")
    assert "0 distinct instruction" in e.message and e.key == "data.train.path"
    e = _error(_recipe(root), "data.eval=null")
    assert "compete needs data.eval" in e.report()


def test_likelihood_judge_model_needs_the_recipe_tokenizer(root):
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    other = root / "other_judge"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["a different corpus of words entirely"], trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(other)
    LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(other)
    e = _error(_recipe(root), f"compete.judge.model.path={other}")
    assert e.key == "compete.judge.model.path" and "needs the recipe's tokenizer" in e.message
    recipe = check(_recipe(root), f"compete.judge.model.path={other}".split() + ["compete.judge.name=prompted"])
    assert recipe.compete.judge.model.path == str(other)  # a text judge may have its own tokenizer


def test_no_compete_section(root):
    recipe = recipe_dict(root, **compete_sections(root))
    del recipe["compete"]
    path = root / "plain.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    assert _error(str(path)).key == "compete"
