"""Teacher and student tokenizers must be the same token for token, not only the same size (issue 10, item 5)."""
from __future__ import annotations

import json

import pytest

from kd.config.schema import Recipe
from kd.errors import UserError
from kd.preflight import check_student_tokenizer
from tests.helpers.tiny import build_tiny_tokenizer


def _recipe(tmp_path, **student):
    return Recipe.model_validate({
        "run": {"output_dir": str(tmp_path / "run")}, "teacher": {"path": str(tmp_path / "teacher")},
        "student": student, "data": {"train": {"path": "x.jsonl"}}, "train": {"max_steps": 1}})


def _swapped(src, dst):
    """The same tokenizer with two ordinary tokens' ids exchanged: same size, different tokens."""
    build_tiny_tokenizer(dst)
    spec = json.loads((dst / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = [t for t, i in sorted(vocab.items(), key=lambda kv: kv[1]) if i > 100][:2]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (dst / "tokenizer.json").write_text(json.dumps(spec))
    return a, b


def test_a_student_tokenizer_of_equal_size_but_other_tokens_is_refused(tmp_path):
    teacher = build_tiny_tokenizer(tmp_path / "teacher")
    a, b = _swapped(tmp_path / "teacher", tmp_path / "student")
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(tmp_path / "student")) == len(teacher)  # same size: the old check passed
    with pytest.raises(UserError) as info:
        check_student_tokenizer(_recipe(tmp_path, path=str(tmp_path / "student")), teacher)
    message = str(info.value)
    assert info.value.key == "student.path"
    assert str(tmp_path / "student") in message and str(tmp_path / "teacher") in message
    assert "2 tokens differ" in message and repr(a) in message


def test_same_tokenizer_and_students_without_one_pass(tmp_path):
    teacher = build_tiny_tokenizer(tmp_path / "teacher")
    build_tiny_tokenizer(tmp_path / "student")
    check_student_tokenizer(_recipe(tmp_path, path=str(tmp_path / "student")), teacher)
    (tmp_path / "bare").mkdir()  # a model directory without tokenizer files: nothing to compare
    check_student_tokenizer(_recipe(tmp_path, path=str(tmp_path / "bare")), teacher)
    check_student_tokenizer(_recipe(tmp_path, init_from_teacher_layers=[0]), teacher)
