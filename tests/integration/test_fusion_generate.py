"""`kd fuse-generate --nproc 2` through the real per-rank launcher, every model of the fusion sharded by ZeRO-3 (layer
by layer and gathered once): the same output as --nproc 1 (replicas in one process), greedy and sampled."""
from __future__ import annotations

import json

import pytest

from tests.integration.conftest import run_kd
from tests.unit.fusion.test_generate_cli import PROMPTS
from tests.unit.fusion.test_teacher import write_model

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_two_ranks_with_sharded_models_equal_one_process(tmp_path):
    from tests.helpers.tiny_run import make_tiny_run

    dirs = {name: write_model(tmp_path / "models" / name, seed) for name, seed in (("small", 10), ("e0", 11), ("e1", 12))}
    section = {"small_base": {"path": dirs["small"], "zero_stage": 3},
               "experts": [{"path": dirs[e], "zero_stage": 3} for e in ("e0", "e1")]}
    recipe = make_tiny_run(tmp_path, teacher={"zero_stage": 3, "fusion": section})
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS * 2))  # 6 prompts: 3 batches over 2 ranks
    for flags in (("--gather", "never"), ("--gather", "always", "--temperature", "1.0", "--seed", "3")):
        outs = []
        for nproc in ("1", "2"):
            out = tmp_path / f"out_{nproc}.jsonl"
            result = run_kd("fuse-generate", str(recipe), "--prompts", str(prompts), "--out", str(out),
                            "--max-new-tokens", "5", "--batch-size", "2", "--nproc", nproc, *flags)
            assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
            outs.append([json.loads(line) for line in out.read_text().splitlines()])
        assert [r["completion"] for r in outs[0]] == [r["completion"] for r in outs[1]]
        for a, b in zip(*outs):
            assert a["fusion_weight_mean"] == pytest.approx(b["fusion_weight_mean"], abs=1e-6)
