"""A complete tiny distillation setup on disk: teacher model directory (with tokenizer), corpus, recipe.

Used by the integration tests (real deepspeed launcher, 2 CPU ranks) and trainer-level unit tests. Everything is
built from configs and seeds, so it needs no network and takes about a second.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from tests.helpers.tiny import CORPUS, build_tiny_tokenizer

TEACHER_CONFIG = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=256, tie_word_embeddings=False,
)


def build_teacher(path: Path, *, vocab_size: int | None = None, seed: int = 0) -> Path:
    tokenizer = build_tiny_tokenizer(path)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size or len(tokenizer), bos_token_id=None,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **TEACHER_CONFIG)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def write_corpus(path: Path, *, documents: int = 120, seed: int = 0) -> Path:
    """Documents of varied length made from the tokenizer's corpus sentences (uneven lengths on purpose)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(documents):
            sentences = [rng.choice(CORPUS) for _ in range(rng.randint(1, 6))]
            f.write(json.dumps({"text": " ".join(sentences), "id": i}) + "\n")
    return path


def write_chat(path: Path, *, samples: int = 60, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(samples):
            q, a = rng.choice(CORPUS), " ".join(rng.choice(CORPUS) for _ in range(rng.randint(1, 3)))
            f.write(json.dumps({"prompt": q, "response": a, "id": i}) + "\n")
    return path


def recipe_dict(root: Path, **sections: Any) -> dict[str, Any]:
    """A tiny recipe; keyword sections are merged over the defaults one level deep."""
    recipe: dict[str, Any] = {
        "run": {"output_dir": str(root / "run"), "nproc": 2, "progress_bar": False},
        "teacher": {"path": str(root / "teacher"), "zero_stage": 3},
        "student": {"init_from_teacher_layers": [0, 2], "zero_stage": 2},
        "data": {"train": {"path": str(root / "corpus.jsonl")}, "seq_len": 32, "eval_fraction": 0.1},
        "loss": {"name": "forward_kl"},
        "train": {"max_steps": 4, "micro_batch_size": 2, "grad_accum": 2, "lr": 1e-3, "seed": 0},
        "eval": {"interval": 2, "max_batches": 2},
        "checkpoint": {"interval": 2, "keep_last": 2},
        "resume": "auto",
    }
    for name, values in sections.items():
        if isinstance(values, dict) and isinstance(recipe.get(name), dict):
            recipe[name] = {**recipe[name], **values}
        else:
            recipe[name] = values
    return recipe


def make_tiny_run(root: Path, **sections: Any) -> Path:
    """Teacher, corpus and recipe under `root`; returns the recipe path."""
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "teacher").exists():
        build_teacher(root / "teacher")
    if not (root / "corpus.jsonl").exists():
        write_corpus(root / "corpus.jsonl")
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(root, **sections), sort_keys=False))
    return path
