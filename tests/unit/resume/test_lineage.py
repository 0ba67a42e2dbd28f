"""Which checkpoints a run may prune, which one `latest` means, what a fresh run does with an earlier run's tags, and
which recipe changes block a resume (issue 10, items 4 and 5). No launch: fake tags on disk."""
from __future__ import annotations

import json
import shutil

import pytest

from kd import checkpoint
from kd.config import dump_recipe
from kd.errors import UserError
from kd.resume import plan_resume, recipe_differences
from tests.unit.resume.test_resume_plan import recipe


def tag(ckpt_dir, step, *, lineage, saved_unix, latest=True, complete=True):
    tag_dir = ckpt_dir / checkpoint.tag_for(step)
    (tag_dir / "kd_meta").mkdir(parents=True)
    (tag_dir / "mp_rank_00_model_states.pt").write_bytes(b"x" * 10)
    meta = {"step": step, "global_sample_index": 4 * step, "world_size": 1, "recipe": dump_recipe(recipe()),
            "lineage": lineage, "saved_unix": saved_unix}
    (tag_dir / "kd_meta" / checkpoint.META_FILE).write_text(json.dumps(meta))
    if complete:
        checkpoint._write_manifest(str(tag_dir))
    if latest:
        (ckpt_dir / "latest").write_text(tag_dir.name)
    return tag_dir.name


def names(ckpt_dir):
    return sorted(p.name for p in ckpt_dir.glob("step_*"))


def test_pruning_never_removes_the_tag_just_written_nor_another_runs(tmp_path):
    # an earlier run left higher steps; the new run (another lineage) writes step 2 with keep_last 1
    tag(tmp_path, 6, lineage="old", saved_unix=1.0)
    tag(tmp_path, 8, lineage="old", saved_unix=2.0)
    new = tag(tmp_path, 2, lineage="new", saved_unix=3.0)
    assert checkpoint.prune(str(tmp_path), 1, lineage="new", keep=new) == []
    assert names(tmp_path) == ["step_00000002", "step_00000006", "step_00000008"]
    # within its own lineage it keeps the newest saves, the one just written included
    tag(tmp_path, 4, lineage="new", saved_unix=4.0)
    assert checkpoint.prune(str(tmp_path), 1, lineage="new", keep="step_00000004") == ["step_00000002"]
    assert names(tmp_path) == ["step_00000004", "step_00000006", "step_00000008"]


def test_pruning_orders_by_saving_not_by_step(tmp_path):
    # resumed from step 4 after step 8 existed: the abandoned step 8 is older than the new step 6
    tag(tmp_path, 4, lineage="r", saved_unix=1.0)
    tag(tmp_path, 8, lineage="r", saved_unix=2.0)
    tag(tmp_path, 6, lineage="r", saved_unix=3.0)
    assert checkpoint.prune(str(tmp_path), 2, lineage="r", keep="step_00000006") == ["step_00000004"]
    assert checkpoint.prune(str(tmp_path), 1, lineage="r", keep="step_00000006") == ["step_00000008"]
    assert names(tmp_path) == ["step_00000006"]


def test_latest_is_the_truth_when_it_names_a_complete_tag(tmp_path):
    tag(tmp_path, 8, lineage="r", saved_unix=1.0, latest=False)
    tag(tmp_path, 4, lineage="r", saved_unix=2.0)  # latest -> step 4 (resumed from 4; 8 is an abandoned future)
    tag(tmp_path, 10, lineage="r", saved_unix=3.0, latest=False, complete=False)  # a save cut short
    said = []
    assert checkpoint.find_latest(str(tmp_path), log=said.append) == "step_00000004"
    assert said == ["kd: skipping checkpoint step_00000010: no manifest (the save did not finish)"]
    # a lost `latest`: the highest complete step
    (tmp_path / "latest").unlink()
    assert checkpoint.find_latest(str(tmp_path), log=said.append) == "step_00000008"


def test_a_fresh_run_moves_an_earlier_runs_checkpoints_aside(tmp_path):
    ckpts = tmp_path / "checkpoints"
    tag(ckpts, 8, lineage="old", saved_unix=1.0)
    said = []
    assert plan_resume(recipe(resume="never"), str(ckpts), world_size=1, log=said.append) is None
    assert not ckpts.exists()
    (moved,) = tmp_path.glob("checkpoints.before-*")
    assert names(moved) == ["step_00000008"] and (moved / "latest").read_text() == "step_00000008"
    assert len(said) == 1 and str(moved) in said[0] and "moved" in said[0]
    # nothing to move: nothing said
    said.clear()
    assert plan_resume(recipe(resume="never"), str(ckpts), world_size=1, log=said.append) is None
    assert said == []


def test_resume_auto_continues_in_place_and_moves_nothing(tmp_path):
    ckpts = tmp_path / "checkpoints"
    tag(ckpts, 2, lineage="run", saved_unix=1.0)
    plan = plan_resume(recipe(), str(ckpts), world_size=1, log=print)
    assert plan.tag == "step_00000002" and plan.meta["lineage"] == "run"
    assert names(ckpts) == ["step_00000002"] and not list(tmp_path.glob("checkpoints.before-*"))


def test_only_incomplete_tags_count_as_a_fresh_start(tmp_path):
    ckpts = tmp_path / "checkpoints"
    tag(ckpts, 2, lineage="run", saved_unix=1.0, complete=False)
    assert plan_resume(recipe(), str(ckpts), world_size=1, log=lambda m: None) is None
    (moved,) = tmp_path.glob("checkpoints.before-*")
    assert names(moved) == ["step_00000002"]


def test_resuming_from_another_directory_moves_this_directorys_tags_aside(tmp_path):
    elsewhere = tmp_path / "other" / "checkpoints"
    tag(elsewhere, 4, lineage="theirs", saved_unix=1.0)
    ours = tmp_path / "run" / "checkpoints"
    tag(ours, 9, lineage="stale", saved_unix=2.0)
    plan = plan_resume(recipe(resume=str(elsewhere)), str(ours), world_size=1, log=lambda m: None)
    assert plan.tag == "step_00000004" and plan.meta["lineage"] == "theirs"
    assert not ours.exists() and len(list((tmp_path / "run").glob("checkpoints.before-*"))) == 1
    shutil.rmtree(tmp_path / "run")


def test_the_seed_is_part_of_a_runs_identity():
    saved = recipe().model_dump(mode="json")
    assert recipe_differences(saved, recipe(train__seed=1).model_dump(mode="json")) == ["train.seed: 0 -> 1"]


def test_speed_and_numerics_knobs_do_not_block_a_resume():
    saved = recipe().model_dump(mode="json")
    changed = recipe(loss__kernel="eager", loss__fused_linear=True, data__num_proc=4).model_dump(mode="json")
    assert recipe_differences(saved, changed) == []
    # ...while their neighbours still do
    assert recipe_differences(saved, recipe(loss__temperature=2.0).model_dump(mode="json")) == [
        "loss.temperature: 1.0 -> 2.0"]


def test_changing_the_seed_is_refused_on_resume(tmp_path):
    tag(tmp_path, 4, lineage="run", saved_unix=1.0)
    with pytest.raises(UserError, match=r"different recipe \(train.seed: 0 -> 7\)"):
        plan_resume(recipe(train__seed=7), str(tmp_path), world_size=1, log=print)
