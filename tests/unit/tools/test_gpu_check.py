"""tools/gpu_check.py: the assets of the GPU check at tiny sizes (the tokenizer has exactly the vocabulary asked for,
the recipes validate and build models of the stated shapes) and the summary table it prints."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kd.config import load_recipe
from kd.models.vocab import shared_vocab_size

from tests.helpers.tools import load_tool

REPO = Path(__file__).resolve().parents[3]


gpu_check = load_tool("gpu_check")


def test_tokenizer_has_the_size_asked_for_and_every_word_is_one_token(tmp_path):
    from transformers import AutoTokenizer

    gpu_check.build_tokenizer(tmp_path / "tok", 1000)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert len(tok) == 1000
    assert tok("w0 w996 w17")["input_ids"] == [3, 999, 20]  # 3 specials first: endoftext, pad, unk
    assert (tok.eos_token, tok.pad_token_id) == ("<|endoftext|>", 1)


def test_gpu_shapes_are_qwen2_5_1_5b_and_0_5b():
    t, s = gpu_check.TEACHER_GPU, gpu_check.STUDENT_GPU
    assert (t["hidden_size"], t["num_hidden_layers"], t["num_attention_heads"], t["intermediate_size"]) == (1536, 28, 12, 8960)
    assert (s["hidden_size"], s["num_hidden_layers"], s["num_attention_heads"], s["intermediate_size"]) == (896, 24, 14, 4864)
    assert t["vocab_size"] == s["vocab_size"] == 151936 and t["num_key_value_heads"] == s["num_key_value_heads"] == 2
    assert gpu_check.SIZES["gpu"]["vocab"] == 151665


def test_tiny_assets_validate_and_build_models_of_the_stated_shapes(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    paths = gpu_check.write_assets(tmp_path, tiny=True)
    tok = AutoTokenizer.from_pretrained(str(paths["tokenizer"]))
    docs = [json.loads(line) for line in paths["corpus"].read_text().splitlines()]
    assert len(docs) == gpu_check.SIZES["tiny"]["documents"]
    ids = tok(docs[0]["text"])["input_ids"]
    assert len(ids) == gpu_check.SIZES["tiny"]["words"] and tok.unk_token_id not in ids
    for name in ("bench", "train"):
        recipe = load_recipe(str(paths[name]))
        teacher = AutoConfig.for_model(**recipe.teacher.config)
        student = AutoConfig.for_model(**recipe.student.config)
        assert (teacher.hidden_size, student.hidden_size) == (64, 32)
        assert shared_vocab_size(tok, teacher, student) == 512  # the models cover the tokenizer
        assert recipe.tokenizer == str(paths["tokenizer"]) and recipe.run.nproc == 1
    train = load_recipe(str(paths["train"]))
    assert (train.train.max_steps, train.checkpoint.interval, train.resume) == (20, 10, "auto")


def test_summary_table_lists_every_stage_with_its_key_number(tmp_path):
    (tmp_path / "stages.tsv").write_text("install\tskipped: present\t0\npytest_gpu\tok\t61\n"
                                         "bench_kernels\tok\t40\nbench_step_fused\tfailed (exit 1)\t12\n"
                                         "bench_step_dense\tok\t30\nbench_generate\tok\t50\n"
                                         "train\ttimeout after 240s\t240\n")
    (tmp_path / "pytest_gpu.log").write_text("....\n========== 12 passed, 3 skipped in 50.1s ==========\n")
    (tmp_path / "bench_kernels.json").write_text(json.dumps({"records": [
        {"kind": "dense", "divergence": "forward_kl", "method": "kd", "ratio_to_floor": 1.4},
        {"kind": "fused", "divergence": "jsd", "method": "kd", "ratio_to_floor": 2.25},
        {"kind": "fused", "divergence": "jsd", "method": "eager", "ratio_to_floor": 9.0},
        {"kind": "fused", "divergence": "-", "method": "floor"}]}))
    (tmp_path / "bench_step_dense.json").write_text("[WARNING] DeepSpeed prints to stdout too\n" + json.dumps(
        {"ratio": 1.2345, "kd_tokens_per_s": 51234.4, "kd": {"loss_fwd": 0.01, "loss_bwd": 0.02}}) + "\n")
    (tmp_path / "bench_step_fused.json").write_text("")  # a failed stage leaves nothing readable
    (tmp_path / "bench_generate.json").write_text("generation, batch 16:\n" + json.dumps(
        {"zero3_always": 812.4, "gathered_once_vs_hf": 0.9125, "gathered_once_vs_layers": 31.04}) + "\n")
    lines = gpu_check.summary_table(tmp_path).splitlines()
    assert len(lines) == 2 + 7
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert cells[0] == ["stage", "status", "seconds", "key number"]
    assert [c[0] for c in cells[2:]] == ["install", "pytest_gpu", "bench_kernels", "bench_step_fused",
                                         "bench_step_dense", "bench_generate", "train"]
    by_stage = {c[0]: c[1:] for c in cells[2:]}
    assert by_stage["pytest_gpu"] == ["ok", "61", "12 passed, 3 skipped in 50.1s"]
    assert by_stage["bench_kernels"][2] == "2 kd timings, worst 2.25x floor (fused jsd)"
    assert by_stage["bench_step_dense"][2] == "KD/baseline 1.234, 51234 tokens/s (loss fwd+bwd 30 ms)"
    assert by_stage["bench_step_fused"] == ["failed (exit 1)", "12", "-"]
    assert by_stage["bench_generate"][2] == ("ZeRO-3 gathered once 812 tok/s per rank = 0.91x HF replica, "
                                             "31.0x layer by layer")
    assert by_stage["train"] == ["timeout after 240s", "240", "-"]
    assert len({len(line) for line in lines}) == 1  # the columns line up


def test_summary_command_writes_the_table(tmp_path, capsys):
    (tmp_path / "stages.tsv").write_text("assets\tok\t3\n")
    assert gpu_check.main(["summary", str(tmp_path)]) == 0
    assert (tmp_path / "summary.md").read_text().strip() == capsys.readouterr().out.strip()


@pytest.mark.parametrize("script", ["gpu_check.sh", "gpu_wheels.sh"])
def test_shell_scripts_parse(script):
    import subprocess

    assert subprocess.run(["bash", "-n", str(REPO / "tools" / script)]).returncode == 0
