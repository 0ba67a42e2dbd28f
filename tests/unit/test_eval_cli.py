"""`kd eval` in-process on the tiny teacher: the teacher evaluated as its own student (saved as a HF directory, and as
a ZeRO-0 checkpoint) must give KL 0, top-1 agreement 1 and equal perplexities; bad input is one line, exit 2, and
nothing written; `--student` resolution without loading anything. (A real checkpoint from `kd train` is compared with the trainer's own eval in
tests/integration/test_eval_cli.py.)"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import kd.cli
from kd.errors import UserError
from kd.eval_cli import find_student
from tests.helpers.tiny_run import make_tiny_run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval-cli")
    make_tiny_run(root)
    return root


def _eval(capsys, *args: str) -> tuple[int, str, str]:
    code = kd.cli.main(["eval", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _fake_stage0_checkpoint(teacher: Path, ckpts: Path, tag: str = "step_00000003") -> Path:
    """A kd checkpoint tag as ZeRO-0 writes it, holding the teacher's weights as the student's."""
    tag_dir = ckpts / tag
    (tag_dir / "kd_meta").mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(teacher / name, tag_dir / "kd_meta" / name)
    module = {f"student.{k}": v for k, v in load_file(teacher / "model.safetensors").items()}
    torch.save({"module": module}, tag_dir / "mp_rank_00_model_states.pt")
    files = {p.relative_to(tag_dir).as_posix(): p.stat().st_size for p in tag_dir.rglob("*") if p.is_file()}
    (tag_dir / "kd_manifest.json").write_text(json.dumps({"files": files}))
    (ckpts / "latest").write_text(tag)
    return tag_dir


def _assert_identical_models(metrics: dict) -> None:
    assert metrics["eval/kl"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["eval/top1_agreement"] == 1.0
    assert metrics["eval/student_ppl"] == pytest.approx(metrics["eval/teacher_ppl"], rel=1e-6)
    assert metrics["eval/tokens"] > 100


def test_teacher_as_hf_student(tiny, tmp_path, capsys):
    out = tmp_path / "deep" / "metrics.json"
    code, stdout, _ = _eval(capsys, str(tiny / "recipe.yaml"), "--student", str(tiny / "teacher"), "--json", str(out))
    assert code == 0
    payload = json.loads(out.read_text())
    _assert_identical_models(payload["metrics"])
    assert payload["split"] == "eval" and payload["student"] == str(tiny / "teacher")
    assert f"{int(payload['metrics']['eval/tokens'])}" in stdout and "KL(teacher || student)" in stdout
    assert not list(out.parent.glob("*.tmp-*"))  # atomic write left no temp file

    # the untrained student (layers 0 and 2 of 3) differs; the teacher's numbers do not depend on the student
    code, _, _ = _eval(capsys, str(tiny / "recipe.yaml"), "--untrained", "--json", str(tmp_path / "base.json"))
    base = json.loads((tmp_path / "base.json").read_text())["metrics"]
    assert code == 0
    assert base["eval/kl"] > 1e-4 and base["eval/top1_agreement"] < 1.0
    assert base["eval/teacher_ppl"] == pytest.approx(payload["metrics"]["eval/teacher_ppl"], rel=1e-9)
    assert base["eval/tokens"] == payload["metrics"]["eval/tokens"]


def test_teacher_as_checkpoint_student_default_run_dir(tiny, tmp_path, capsys):
    # the default student: the newest complete checkpoint under run.output_dir/checkpoints
    run_dir = tmp_path / "run"
    _fake_stage0_checkpoint(tiny / "teacher", run_dir / "checkpoints")
    out = tmp_path / "m.json"
    code, stdout, _ = _eval(capsys, str(tiny / "recipe.yaml"), f"run.output_dir={run_dir}", "--json", str(out),
                            "--max-batches", "3", "--split", "train")
    assert code == 0, stdout
    payload = json.loads(out.read_text())
    _assert_identical_models(payload["metrics"])
    assert payload["student"].endswith("checkpoints/step_00000003")
    assert payload["batches"] == 3 and payload["split"] == "train"
    # at most 3 micro-batches of 2 packed 32-token samples: <= 3 * 2 * 31 loss tokens
    assert payload["metrics"]["eval/tokens"] <= 3 * 2 * 31


def _no_eval_recipe(tiny: Path, tmp_path: Path) -> str:
    recipe = yaml.safe_load((tiny / "recipe.yaml").read_text())
    recipe["data"]["eval_fraction"] = 0.0
    path = tmp_path / "no_eval.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


@pytest.mark.parametrize("case", ["missing-student", "no-checkpoint", "no-eval-split", "json-is-dir",
                                  "student-and-untrained", "unknown-key"])
def test_bad_input_one_line_exit_2_nothing_written(tiny, tmp_path, capsys, case):
    recipe = str(tiny / "recipe.yaml")
    out = tmp_path / "out.json"
    args, words = {
        "missing-student": ([recipe, "--student", str(tmp_path / "nope")], "does not exist"),
        "no-checkpoint": ([recipe, f"run.output_dir={tmp_path / 'fresh'}"], "no complete checkpoint in"),
        "no-eval-split": ([_no_eval_recipe(tiny, tmp_path), "--student", str(tiny / "teacher")], "--split train"),
        "json-is-dir": ([recipe, "--student", str(tiny / "teacher"), "--json", str(tmp_path)], "is a directory"),
        "student-and-untrained": ([recipe, "--student", str(tiny / "teacher"), "--untrained"], "not both"),
        "unknown-key": ([recipe, "eval.nope=1", "--student", str(tiny / "teacher")], "eval.nope"),
    }[case]
    if case != "json-is-dir":
        args += ["--json", str(out)]
    code, stdout, stderr = _eval(capsys, *args)
    assert code == 2
    lines = [line for line in stderr.splitlines() if line.startswith("kd: error:")]
    assert len(lines) == 1 and words in lines[0], stderr
    assert "Traceback" not in stderr and "kd eval:" not in stdout
    assert not out.exists()
    assert case != "no-checkpoint" or "--student" in lines[0]
    assert case != "no-eval-split" or lines[0].startswith(f"kd: error: {args[0]}: data.eval_fraction:")


# ------------------------------------------------------------------ --student resolution
def _tag(ckpts, name, *, complete=True):
    tag = ckpts / name
    (tag / "kd_meta").mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        (tag / "kd_manifest.json").write_text(json.dumps({"files": {"mp_rank_00_model_states.pt": 1}}))
    return tag


def test_find_student_kinds(tmp_path):
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    _tag(ckpts, "step_00000002")
    _tag(ckpts, "step_00000004")
    _tag(ckpts, "step_00000006", complete=False)  # a crashed save: skipped
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")

    assert find_student(None, str(run)).describe() == str(ckpts / "step_00000004")
    assert find_student(str(ckpts), "unused").tag == "step_00000004"
    assert find_student(str(run), "unused").tag == "step_00000004"
    tag = find_student(str(ckpts / "step_00000002"), "unused")
    assert (tag.kind, tag.path, tag.tag) == ("checkpoint", str(ckpts), "step_00000002")
    assert find_student(str(hf), "unused").kind == "hf"


@pytest.mark.parametrize("case", ["missing", "no-checkpoints", "incomplete-tag", "empty-dir"])
def test_find_student_errors(tmp_path, case):
    ckpts = tmp_path / "run" / "checkpoints"
    _tag(ckpts, "step_00000006", complete=False)
    (tmp_path / "empty").mkdir()
    spec, run_dir, words = {
        "missing": (str(tmp_path / "nope"), "x", "does not exist"),
        "no-checkpoints": (None, str(tmp_path / "other"), "no complete checkpoint"),
        "incomplete-tag": (str(ckpts / "step_00000006"), "x", "no manifest"),
        "empty-dir": (str(tmp_path / "empty"), "x", "neither a model directory"),
    }[case]
    with pytest.raises(UserError, match=words) as err:
        find_student(spec, run_dir)
    assert "--student" in str(err.value)
