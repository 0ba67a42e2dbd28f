"""Load or build the teacher and the student, and the tokenizer, from their recipe sections.

A model comes from one of: a local Hugging Face directory (``path``, optionally a ``gguf_file`` inside it, dequantized
by transformers), an inline config (``config``: a randomly initialised model), or for the student the teacher's
layers (``init_from_teacher_layers``, see kd.models.layer_init). With a ZeRO-3 DeepSpeed config the model is built
straight into shards (kd.models.zero3), never as a full copy per rank.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from kd.config.schema import ModelSource, StudentConfig, TeacherConfig
from kd.errors import UserError
from kd.models.layer_init import (
    MissingTeacherTensors,
    SafetensorsSource,
    StateDictSource,
    TensorSource,
    copy_teacher_layers,
    student_config_from_teacher,
)
from kd.models.zero3 import zero3_construction

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# An inline-config teacher is random; a fixed seed makes every rank's replica (zero_stage 0) the same model, and lets
# init_from_teacher_layers rebuild exactly that teacher.
_INLINE_TEACHER_SEED = 0

Resolve = Callable[[str], str]


def _identity(path: str) -> str:
    return path


def _check_dir(path: str, gguf_file: str | None, key: str) -> None:
    """UserError unless ``path`` is a model directory holding config.json (or the named GGUF file)."""
    if os.path.isfile(path):
        hint = f"; for a GGUF file set {key} to its directory and gguf_file to its name" if path.endswith(".gguf") else ""
        raise UserError(f"{path} is a file, expected a model directory{hint}", key=key)
    if not os.path.isdir(path):
        raise UserError(f"model directory {path} does not exist: point it at a local Hugging Face model directory", key=key)
    if gguf_file is not None:
        if not os.path.isfile(os.path.join(path, gguf_file)):
            found = sorted(n for n in os.listdir(path) if n.endswith(".gguf"))
            raise UserError(
                f"GGUF file {gguf_file} not found in {path} (GGUF files there: {', '.join(found) or 'none'})",
                key=key.rsplit(".", 1)[0] + ".gguf_file",
            )
    elif not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(
            f"{path} has no config.json, so it is not a Hugging Face model directory "
            "(save the model with save_pretrained, or set gguf_file for a GGUF checkpoint)",
            key=key,
        )


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed model initialisation without disturbing the process's RNG streams (data order, dropout)."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _inline_config(values: dict[str, Any], key: str) -> Any:
    from transformers import AutoConfig

    if "model_type" not in values:
        raise UserError("an inline model config needs `model_type` (e.g. llama, qwen2) besides its fields", key=key)
    try:
        return AutoConfig.for_model(**values)
    except (ValueError, TypeError) as err:
        raise UserError(f"invalid inline model config: {err}", key=key) from err


def source_config(cfg: ModelSource, *, section: str, resolve_path: Resolve = _identity) -> Any:
    """The transformers config a model section describes (read from its directory/GGUF, or its inline config)."""
    from transformers import AutoConfig

    if cfg.path is None:
        return _inline_config(dict(cfg.config or {}), f"{section}.config")
    path = resolve_path(cfg.path)
    _check_dir(path, cfg.gguf_file, f"{section}.path")
    return AutoConfig.from_pretrained(path, gguf_file=cfg.gguf_file, trust_remote_code=cfg.trust_remote_code)


def _build(cfg: ModelSource, *, section: str, seed: int, zero3_config: dict | None, resolve_path: Resolve) -> Any:
    """Load ``cfg.path`` (HF dir or GGUF) or build from the inline config, in ``cfg.dtype``, maybe ZeRO-3 sharded."""
    from transformers import AutoModelForCausalLM

    dtype = _DTYPES[cfg.dtype]
    if cfg.path is None:
        config = _inline_config(dict(cfg.config or {}), f"{section}.config")
        with zero3_construction(zero3_config), _seeded(seed):
            return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    path = resolve_path(cfg.path)
    _check_dir(path, cfg.gguf_file, f"{section}.path")
    try:
        with zero3_construction(zero3_config):
            return AutoModelForCausalLM.from_pretrained(
                path, gguf_file=cfg.gguf_file, dtype=dtype, trust_remote_code=cfg.trust_remote_code
            )
    except OSError as err:  # missing/corrupt weight files: the user's directory, not a kd bug
        raise UserError(f"could not load the model in {path}: {err}", key=f"{section}.path") from err


def load_tokenizer(
    path: str, *, trust_remote_code: bool = False, gguf_file: str | None = None, key: str = "tokenizer"
) -> Any:
    """The tokenizer saved in ``path`` (a resolved local directory; ``gguf_file`` reads it from a GGUF file there)."""
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise UserError(f"tokenizer directory {path} does not exist", key=key)
    try:
        return AutoTokenizer.from_pretrained(path, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"could not load a tokenizer from {path}: {err}", key=key) from err


def load_teacher(cfg: TeacherConfig, *, zero3_config: dict | None, resolve_path: Resolve = _identity) -> Any:
    """The frozen teacher: loaded/built (ZeRO-3 sharded when ``zero3_config`` is given), eval mode, no gradients."""
    model = _build(cfg, section="teacher", seed=_INLINE_TEACHER_SEED, zero3_config=zero3_config, resolve_path=resolve_path)
    model.eval()
    model.requires_grad_(False)
    return model


def _teacher_tensors(teacher_cfg: TeacherConfig, resolve_path: Resolve) -> TensorSource | None:
    """A lazy reader over the teacher's safetensors, or None when the teacher has none (GGUF, inline config, .bin)."""
    if teacher_cfg.path is None or teacher_cfg.gguf_file is not None:
        return None
    path = resolve_path(teacher_cfg.path)
    return SafetensorsSource(path) if SafetensorsSource.available(path) else None


