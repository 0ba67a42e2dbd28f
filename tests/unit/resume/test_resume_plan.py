"""Resume decisions without launching anything: which checkpoint, refusing the wrong one, damaged checkpoints,
disk full while saving, and refusing pickled code."""
from __future__ import annotations

import errno
import json
import os

import pytest
import torch
import yaml

from kd import checkpoint
from kd.config import dump_recipe
from kd.config.schema import Recipe
from kd.engine.safe_load import safe_load
from kd.errors import UserError
from kd.resume import plan_resume, recipe_differences

BASE = {
    "run": {"output_dir": "/tmp/run"},
    "teacher": {"path": "/models/t"},
    "student": {"init_from_teacher_layers": [0, 1]},
    "data": {"train": {"path": "/data/a.jsonl"}},
    "train": {"max_steps": 10},
}


def recipe(**changes) -> Recipe:
    raw = yaml.safe_load(yaml.safe_dump(BASE))
    for dotted, value in changes.items():
        node = raw
        *parents, last = dotted.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return Recipe.model_validate(raw)


def fake_tag(ckpt_dir, step, saved: Recipe, *, world_size=2, files=None):
    """A tag as kd writes it: shard files, kd_meta/kd_checkpoint.json, manifest; `latest` pointing at it."""
    tag_dir = ckpt_dir / checkpoint.tag_for(step)
    (tag_dir / "kd_meta").mkdir(parents=True)
    for name, data in (files or {"mp_rank_00_model_states.pt": b"x" * 100}).items():
        (tag_dir / name).write_bytes(data)
    meta = {"step": step, "global_sample_index": 8 * step, "world_size": world_size, "recipe": dump_recipe(saved)}
    (tag_dir / "kd_meta" / "kd_checkpoint.json").write_text(json.dumps(meta))
    checkpoint._write_manifest(str(tag_dir))
    (ckpt_dir / "latest").write_text(tag_dir.name)
    return tag_dir


def test_harmless_changes_are_not_differences():
    saved = recipe().model_dump(mode="json")
    changed = recipe(run__log_interval=7, eval__interval=3, train__max_steps=99, checkpoint__interval=5).model_dump(mode="json")
    assert recipe_differences(saved, changed) == []


def test_identity_changes_are_listed():
    saved = recipe().model_dump(mode="json")
    changed = recipe(loss__name="jsd", data__seq_len=256, teacher__path="/models/other").model_dump(mode="json")
    diffs = recipe_differences(saved, changed)
    assert "loss.name: 'forward_kl' -> 'jsd'" in diffs
    assert "data.seq_len: 512 -> 256" in diffs
    assert "teacher.path: '/models/t' -> '/models/other'" in diffs


def test_wrong_checkpoint_is_refused_unless_allowed(tmp_path):
    fake_tag(tmp_path, 4, recipe())
    with pytest.raises(UserError, match=r"different recipe \(loss.name: 'forward_kl' -> 'tvd'\)") as info:
        plan_resume(recipe(loss__name="tvd"), str(tmp_path), world_size=2, log=print)
    assert info.value.key == "resume"
    plan = plan_resume(recipe(loss__name="tvd", checkpoint__allow_recipe_change=True), str(tmp_path), world_size=2, log=print)
    assert plan.tag == "step_00000004" and not plan.universal


def test_resume_never_and_empty_dir(tmp_path):
    fake_tag(tmp_path, 4, recipe())
    assert plan_resume(recipe(resume="never"), str(tmp_path), world_size=2, log=print) is None
    assert plan_resume(recipe(), str(tmp_path / "nothing"), world_size=2, log=print) is None


def test_truncated_checkpoint_is_skipped_with_a_reason(tmp_path):
    fake_tag(tmp_path, 2, recipe())
    newer = fake_tag(tmp_path, 4, recipe())
    with open(newer / "mp_rank_00_model_states.pt", "r+b") as f:
        f.truncate(10)  # a save cut short after the manifest, or a damaged disk
    said = []
    plan = plan_resume(recipe(), str(tmp_path), world_size=2, log=said.append)
    assert plan.tag == "step_00000002"
    assert said == ["kd: skipping checkpoint step_00000004: file mp_rank_00_model_states.pt has 10 bytes, manifest says 100"]
    with pytest.raises(UserError, match="cannot be resumed: file mp_rank_00_model_states.pt has 10 bytes"):
        plan_resume(recipe(resume=str(newer)), str(tmp_path), world_size=2, log=print)


def test_explicit_directory_without_checkpoints(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no complete checkpoint"):
        plan_resume(recipe(resume=str(tmp_path / "empty")), str(tmp_path), world_size=2, log=print)
    with pytest.raises(UserError, match="does not exist"):
        plan_resume(recipe(resume=str(tmp_path / "missing")), str(tmp_path), world_size=2, log=print)


def test_disk_full_during_save_leaves_nothing_half_written(tmp_path):
    saved = fake_tag(tmp_path, 2, recipe())

    class FullDisk:
        def save_checkpoint(self, ckpt_dir, tag, client_state, save_latest):
            os.makedirs(os.path.join(ckpt_dir, tag))
            with open(os.path.join(ckpt_dir, tag, "partial.pt"), "wb") as f:
                f.write(b"123")
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(checkpoint.CheckpointWriteError, match="No space left on device.*still step_00000002"):
        checkpoint.save(FullDisk(), str(tmp_path), step=4, client_state={}, write_meta=lambda d: None, keep_last=3)
    assert not (tmp_path / "step_00000004").exists()
    assert (tmp_path / "latest").read_text() == saved.name


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickled_code_in_a_checkpoint_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"module": {"w": torch.ones(2)}, "x": Payload()}, path)
    with pytest.raises(UserError, match="contains a pickled (posix|os).system"):
        safe_load(str(path))
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(2), "rng": checkpoint.rng_state()}, good)
    assert torch.equal(safe_load(str(good))["w"], torch.ones(2))


def test_unreadable_checkpoint_file(tmp_path):
    path = tmp_path / "cut.pt"
    torch.save({"w": torch.ones(1000)}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UserError, match="cannot read checkpoint file"):
        safe_load(str(path))


def test_a_knob_added_after_the_run_counts_at_its_default():
    # A run recorded by a kd without loss.sparse_tail (or any later knob) is the same run as one at that knob's
    # default, and a different one from a run that sets it to something else.
    saved = recipe().model_dump(mode="json")
    del saved["loss"]["sparse_tail"]
    assert recipe_differences(saved, recipe().model_dump(mode="json")) == []
    changed = recipe(loss__sparse_tail="renormalize").model_dump(mode="json")
    assert recipe_differences(saved, changed) == ["loss.sparse_tail: 'bucket' -> 'renormalize'"]
    # And the other way round: a knob the current kd no longer has is still listed.
    saved["loss"]["old_knob"] = 3
    assert recipe_differences(saved, recipe().model_dump(mode="json")) == ["loss.old_knob: 3 -> None"]


def test_a_section_added_after_the_run_is_compared_key_by_key_at_its_defaults():
    saved = recipe().model_dump(mode="json")
    del saved["loss"]["taid"]  # a whole sub-section the recording kd did not have
    assert recipe_differences(saved, recipe().model_dump(mode="json")) == []
    changed = recipe().model_dump(mode="json")
    changed["loss"]["taid"]["t_start"] = 0.2
    assert recipe_differences(saved, changed) == ["loss.taid.t_start: 0.4 -> 0.2"]
