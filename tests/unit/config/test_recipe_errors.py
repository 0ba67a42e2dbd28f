"""Bad recipes: one line per problem naming the file and the key, exit code 2, no traceback."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kd.cli import main
from kd.config import dump_recipe, load_recipe
from kd.errors import UserError

BASE = {
    "run": {"output_dir": "/tmp/kd-test-run"},
    "teacher": {"path": "asset:smollm2-135m-instruct"},
    "student": {"init_from_teacher_layers": [0, 1]},
    "data": {"train": {"path": "asset:kjv-bible"}, "seq_len": 64},
    "train": {"max_steps": 3},
}


def write(tmp_path: Path, data, name="r.yaml") -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


def with_(section: str, **values):
    recipe = {k: dict(v) for k, v in BASE.items()}
    recipe.setdefault(section, {}).update(values)
    return recipe


@pytest.mark.parametrize("recipe, key, words", [
    (with_("loss", temperature="hot"), "loss.temperature", "expected a number, got 'hot'"),
    (with_("loss", temprature=2.0), "loss.temprature", "unknown key; did you mean temperature?"),
    (with_("loss", colour="red"), "loss.colour", "unknown key (valid keys: name, temperature"),
    ({**BASE, "resume": 5}, "resume", "expected a string, got 5"),
    (with_("train", micro_batch_size=1.5), "train.micro_batch_size", "expected an integer"),
    (with_("data", kind="audio"), "data.kind", "'text' or 'chat'"),
    (with_("train", max_steps=0), "train.max_steps", "greater than or equal to 1"),
    ({k: v for k, v in BASE.items() if k != "teacher"}, "teacher", "missing required key"),
    (with_("student", path="/x"), "student", "exactly one of"),
    (with_("teacher", zero_stage=2), "teacher.zero_stage", "must be 0 or 3"),
])
def test_schema_errors_name_file_and_key(tmp_path, recipe, key, words):
    path = write(tmp_path, recipe)
    with pytest.raises(UserError) as info:
        load_recipe(path)
    assert str(info.value).startswith(f"{path}: {key}: ")
    assert words in str(info.value)


def test_malformed_yaml_names_line(tmp_path):
    path = write(tmp_path, "run:\n  output_dir: [unclosed\n")
    with pytest.raises(UserError, match=r"malformed YAML: line \d+, column \d+"):
        load_recipe(path)


def test_top_level_must_be_mapping(tmp_path):
    with pytest.raises(UserError, match="mapping of sections"):
        load_recipe(write(tmp_path, "- a\n- b\n"))


def test_overrides_parse_values_and_reject_unknown_keys(tmp_path):
    path = write(tmp_path, BASE)
    recipe = load_recipe(path, ["loss.temperature=2", "student.init_from_teacher_layers=[0, 5]", "train.seed=7"])
    assert recipe.loss.temperature == 2.0 and recipe.student.init_from_teacher_layers == [0, 5] and recipe.train.seed == 7
    with pytest.raises(UserError, match=r"\(with overrides\): loss.nme: unknown key"):
        load_recipe(path, ["loss.nme=jsd"])
    with pytest.raises(UserError, match="must look like key.path=value"):
        load_recipe(path, ["loss.name"])
    with pytest.raises(UserError, match="run.output_dir is not a section"):
        load_recipe(path, ["run.output_dir.x=1"])


def test_resolved_recipe_round_trips(tmp_path):
    recipe = load_recipe(write(tmp_path, BASE))
    again = load_recipe(write(tmp_path, dump_recipe(recipe), name="resolved.yaml"))
    assert again == recipe and again.loss.name == "forward_kl"  # defaults are written out


def test_cli_exit_code_2_single_line(tmp_path, capsys):
    path = write(tmp_path, with_("loss", temperature="hot"))
    assert main(["validate", path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"kd: error: {path}: loss.temperature: expected a number, got 'hot'"]


def test_missing_paths_are_reported_by_validate(tmp_path, capsys):
    path = write(tmp_path, with_("teacher", path=str(tmp_path / "nope")))
    assert main(["validate", path]) == 2
    assert f"teacher.path: {tmp_path / 'nope'} does not exist" in capsys.readouterr().err
    path = write(tmp_path, with_("data", train={"path": str(tmp_path / "missing.jsonl")}, seq_len=64))
    assert main(["validate", path]) == 2
    assert "data.train.path" in capsys.readouterr().err


def test_no_traceback_in_a_real_process(tmp_path):
    path = write(tmp_path, "run: {output_dir: x\n")
    result = subprocess.run([sys.executable, "-m", "kd.cli", "train", path], capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith(f"kd: error: {path}: malformed YAML")


def test_every_problem_is_reported_at_once(tmp_path):
    recipe = with_("loss", temprature=2.0)
    recipe["train"] = {"max_steps": 3, "lr": "fast"}
    del recipe["teacher"]
    path = write(tmp_path, recipe)
    with pytest.raises(UserError) as info:
        load_recipe(path)
    assert str(info.value).splitlines() == [
        f"{path}: teacher: missing required key",
        f"{path}: loss.temprature: unknown key; did you mean temperature?",
        f"{path}: train.lr: expected a number, got 'fast'",
    ]
    assert [p.key for p in info.value.problems] == ["teacher", "loss.temprature", "train.lr"]


def test_every_problem_in_a_real_process_names_its_file(tmp_path):
    """Through the real CLI: a base with a typo, a child with a wrong type, an unknown section and a section missing
    from both; every problem on its own `kd: error:` line naming the file to fix, exit code 2, no traceback."""
    base = {k: v for k, v in BASE.items() if k != "teacher"}
    base["loss"] = {"temprature": 2.0}
    base_path = write(tmp_path, base, name="base.yaml")
    child = write(tmp_path, {"base": "base.yaml", "train": {"seed": "x"}, "evall": {"interval": 2}}, name="bad.yaml")
    result = subprocess.run([sys.executable, "-m", "kd.cli", "validate", child], capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert sorted(result.stderr.strip().splitlines()) == sorted([
        f"kd: error: {child}: teacher: missing required key",
        f"kd: error: {base_path}: loss.temprature: unknown key; did you mean temperature?",
        f"kd: error: {child}: train.seed: expected an integer, got 'x'",
        f"kd: error: {child}: evall: unknown key; did you mean eval?",
    ])


def test_a_section_written_whole_by_a_base_keeps_its_file_when_a_child_adds_to_it(tmp_path):
    base_path = write(tmp_path, {**BASE, "train": {"max_steps": 3, "lr": "fast"}}, name="base.yaml")
    child = write(tmp_path, {"base": "base.yaml", "train": {"seed": 1}}, name="child.yaml")
    with pytest.raises(UserError) as info:
        load_recipe(child)
    assert str(info.value) == f"{base_path}: train.lr: expected a number, got 'fast'"


def test_several_problems_print_one_prefixed_line_each():
    err = UserError.several([UserError("a", key="x", file="f.yaml"),
                             UserError("b", key="y", file="g.yaml", more=[UserError("c", file="h.yaml")])])
    assert err.report("kd: error: ").splitlines() == [
        "kd: error: f.yaml: x: a", "kd: error: g.yaml: y: b", "kd: error: h.yaml: c"]
    assert (err.message, err.key, err.file) == ("a", "x", "f.yaml")
