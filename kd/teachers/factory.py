"""Teacher sources built from the recipe: the one place that knows which kinds exist.

The recipe's `teacher:` section describes one model, which becomes a `ModelTeacher` (an inference-only ZeRO-3
engine, or a replica with ``zero_stage: 0``), or with ``teacher.fusion:`` the large base of a `FusionTeacher` (that
model steered per position by small experts, kd.teachers.fusion), or with ``teacher.store:`` the top-k signal
`kd precompute` stored (kd.teachers.store). A new kind adds its recipe section and one branch here; the trainer calls
`build_teacher_source` and never touches a teacher model.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from kd.config.schema import Recipe
from kd.teachers.base import TeacherSource


def build_teacher_source(recipe: Recipe, *, device: torch.device, resolve_path: Callable[[str], str],
                         tokenizer: Any = None, splits: Optional[dict[str, Any]] = None) -> TeacherSource:
    """The teacher the recipe describes, loaded straight into its shards on every rank (collective under ZeRO-3).

    ``tokenizer`` and ``splits`` (the run's tokenized {"train", "eval"} datasets) are what a teacher store is checked
    against and addressed by; the model sources do not need them."""
    from kd.engine.ds_config import teacher_config
    from kd.models import load_teacher
    from kd.teachers.model import ModelTeacher

    if recipe.teacher.store is not None:  # kd.teachers.store: the stored top-k signal, no model loaded
        from kd.teachers.store import build_store_teacher

        if tokenizer is None or splits is None:
            raise ValueError("a teacher store needs the run's tokenizer and datasets")
        return build_store_teacher(recipe, device=device, resolve_path=resolve_path, tokenizer=tokenizer,
                                   splits=splits)

    if recipe.teacher.fusion is not None:  # the teacher section is the large base of a fusion (kd.teachers.fusion)
        from kd.teachers.fusion import build_fusion_teacher

        return build_fusion_teacher(recipe, device=device, resolve_path=resolve_path)
    ds_config = teacher_config(recipe.teacher, micro_batch_size=recipe.train.micro_batch_size)  # None: a replica
    model = load_teacher(recipe.teacher, zero3_config=ds_config, resolve_path=resolve_path)
    return ModelTeacher(model, ds_config, device, name=recipe.teacher.path or "inline teacher config")
