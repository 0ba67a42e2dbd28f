"""Small data builders shared by the kd.data tests."""
from __future__ import annotations

import json
from pathlib import Path

from kd.config.schema import DataConfig
from tests.helpers.tiny import CORPUS


def documents(n: int = 30) -> list[str]:
    """n distinct documents of different lengths (one empty line-free string each)."""
    return [f"{CORPUS[i % len(CORPUS)]} Document number {i}." + " More words." * (i % 4) for i in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def conversation(i: int) -> list[dict]:
    return [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": f"What is {i} plus one?"},
        {"role": "assistant", "content": f"It is {i + 1}."},
        {"role": "user", "content": "And the capital of France?"},
        {"role": "assistant", "content": "Paris, the capital of France."},
    ]


def text_cfg(path: Path, **kw) -> DataConfig:
    return DataConfig(train={"path": str(path)}, **kw)
