"""DeepSpeed config dicts built from recipe sections.

The student gets a training config (ZeRO 0-3, AdamW, clipping, accumulation, bf16); the teacher an inference-only
config (ZeRO-3 parameter shards, optional CPU offload). Both come from the recipe so users never hand-write JSON; the
recipe's `deepspeed:` section is merged on top of the student's for anything advanced.
"""
from __future__ import annotations

import copy
from typing import Any

import torch

from kd.config.schema import StudentConfig, TeacherConfig, TrainConfig


def student_config(train: TrainConfig, student: StudentConfig, *, world_size: int, extra: dict[str, Any]) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    zero: dict[str, Any] = {"stage": student.zero_stage}
    if student.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
    if student.zero_stage == 3:
        # Gather the full parameters for save_checkpoint's 16-bit copy only when asked; zero_to_fp32 reads the shards.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": train.lr,
                "betas": list(train.betas),
                "eps": 1e-8,
                "weight_decay": train.weight_decay,
                # DeepSpeed's fused/CPU Adam need compiled ops; torch's AdamW works everywhere (CPU runs, tests).
                **({} if cuda else {"torch_adam": True}),
            },
        },
        "bf16": {"enabled": student.dtype == "bf16"},
        "steps_per_print": 10**9,  # kd prints its own progress
        "wall_clock_breakdown": False,
    }
    return merge(config, extra)


def teacher_config(teacher: TeacherConfig, *, micro_batch_size: int) -> dict[str, Any] | None:
    """Inference-only ZeRO-3 config, or None for a plain replica (zero_stage 0)."""
    if teacher.zero_stage == 0:
        return None
    zero: dict[str, Any] = {"stage": 3}
    if teacher.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "bf16": {"enabled": teacher.dtype == "bf16"},
        "steps_per_print": 10**9,
    }


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; values in `extra` win."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
