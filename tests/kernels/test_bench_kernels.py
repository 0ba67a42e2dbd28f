"""tools/bench_kernels.py runs end to end on tiny configs (CPU here; the real configs need a GPU) and writes JSON."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "tools" / "bench_kernels.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_kernels", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_writes_every_record(tmp_path, capsys):
    bench = load_bench()
    out = tmp_path / "bench.json"
    records = bench.main(["--fused", "16,8,12,97", "--dense", "8,97", "--divergences", "forward_kl,jsd",
                          "--baseline-divergences", "forward_kl", "--backend", "torch", "--no-compile", "--no-liger",
                          "--warmup", "0", "--iters", "1", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["records"] == json.loads(json.dumps(records))
    methods = {(r["kind"], r["method"], r["divergence"]) for r in records}
    assert {("fused", "floor", "-"), ("fused", "kd", "forward_kl"), ("fused", "kd", "jsd"),
            ("fused", "eager", "forward_kl"), ("dense", "kd", "jsd"), ("dense", "eager", "forward_kl")} <= methods
    assert all(r["ms"] is not None and r["ms"] > 0 for r in records), records
    fused_kd = [r for r in records if r["kind"] == "fused" and r["method"] == "kd"]
    assert all("ratio_to_floor" in r and "ratio_to_forward_kl" in r for r in fused_kd)
    assert "x floor" in capsys.readouterr().out


def test_default_configs_refuse_to_run_without_a_gpu():
    bench = load_bench()
    if bench.torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit, match="tiny"):
        bench.main(["--no-compile"])


def test_kernels_import_without_the_training_stack():
    """The GPU machines that run the benchmark may have torch + triton only: kd.ops and the eager losses must not
    pull in pydantic (the recipe schema), deepspeed, transformers or datasets."""
    import subprocess
    import sys

    code = ("import sys, kd.ops, kd.losses.functional, kd.losses.chunked; "
            "print(sorted(m for m in ('pydantic', 'deepspeed', 'transformers', 'datasets', 'yaml') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=BENCH.parents[1])
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
