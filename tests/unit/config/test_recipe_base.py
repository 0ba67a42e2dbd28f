"""Recipe inheritance: `base: other.yaml` merges a recipe over another, errors still name the file to fix."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kd.cli import main
from kd.config import dump_recipe, load_recipe
from kd.errors import UserError
from kd.resume import recipe_differences

RECIPES = Path(__file__).resolve().parents[3] / "recipes"

BASE = {
    "run": {"output_dir": "/tmp/kd-test-run", "nproc": 2},
    "teacher": {"path": "asset:smollm2-135m-instruct"},
    "student": {"init_from_teacher_layers": [0, 1, 2]},
    "data": {"train": {"path": "asset:kjv-bible"}, "seq_len": 64},
    "loss": {"name": "jsd", "temperature": 2.0, "trg": {"k": 3}},
    "train": {"max_steps": 3, "lr": 1e-3},
    "deepspeed": {"comms_logger": {"enabled": True, "verbose": False}},
}


def write(path: Path, data) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return str(path)


def load_error(path: str, overrides=()) -> str:
    with pytest.raises(UserError) as info:
        load_recipe(path, overrides)
    return str(info.value)


def test_child_merges_over_base(tmp_path):
    write(tmp_path / "base.yaml", BASE)
    child = write(tmp_path / "child.yaml", {
        "base": "base.yaml",
        "run": {"output_dir": "/tmp/kd-child"},                    # scalar replaces, run.nproc stays
        "student": {"init_from_teacher_layers": [1]},              # a list replaces, it is not appended to
        "loss": {"temperature": 3.0, "trg": None},                 # null switches off the base's TRG section
        "deepspeed": {"comms_logger": {"verbose": True}},          # free-form mappings merge key by key too
    })
    recipe = load_recipe(child)
    assert (recipe.run.output_dir, recipe.run.nproc) == ("/tmp/kd-child", 2)
    assert recipe.student.init_from_teacher_layers == [1]
    assert (recipe.loss.name, recipe.loss.temperature, recipe.loss.trg) == ("jsd", 3.0, None)
    assert recipe.deepspeed == {"comms_logger": {"enabled": True, "verbose": True}}
    assert (recipe.train.max_steps, recipe.train.lr) == (3, 1e-3)


def test_switching_the_student_source_needs_null(tmp_path):
    write(tmp_path / "base.yaml", BASE)
    both = write(tmp_path / "both.yaml", {"base": "base.yaml", "student": {"path": "/models/s"}})
    assert load_error(both) == (f"{both}: student: set exactly one of `path`, `config`, `init_from_teacher_layers` "
                                "(got path, init_from_teacher_layers)")
    one = write(tmp_path / "one.yaml", {"base": "base.yaml",
                                        "student": {"path": "/models/s", "init_from_teacher_layers": None}})
    assert load_recipe(one).student.path == "/models/s"


def test_chain_paths_are_relative_to_the_naming_file_and_overrides_come_last(tmp_path):
    write(tmp_path / "common" / "root.yaml", BASE)
    write(tmp_path / "common" / "mid.yaml", {"base": "root.yaml", "train": {"max_steps": 5, "seed": 7}})
    top = write(tmp_path / "exp" / "top.yaml", {"base": "../common/mid.yaml", "train": {"max_steps": 9}})
    recipe = load_recipe(top)
    assert (recipe.train.max_steps, recipe.train.seed, recipe.train.lr) == (9, 7, 1e-3)
    recipe = load_recipe(top, ["train.max_steps=11", "loss.name=tvd"])
    assert (recipe.train.max_steps, recipe.train.seed, recipe.loss.name) == (11, 7, "tvd")


def test_errors_name_the_file_that_wrote_the_key(tmp_path):
    bad_base = {**BASE, "loss": {**BASE["loss"], "temprature": 2.0}}
    base = write(tmp_path / "base.yaml", bad_base)
    child = write(tmp_path / "child.yaml", {"base": "base.yaml", "train": {"lr": "fast"}})
    # pydantic reports the loss section first (schema order); the unknown key sits in the base
    assert load_error(child).startswith(f"{base}: loss.temprature: unknown key")
    write(tmp_path / "base.yaml", BASE)
    assert load_error(child) == f"{child}: train.lr: expected a number, got 'fast'"
    # a key the child sets to null where null is not allowed: the child wrote it
    nulled = write(tmp_path / "nulled.yaml", {"base": "base.yaml", "loss": {"temperature": None}})
    assert load_error(nulled) == f"{nulled}: loss.temperature: expected a number, got None"
    # an override that breaks a key names the overrides; a key nobody wrote names the top file
    ok = write(tmp_path / "ok.yaml", {"base": "base.yaml"})
    assert load_error(ok, ["train.seed=x"]) == f"{ok} (with overrides): train.seed: expected an integer, got 'x'"
    no_train = {k: v for k, v in BASE.items() if k != "train"}
    write(tmp_path / "base.yaml", no_train)
    assert load_error(ok) == f"{ok}: train: missing required key"


@pytest.mark.parametrize("case", ["missing", "malformed", "not_mapping", "not_string", "self", "cycle", "override"])
def test_bad_base_is_one_line_naming_file_and_base(tmp_path, case):
    top = tmp_path / "top.yaml"
    base_of_top = {"missing": "nope.yaml", "self": "top.yaml", "not_string": 3}.get(case, "b.yaml")
    write(top, {"base": base_of_top, "train": {"max_steps": 2}})
    write(tmp_path / "b.yaml", {"malformed": "run: {output_dir: x\n", "not_mapping": "- a\n- b\n",
                                "cycle": {"base": "top.yaml"}}.get(case, BASE))
    overrides = ["base=other.yaml"] if case == "override" else []
    message = load_error(str(top), overrides)
    expected = {
        "missing": f"{top}: base: {tmp_path / 'nope.yaml'}: recipe file not found",
        "malformed": f"{top}: base: {tmp_path / 'b.yaml'}: malformed YAML: line ",
        "not_mapping": f"{top}: base: {tmp_path / 'b.yaml'}: a recipe must be a mapping",
        "not_string": f"{top}: base: expected the path of another recipe file, got 3",
        "self": f"{top}: base: recipes inherit from each other in a cycle: {top} -> {top}",
        "cycle": f"{tmp_path / 'b.yaml'}: base: recipes inherit from each other in a cycle: "
                 f"{top} -> {tmp_path / 'b.yaml'} -> {top}",
        "override": f"{top} (with overrides): base: base is read from the recipe file",
    }[case]
    assert message.startswith(expected), message
    assert "\n" not in message


def test_cli_reports_a_missing_base_with_exit_code_2(tmp_path, capsys):
    top = write(tmp_path / "top.yaml", {"base": "gone.yaml"})
    assert main(["validate", top]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"kd: error: {top}: base: {tmp_path / 'gone.yaml'}: recipe file not found"]


def test_resolved_recipe_is_what_a_flat_recipe_gives(tmp_path):
    write(tmp_path / "base.yaml", BASE)
    child = load_recipe(write(tmp_path / "child.yaml", {"base": "base.yaml", "loss": {"temperature": 3.0}}))
    flat = {k: dict(v) for k, v in BASE.items()}
    flat["loss"]["temperature"] = 3.0
    flat = load_recipe(write(tmp_path / "flat.yaml", flat))
    assert child == flat and dump_recipe(child) == dump_recipe(flat)
    assert "base" not in yaml.safe_load(dump_recipe(child))
    # a checkpoint written by the flat recipe resumes under the inheriting one (identity compares resolved recipes)
    assert recipe_differences(yaml.safe_load(dump_recipe(flat)), child.model_dump(mode="json")) == []


def _flatten(data, prefix=""):
    if isinstance(data, dict):
        return {k: v for key, value in data.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: data}


@pytest.mark.parametrize("name, differs", [
    ("taid_quickstart.yaml", {"run.output_dir", "loss.name"}),  # loss.taid only restates the defaults
    ("trg_quickstart.yaml", {"run.output_dir", "loss.trg"}),
])
def test_shipped_variants_differ_from_the_quickstart_only_in_their_loss(name, differs):
    assert yaml.safe_load((RECIPES / name).read_text())["base"] == "quickstart.yaml"
    quick = _flatten(load_recipe(str(RECIPES / "quickstart.yaml")).model_dump(mode="json"))
    variant = _flatten(load_recipe(str(RECIPES / name)).model_dump(mode="json"))
    changed = {k for k in quick.keys() | variant.keys() if quick.get(k) != variant.get(k)}
    assert {k if not k.startswith("loss.trg") else "loss.trg" for k in changed} == differs
