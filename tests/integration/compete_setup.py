"""A tiny compete run on disk: the tiny teacher with an EOS that sampling reaches (about one token in ten, so
answers and new instructions end by themselves), seed and held-out chat sets, and a recipe with a compete section."""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
import yaml

from tests.helpers.tiny import CORPUS
from tests.helpers.tiny_run import build_teacher, recipe_dict

EOS_LOGIT = 3.5  # ~ e^3.5 / (e^3.5 + 319) = 0.1 of the mass on EOS at temperature 1


def build_eos_teacher(path: Path) -> Path:
    """The tiny teacher, then: every token embedding gets a constant +1 on dimension 0, so the final normed hidden
    state has a steady positive component there; EOS's lm_head row reads only that dimension (fixed logit ~
    EOS_LOGIT), and no other row reads it."""
    from transformers import LlamaForCausalLM

    build_teacher(path)
    model = LlamaForCausalLM.from_pretrained(path)
    eos = model.config.eos_token_id
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        head = model.lm_head.weight
        head[:, 0] = 0.0
        head[eos] = 0.0
        hidden = model.model.norm(model.model.embed_tokens.weight[:1] * 1.0)
        head[eos, 0] = EOS_LOGIT / float(hidden[0, 0])
    model.save_pretrained(path)
    return path


def write_instructions(path: Path, *, count: int, seed: int) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(count):
            q = " ".join(rng.choice(CORPUS).split()[: rng.randint(4, 9)]) + f" ({seed}-{i})"
            a = " ".join(rng.choice(CORPUS) for _ in range(rng.randint(1, 2)))
            f.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n")
    return path


def compete_sections(root: Path, **compete: Any) -> dict[str, Any]:
    return dict(
        run={"nproc": 1, "progress_bar": False},
        data={"kind": "chat", "train": {"path": str(root / "seeds.jsonl")}, "eval": {"path": str(root / "heldout.jsonl")},
              "seq_len": 64},
        train={"max_steps": 2, "micro_batch_size": 2, "grad_accum": 1, "lr": 1e-3, "min_lr_ratio": 1.0, "seed": 0},
        eval={"interval": 0, "at_start": True, "max_batches": 1}, checkpoint={"interval": 1, "keep_last": 2},
        compete={"rounds": 1, "imitation_steps": 2, "min_pool": 4, "answer_max_new_tokens": 16,
                 "answer_temperature": 1.0, "batch_size": 3, "chunk": 4,
                 "judge": {"name": "likelihood", "threshold": 0.05},
                 "augment": {"hard": 4, "easy": 4, "max_new_tokens": 24, "temperature": 1.0, "min_words": 2},
                 **compete},
    )


def make_compete_run(root: Path, *, teacher: Path | None = None, **compete: Any) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if teacher is None:
        teacher = root / "teacher"
        if not teacher.exists():
            build_eos_teacher(teacher)
    write_instructions(root / "seeds.jsonl", count=8, seed=1)
    write_instructions(root / "heldout.jsonl", count=4, seed=2)
    recipe = recipe_dict(root, **compete_sections(root, **compete))
    recipe["teacher"] = {"path": str(teacher), "zero_stage": 3}
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path
