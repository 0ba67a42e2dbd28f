"""`accelerate launch --config_file launchers/accelerate_deepspeed.yaml launchers/train.py --recipe R` with 2 CPU
processes: accelerate only starts the ranks (torchrun-style environment); kd's own DeepSpeed engines do the rest."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from tests.helpers.tiny_run import make_tiny_run
from tests.integration.conftest import REPO, read_metrics, train_records

# slow: an alternative launcher over the same per-rank entry the default suite covers with `kd train` and the deepspeed
# launcher; it keeps the default suite's time down (~50 s on 2 cores)
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_launch_trains_two_ranks(tmp_path):
    recipe = make_tiny_run(tmp_path, train={"max_steps": 2}, eval={"interval": 0, "max_batches": 1},
                           checkpoint={"interval": 0, "keep_last": 1})
    run_dir = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch",
           "--config_file", "launchers/accelerate_deepspeed.yaml", "--num_processes", "2",
           "--main_process_port", str(_free_port()),
           "launchers/train.py", "--recipe", str(recipe), "train.seed=1"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]

    assert "kd: 2 rank(s)" in output  # both processes joined one group
    assert sorted(train_records(run_dir)) == [1, 2]
    assert [r["step"] for r in read_metrics(run_dir) if "eval/kl" in r] == [0, 2]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000002"
    assert "seed: 1" in (run_dir / "recipe.yaml").read_text()  # overrides after --recipe reach the ranks
