"""Integration tests run the real `kd train` -> deepspeed launcher -> 2 CPU ranks (gloo)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_kd(*args: str, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the kd CLI in a fresh process (what a user types), capturing its output."""
    full_env = dict(os.environ, **(env or {}))
    full_env.setdefault("OMP_NUM_THREADS", "1")  # 2 ranks on 2 cores: no thread oversubscription
    result = subprocess.run([sys.executable, "-m", "kd.cli", *args], cwd=REPO, capture_output=True, text=True,
                            timeout=timeout, env=full_env)
    return result


def read_metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def train_records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir) if "loss" in r}


@pytest.fixture
def kd_run():
    return run_kd
