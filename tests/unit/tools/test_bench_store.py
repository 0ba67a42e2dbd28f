"""tools/bench_store.py on a tiny teacher: its fidelity numbers are the quantities they claim to be."""
from __future__ import annotations

import pytest
import torch

from kd.config.loader import load_recipe
from tests.helpers.tiny_run import make_tiny_run
from tests.helpers.tools import load_tool


def test_kl_of_a_top_k_store_is_zero_at_k_equal_v_and_shrinks_with_k():
    tool = load_tool("bench_store")
    logits = torch.randn(5, 20) * 3
    assert tool._kl_topk(logits, 20) == pytest.approx(0.0, abs=1e-12)
    kls = [tool._kl_topk(logits, k) for k in (2, 8, 19)]
    assert kls == sorted(kls, reverse=True) and kls[0] > 0
    # one token, k = 1, V = 3: p = (0.7, 0.2, 0.1) stored as (0.7, 0.15, 0.15)
    p = torch.tensor([[0.7, 0.2, 0.1]])
    want = 0.2 * torch.log(torch.tensor(0.2 / 0.15)) + 0.1 * torch.log(torch.tensor(0.1 / 0.15))
    assert tool._kl_topk(p.log(), 1) == pytest.approx(want.item(), rel=1e-6)


def test_formats_measured_on_a_tiny_teacher(tmp_path):
    tool = load_tool("bench_store")
    recipe = load_recipe(str(make_tiny_run(tmp_path, teacher={"path": str(tmp_path / "teacher"), "zero_stage": 0},
                                           data={"max_documents": 10})))
    rows = tool.measure_formats(recipe, n_samples=4, ks=[4, 8])
    by = {(r["k"], r["format"]): r for r in rows}
    assert set(by) == {(4, "plain"), (4, "compact"), (8, "plain"), (8, "compact")}
    assert by[(8, "plain")]["bytes_per_token"] > by[(4, "plain")]["bytes_per_token"] > 8 * 4
    assert by[(4, "compact")]["bytes_per_token"] < by[(4, "plain")]["bytes_per_token"]
    assert by[(4, "plain")]["kl_format"] == 0.0 and -1e-6 <= by[(4, "compact")]["kl_format"] < 1e-3  # rounding may dip below 0
    assert by[(8, "plain")]["kl_topk"] < by[(4, "plain")]["kl_topk"]
