"""Vocabulary checks between the tokenizer and the models, and between two tokenizers."""
from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models
from transformers import GPT2Config, LlamaConfig, PreTrainedTokenizerFast

from kd.errors import UserError
from kd.models import check_same_tokenizer, max_positions, shared_vocab_size


def _word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(words)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token=words[0])))


WORDS = ["<unk>"] + [f"w{i}" for i in range(299)]


def test_padded_lm_head_is_accepted():
    tok = _word_tokenizer(WORDS)
    assert len(tok) == 300
    assert shared_vocab_size(tok, LlamaConfig(vocab_size=320), LlamaConfig(vocab_size=300)) == 300


def test_smaller_model_vocab_is_an_error():
    tok = _word_tokenizer(WORDS)
    with pytest.raises(UserError) as err:
        shared_vocab_size(tok, LlamaConfig(vocab_size=320), LlamaConfig(vocab_size=256))
    assert err.value.key == "student"
    assert "256" in err.value.message and "300" in err.value.message and "student" in err.value.message


def test_names_label_several_teachers():
    tok = _word_tokenizer(WORDS)
    configs = [LlamaConfig(vocab_size=300), LlamaConfig(vocab_size=299), LlamaConfig(vocab_size=400)]
    with pytest.raises(UserError, match="teacher 2"):
        shared_vocab_size(tok, *configs, names=["teacher 1", "teacher 2", "student"])


def test_same_tokenizer_passes():
    check_same_tokenizer(_word_tokenizer(WORDS), _word_tokenizer(list(WORDS)))


def test_tokenizer_mismatch_counts_differences():
    other = list(WORDS)
    other[5], other[6] = other[6], other[5]  # two tokens swap ids
    other.append("extra")  # one token only in the student's
    with pytest.raises(UserError) as err:
        check_same_tokenizer(_word_tokenizer(WORDS), _word_tokenizer(other))
    assert err.value.key == "student.path"
    assert "3 tokens differ" in err.value.message and "'w4'" in err.value.message


def test_max_positions():
    assert max_positions(LlamaConfig(max_position_embeddings=2048)) == 2048
    assert max_positions(GPT2Config(n_positions=1024)) == 1024

    class Bare:
        vocab_size = 10

    assert max_positions(Bare()) is None