def _built_teacher_tensors(teacher_cfg: TeacherConfig, resolve_path: Resolve) -> StateDictSource:
    """Fallback: build the whole teacher on CPU and use its state dict.

    Costs one full teacher in CPU memory per rank (plus GGUF dequantization time): fine for the small teachers that
    come as GGUF or inline configs, and the reason safetensors teachers are read tensor by tensor instead.
    """
    log.warning("init_from_teacher_layers: building the full teacher on CPU to read its weights")
    teacher = load_teacher(teacher_cfg, zero3_config=None, resolve_path=resolve_path)
    return StateDictSource(teacher.state_dict())


def _student_from_teacher(
    cfg: StudentConfig, teacher_cfg: TeacherConfig, *, seed: int, zero3_config: dict | None, resolve_path: Resolve
) -> Any:
    """The teacher's architecture with the listed layers, weights copied from the teacher."""
    from transformers import AutoModelForCausalLM

    layers = list(cfg.init_from_teacher_layers or [])
    teacher_config = source_config(teacher_cfg, section="teacher", resolve_path=resolve_path)
    config = student_config_from_teacher(teacher_config, layers)
    # The student runs the teacher's model code, so the teacher's trust_remote_code flag is the one that applies.
    with zero3_construction(zero3_config), _seeded(seed):
        model = AutoModelForCausalLM.from_config(
            config, dtype=_DTYPES[cfg.dtype], trust_remote_code=teacher_cfg.trust_remote_code
        )
    source = _teacher_tensors(teacher_cfg, resolve_path) or _built_teacher_tensors(teacher_cfg, resolve_path)
    try:
        copied = copy_teacher_layers(model, layers, source)
    except MissingTeacherTensors as err:
        # Checkpoints stored under other key names (legacy layouts transformers renames on load) are rebuilt.
        log.warning("init_from_teacher_layers: %s; falling back to building the teacher", err)
        source.close()
        source = _built_teacher_tensors(teacher_cfg, resolve_path)
        copied = copy_teacher_layers(model, layers, source)
    finally:
        source.close()
    log.info("student initialised from teacher layers %s (%d tensors copied)", layers, copied)
    return model


def load_student(
    cfg: StudentConfig,
    *,
    teacher_cfg: TeacherConfig,
    seed: int,
    zero3_config: dict | None,
    resolve_path: Resolve = _identity,
) -> Any:
    """The trainable student in train mode, from ``path``, an inline ``config`` (seeded) or the teacher's layers."""
    if cfg.init_from_teacher_layers is not None:
        model = _student_from_teacher(cfg, teacher_cfg, seed=seed, zero3_config=zero3_config, resolve_path=resolve_path)
    else:
        model = _build(cfg, section="student", seed=seed, zero3_config=zero3_config, resolve_path=resolve_path)
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing works with ZeRO-3 and with inputs that do not require grad.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model.train()
    model.requires_grad_(True)
    return model
