"""`kd generate --nproc 2` through the real per-rank launcher, with the tiny teacher sharded by ZeRO-3 (the recipe's
teacher.zero_stage 3): the ranks generate their batches in lockstep and the file equals the one-process run's,
greedy and sampled (each batch samples from its own stream of the seed). Slow: two launches of two ranks."""
from __future__ import annotations

import json

import pytest

from tests.helpers.tiny_run import make_tiny_run

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_two_ranks_write_what_one_process_writes(tmp_path, kd_run):
    recipe = make_tiny_run(tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    # 5 prompts in batches of 2: three batches, so rank 1 decodes a filler in the second round
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                               ["The quick", "Knowledge distillation trains", "In the", "It is a truth", "Pack the"]))
    for flags in (("--max-new-tokens", "7"), ("--max-new-tokens", "7", "--temperature", "1.0", "--seed", "3")):
        outs = []
        for nproc in ("1", "2"):
            out = tmp_path / f"out_{nproc}.jsonl"
            result = kd_run("generate", str(recipe), "--prompts", str(prompts), "--out", str(out), "--model",
                            "teacher", "--batch-size", "2", "--nproc", nproc, *flags)
            assert result.returncode == 0, result.stderr[-3000:]
            outs.append([json.loads(line) for line in out.read_text().splitlines()])
        assert [r["index"] for r in outs[1]] == list(range(5))
        assert outs[0] == outs[1], flags
