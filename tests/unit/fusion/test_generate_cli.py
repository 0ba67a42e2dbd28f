"""`kd fuse-generate` in one process on a tiny fusion (large base, small base, two experts, from model directories):
one JSON line per prompt in file order, the same completions as the fused decoder on each prompt alone, a* stats per
line; bad input is one `kd: error:` line, exit 2, nothing written."""
from __future__ import annotations

import json

import pytest
import torch

from kd.cli import main
from kd.config import load_recipe
from kd.fusion.decode import fused_generate
from kd.generation import Sampler, SamplingConfig, left_pad
from kd.teachers import build_teacher_source
from tests.unit.fusion.test_teacher import fusion_recipe, model_dirs  # noqa: F401 (a fixture)

PROMPTS = [{"prompt": "The quick brown fox"},
           {"messages": [{"role": "user", "content": "What is the capital of France?"}]},
           {"prompt": "One, two, three,", "id": 7}]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, model_dirs):  # noqa: F811
    root = tmp_path_factory.mktemp("fuse_gen")
    recipe = fusion_recipe(root, model_dirs)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return root, recipe, prompts


def test_one_line_per_prompt_like_the_fused_decoder_alone(setup, tmp_path):
    root, recipe, prompts = setup
    out = tmp_path / "sub" / "out.jsonl"
    assert main(["fuse-generate", str(recipe), "--prompts", str(prompts), "--out", str(out),
                 "--max-new-tokens", "6", "--batch-size", "2"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert rows[1]["messages"] == PROMPTS[1]["messages"]
    assert all(r["finish_reason"] in ("eos", "length") and 1 <= r["tokens"] <= 6 for r in rows)
    for r in rows:
        assert len(r["fusion_weight_mean"]) == 2 and all(0.0 <= w <= 2.0 for w in r["fusion_weight_mean"])
        assert len(r["fusion_selected_fraction"]) == 2 and sum(r["fusion_selected_fraction"]) <= 1 + 1e-9
    # prompt 0 decoded alone (no batching, no padding) by the library gives the same completion
    fusion = build_teacher_source(load_recipe(str(recipe), ["teacher.zero_stage=0"]), device=torch.device("cpu"),
                                  resolve_path=lambda p: p)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(root / "teacher")
    ids, mask = left_pad([tok(PROMPTS[0]["prompt"])["input_ids"]], tok.pad_token_id)
    alone = fused_generate(fusion, ids, mask, sampler=Sampler(SamplingConfig(6, temperature=0.0)),
                           eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id)
    assert rows[0]["completion"] == tok.decode(alone.completions.completion(0), skip_special_tokens=True)
    assert rows[0]["tokens"] == alone.completions.num_tokens[0]
    assert rows[0]["fusion_weight_mean"] == pytest.approx(alone.weight_means(0))


def test_bad_input_is_one_line_exit_2_and_nothing_written(setup, tmp_path, capsys):
    root, recipe, prompts = setup
    plain = root / "recipe.plain.yaml"  # the same run without a fusion section
    raw = recipe.read_text().replace("fusion:", "unused_fusion:")
    import yaml

    data = yaml.safe_load(raw)
    data["teacher"].pop("unused_fusion")
    plain.write_text(yaml.safe_dump(data))
    out = tmp_path / "out.jsonl"
    cases = [((plain, prompts), (), "teacher.fusion: fuse-generate decodes with a fusion of models"),
             ((recipe, tmp_path / "missing.jsonl"), (), f"kd: error: {tmp_path / 'missing.jsonl'}: no such file"),
             ((recipe, prompts), ("--top-p", "0"), "kd: error: --top-p must be in (0, 1], got 0.0")]
    for (r, p), flags, message in cases:
        capsys.readouterr()
        assert main(["fuse-generate", str(r), "--prompts", str(p), "--out", str(out), *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
        assert not out.exists()


def test_one_process_makes_every_model_a_replica(tmp_path, model_dirs):  # noqa: F811
    """ZeRO-3 sections (one with parameter offload) become plain replicas in one process: no engine, no group."""
    from kd.fusion.generate import load_fusion
    from kd.preflight import load_recipe_tokenizer

    path = fusion_recipe(tmp_path, model_dirs)
    recipe = load_recipe(str(path), ["teacher.zero_stage=3", "teacher.fusion.small_base.zero_stage=3",
                                     "teacher.fusion.small_base.offload_params=true"])
    fusion = load_fusion(recipe, load_recipe_tokenizer(recipe), torch.device("cpu"))
    assert all(m.engine is None for m in (fusion.large, fusion.small, *fusion.experts))
    assert recipe.teacher.fusion.small_base.offload_params  # the caller's recipe is left as it was
