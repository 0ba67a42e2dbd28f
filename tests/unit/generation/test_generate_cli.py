"""`kd generate` in one process on the tiny teacher: one JSON line per prompt in file order (prompt or messages,
completion, token count, finish reason), the same completions as calling kd.generation directly, sampling
reproducible from --seed; bad input is one `kd: error:` line, exit 2, and nothing written."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kd.cli import main
from kd.generation import SamplingConfig, Sampler, decode, left_pad
from tests.helpers.tiny import build_tiny_tokenizer
from tests.helpers.tiny_run import make_tiny_run

PROMPTS = [{"prompt": "The quick brown fox"},
           {"messages": [{"role": "user", "content": "What is the capital of France?"}]},
           {"prompt": "One, two, three,", "id": 7}]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    recipe = make_tiny_run(root)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return root, recipe, prompts


def kd_generate(recipe, prompts, out, *flags):
    return main(["generate", str(recipe), "--prompts", str(prompts), "--out", str(out), "--model", "teacher", *flags])


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_one_line_per_prompt_with_the_direct_decodes_tokens(setup, tmp_path):
    root, recipe, prompts = setup
    out = tmp_path / "sub" / "out.jsonl"
    assert kd_generate(recipe, prompts, out, "--max-new-tokens", "6", "--batch-size", "2") == 0
    rows = read(out)
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert rows[0]["prompt"] == PROMPTS[0]["prompt"] and rows[1]["messages"] == PROMPTS[1]["messages"]
    assert all(r["finish_reason"] in ("eos", "length") and 1 <= r["tokens"] <= 6 for r in rows)
    # the same as decoding the prompt alone with the library (batching and padding change nothing)
    tok = AutoTokenizer.from_pretrained(root / "teacher")
    model = AutoModelForCausalLM.from_pretrained(root / "teacher").eval()
    text = tok.apply_chat_template(PROMPTS[1]["messages"], tokenize=False, add_generation_prompt=True)
    ids, mask = left_pad([tok(text, add_special_tokens=False)["input_ids"]], tok.pad_token_id)
    alone = decode(model, ids, mask, sampler=Sampler(SamplingConfig(6, temperature=0.0)),
                   eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id)
    assert rows[1]["tokens"] == alone.num_tokens[0]
    assert rows[1]["completion"] == tok.decode(alone.completion(0), skip_special_tokens=True)


def test_sampling_is_reproducible_from_the_seed(setup, tmp_path):
    _, recipe, prompts = setup
    flags = ("--max-new-tokens", "8", "--temperature", "1.0", "--top-p", "0.9")
    outs = []
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        assert kd_generate(recipe, prompts, tmp_path / name, *flags, "--seed", seed) == 0
        outs.append([r["completion"] for r in read(tmp_path / name)])
    assert outs[0] == outs[1] and outs[0] != outs[2]


def test_bad_input_is_one_line_exit_2_and_nothing_written(setup, tmp_path, capsys):
    root, recipe, prompts = setup
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"text": "no prompt"}) + "\n")
    no_pad = tmp_path / "no_pad_tok"
    tok = build_tiny_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(no_pad)
    cases = [
        ((recipe, tmp_path / "missing.jsonl"), (), f"kd: error: {tmp_path / 'missing.jsonl'}: no such file"),
        ((recipe, bad_line), (), f"kd: error: {bad_line}: line 2: needs a 'prompt' string or a non-empty 'messages' list"),
        ((recipe, prompts), ("--max-new-tokens", "0"), "kd: error: --max-new-tokens must be at least 1, got 0"),
        ((recipe, prompts), (f"tokenizer={no_pad}",), f"kd: error: {recipe}: tokenizer: the tokenizer has no pad token id"),
    ]
    for (r, p), flags, message in cases:
        out = tmp_path / "out.jsonl"
        assert kd_generate(r, p, out, *flags) == 2, message
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(message), (err, message)
        assert not out.exists()


def test_a_write_that_fails_is_one_line_naming_the_file(tmp_path):
    from kd.errors import UserError
    from kd.generation.cli import write_output

    (tmp_path / "taken").write_text("a file where the output's directory should be")
    out = tmp_path / "taken" / "out.jsonl"
    with pytest.raises(UserError) as info:
        write_output(str(out), [{"prompt": "p", "completion": "c"}])
    assert str(out) in info.value.report() and "cannot write the completions" in info.value.report()
    assert (tmp_path / "taken").read_text().startswith("a file")  # nothing written over it
