"""tools/bench_kernels.py's sparse rows (a stored top-k teacher) run end to end on a tiny config on the CPU."""
from __future__ import annotations

from tests.helpers.tools import load_tool


def test_tiny_sparse_rows(capsys):
    bench = load_tool("bench_kernels")
    records = bench.main(["--fused", "", "--dense", "", "--sparse", "8,97,5", "--divergences", "forward_kl,tvd",
                          "--baseline-divergences", "forward_kl", "--backend", "torch", "--no-compile", "--no-liger",
                          "--warmup", "0", "--iters", "1"])
    methods = {(r["method"], r["divergence"]) for r in records if r["kind"] == "sparse"}
    assert methods == {("floor", "-"), ("kd", "forward_kl"), ("kd", "tvd"), ("eager", "forward_kl"),
                       ("kd dense", "forward_kl")}
    assert all(r["ms"] is not None and r["ms"] > 0 and r["config"] == {"N": 8, "V": 97, "K": 5} for r in records)
    assert all("ratio_to_floor" in r for r in records)
    assert "sparse" in capsys.readouterr().out
