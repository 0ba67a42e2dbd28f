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


def start_kd(*args: str, env: dict | None = None, log_path: Path | None = None) -> subprocess.Popen:
    """Start the kd CLI in the background in its own process group (so a test can kill the whole job)."""
    full_env = dict(os.environ, **(env or {}))
    full_env.setdefault("OMP_NUM_THREADS", "1")
    out = open(log_path, "w") if log_path else subprocess.DEVNULL
    return subprocess.Popen([sys.executable, "-m", "kd.cli", *args], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                            env=full_env, start_new_session=True)


def wait_for(condition, *, timeout: float, what: str, proc: subprocess.Popen | None = None, interval: float = 0.2):
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"kd exited ({proc.returncode}) before {what}")
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def rank_pids(run_marker: str) -> dict[int, int]:
    """pid of each training rank (`python -m kd.launch --local_rank=R ...`) whose command line mentions run_marker."""
    import psutil

    pids = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "kd.launch" in cmd and any(run_marker in part for part in cmd):
            for part in cmd:
                if part.startswith("--local_rank="):
                    pids[int(part.split("=")[1])] = proc.info["pid"]
    return pids


def last_step(run_dir: Path) -> int:
    try:
        return max((r["step"] for r in read_metrics(run_dir) if "loss" in r), default=0)
    except (OSError, ValueError):
        return 0
