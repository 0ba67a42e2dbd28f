"""tools/bench_fusion.py and tools/fusion_nll.py on tiny models: the measured solver memory stays within the stated
bound (on chunked and unchunked solves), and the NLL table's large base / small base / fused rows equal the
cross-entropy of each model computed here (a = 0 static fusion = the large base)."""
from __future__ import annotations

import pytest
import torch

from tests.helpers.tools import load_tool
from tests.unit.fusion.test_teacher import fusion_recipe, model_dirs  # noqa: F401 (a fixture)

pytestmark = pytest.mark.slow  # ~5-20 s each: the default suite's budget is spent (the solver is tested directly)


@pytest.mark.parametrize("flags", [["--seq", "16", "--chunk-rows", "5"],
                                   ["--seq", "32", "--chunk-rows", "7", "--dtype", "bf16"]])
def test_bench_fusion_memory_within_its_bound(flags):
    out = load_tool("bench_fusion").main(["--size", "tiny", "--batch", "2", "--repeats", "1", *flags])
    assert out["within_bound"], out
    assert out["solver_peak_extra_mb"] > 0 and out["overhead_ratio"] > 1  # the solver costs something


def test_fusion_nll_rows_are_each_models_cross_entropy(tmp_path, model_dirs):  # noqa: F811
    from kd.assets import resolve
    from kd.config import load_recipe
    from kd.data import build_datasets, collate, eval_batches
    from kd.preflight import load_recipe_tokenizer
    from transformers import AutoModelForCausalLM

    recipe_path = fusion_recipe(tmp_path, model_dirs, mode="static", static_weights=[0.0, 0.0])
    out = load_tool("fusion_nll").main([str(recipe_path), "--max-batches", "1"])
    recipe = load_recipe(str(recipe_path), [])
    tokenizer = load_recipe_tokenizer(recipe)
    _, eval_ds = build_datasets(recipe.data, tokenizer, seed=recipe.train.seed, resolve_path=resolve)
    expect = {}
    for name, path in (("large base", str(tmp_path / "teacher")), ("small base", model_dirs["small"])):
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        total = count = 0
        for samples in eval_batches(eval_ds, rank=0, world_size=1, micro_batch_size=2, max_batches=1):
            b = collate(samples, tokenizer.pad_token_id)
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, -1)
            rows, cols = torch.nonzero(b["labels"][:, 1:] != -100, as_tuple=True)  # position i predicts label i + 1
            total -= float(logp[rows, cols, b["labels"][rows, cols + 1]].sum())
            count += len(rows)
        expect[name] = total / count
    assert out["tokens"] == count
    assert out["nll"]["large base"] == pytest.approx(expect["large base"], rel=1e-5)
    assert out["nll"]["small base"] == pytest.approx(expect["small base"], rel=1e-5)
    assert out["nll"]["dynamic fusion (static)"] == pytest.approx(expect["large base"], rel=1e-5)  # a = 0
    assert out["nll"]["proxy-tuning (a = 1)"] != pytest.approx(expect["large base"], rel=1e-3)
