"""The bad-input catalog of issue 2, through `kd train` as a user types it.

Each case must end with exit code 2, exactly one `kd: error:` line that names the file and the recipe key, no
traceback, and nothing half-written: no run directory, and no launched process (`kd train` checks everything in-process
before it starts the deepspeed launcher; the launcher call is replaced by a failing stub here). The schema-level
messages themselves (wording for unknown keys, wrong types, ...) are tested in tests/unit/config/test_recipe_errors.py;
here the three recipe cases only check that `kd train` stops on them cleanly too.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import kd.cli
from tests.helpers.tiny_run import build_teacher, recipe_dict, write_corpus

TINY_MAX_POSITIONS = 256  # tests.helpers.tiny_run.TEACHER_CONFIG


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """A tiny teacher (with tokenizer), a teacher whose vocab_size is smaller than its tokenizer, and a corpus."""
    root = tmp_path_factory.mktemp("bad-input-assets")
    build_teacher(root / "teacher")
    build_teacher(root / "small_vocab_teacher", vocab_size=200)  # the tokenizer has 320 tokens
    write_corpus(root / "corpus.jsonl", documents=20)
    return root


@pytest.fixture(autouse=True)
def no_launch(monkeypatch):
    def launch(*args, **kwargs):
        raise AssertionError(f"kd train launched processes for bad input: {args}")

    monkeypatch.setattr(kd.cli.subprocess, "call", launch)


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _recipe(tmp_path: Path, assets: Path, **sections) -> dict:
    recipe = recipe_dict(assets, **sections)
    recipe["run"] = {**recipe["run"], "output_dir": str(tmp_path / "run")}
    return recipe


# Each case: (id, build(tmp_path, assets) -> (recipe text or dict, overrides), key, file the message must name:
# "recipe" or "data", words the message must contain).
def _malformed_yaml(tmp, a):
    return "run:\n  output_dir: " + str(tmp / "run") + "\nteacher: {path: [unclosed\n", []


def _unknown_key(tmp, a):
    return _recipe(tmp, a, loss={"name": "forward_kl", "temprature": 2.0}), []


def _wrong_type(tmp, a):
    return _recipe(tmp, a), ["train.max_steps=lots"]


def _missing_model_dir(tmp, a):
    return _recipe(tmp, a, teacher={"path": str(tmp / "no-such-teacher"), "zero_stage": 3}), []


def _model_dir_without_config(tmp, a):
    (tmp / "empty-model").mkdir()
    return _recipe(tmp, a, teacher={"path": str(tmp / "empty-model"), "zero_stage": 3},
                   tokenizer=str(a / "teacher")), []


def _missing_data_file(tmp, a):
    return _recipe(tmp, a, data={"train": {"path": str(tmp / "missing.jsonl")}, "seq_len": 32}), []


def _empty_data_file(tmp, a):
    (tmp / "empty.jsonl").write_text("")
    return _recipe(tmp, a, data={"train": {"path": str(tmp / "empty.jsonl")}, "seq_len": 32}), []


def _blank_lines_data_file(tmp, a):
    (tmp / "blank.jsonl").write_text("\n\n\n")
    return _recipe(tmp, a, data={"train": {"path": str(tmp / "blank.jsonl")}, "seq_len": 32}), []


def _only_empty_texts(tmp, a):
    path = _write_jsonl(tmp / "empty-texts.jsonl", [{"text": ""} for _ in range(10)])
    return _recipe(tmp, a, data={"train": {"path": path}, "seq_len": 32, "eval_fraction": 0.0}), []


def _text_field_missing(tmp, a):
    path = _write_jsonl(tmp / "other-field.jsonl", [{"body": "some words here"} for _ in range(10)])
    return _recipe(tmp, a, data={"train": {"path": path}, "seq_len": 32}), []


def _chat_field_missing(tmp, a):
    path = _write_jsonl(tmp / "chat.jsonl", [{"question": "q?", "answer": "a."} for _ in range(10)])
    return _recipe(tmp, a, data={"kind": "chat", "train": {"path": path}, "seq_len": 32}), []


def _teacher_vocab_too_small(tmp, a):
    return _recipe(tmp, a, teacher={"path": str(a / "small_vocab_teacher"), "zero_stage": 3}), []


def _student_vocab_too_small(tmp, a):
    student = {"config": {"model_type": "llama", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
                          "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
                          "max_position_embeddings": 256}, "zero_stage": 2}
    recipe = _recipe(tmp, a)
    recipe["student"] = student  # replace the section (the helper merges, which would keep init_from_teacher_layers)
    return recipe, []


def _seq_len_too_long(tmp, a):
    return _recipe(tmp, a), [f"data.seq_len={TINY_MAX_POSITIONS + 1}"]


def _seq_len_too_long_for_student(tmp, a):
    recipe = _recipe(tmp, a)
    recipe["student"] = {"config": {"model_type": "llama", "vocab_size": 320, "hidden_size": 32,
                                    "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
                                    "num_key_value_heads": 2, "max_position_embeddings": 64}}
    return recipe, ["data.seq_len=128"]


def _fused_linear_without_fused_form(tmp, a):
    return _recipe(tmp, a), ["loss.name=ce", "loss.fused_linear=true"]


CASES = [
    ("malformed-yaml", _malformed_yaml, None, "recipe", "malformed YAML: line "),
    ("unknown-key", _unknown_key, "loss.temprature", "recipe", "unknown key"),
    ("wrong-type", _wrong_type, "train.max_steps", "recipe", "expected an integer, got 'lots'"),
    ("missing-model-dir", _missing_model_dir, "teacher.path", "recipe", "does not exist"),
    ("model-dir-without-config", _model_dir_without_config, "teacher.path", "recipe", "no config.json"),
    ("missing-data-file", _missing_data_file, "data.train.path", "recipe", "does not exist"),
    ("empty-data-file", _empty_data_file, "data.train.path", "data", "no samples"),
    ("blank-lines-data-file", _blank_lines_data_file, "data.train.path", "data", "no samples"),
    ("only-empty-texts", _only_empty_texts, "data.seq_len", "recipe", "holds 0 tokens"),
    ("text-field-missing", _text_field_missing, "data.text_field", "recipe", "column 'text' not found"),
    ("chat-field-missing", _chat_field_missing, "data.messages_field", "recipe", "'messages'"),
    ("teacher-vocab-too-small", _teacher_vocab_too_small, "teacher", "recipe", "vocab_size 200 but the tokenizer has 320"),
    ("student-vocab-too-small", _student_vocab_too_small, "student", "recipe", "vocab_size 100 but the tokenizer has 320"),
    ("seq-len-too-long", _seq_len_too_long, "data.seq_len", "recipe", f"teacher's maximum of {TINY_MAX_POSITIONS} positions"),
    ("seq-len-too-long-for-student", _seq_len_too_long_for_student, "data.seq_len", "recipe", "student's maximum of 64"),
    ("fused-linear-without-fused-form", _fused_linear_without_fused_form, "loss.fused_linear", "recipe",
     "no fused-linear form"),
]


@pytest.mark.parametrize("build, key, names, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_kd_train_rejects_bad_input_with_one_line(tmp_path, assets, capsys, build, key, names, words):
    recipe, overrides = build(tmp_path, assets)
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False))
    capsys.readouterr()

    code = kd.cli.main(["train", str(recipe_path), *overrides])

    out, err = capsys.readouterr()
    assert code == 2, err
    errors = [line for line in (out + err).splitlines() if "kd: error:" in line]
    assert len(errors) == 1, out + err
    line = errors[0]
    assert line.startswith("kd: error: "), line
    if names == "recipe":
        assert line.startswith(f"kd: error: {recipe_path}"), line
    else:  # the data file itself is the file to fix
        data_path = yaml.safe_load(recipe_path.read_text())["data"]["train"]["path"]
        assert line.startswith(f"kd: error: {data_path}"), line
    if key is not None:
        assert f": {key}: " in line, line
    assert words in line, line
    assert "Traceback" not in out + err
    assert not (tmp_path / "run").exists(), "a run directory was created for bad input"
