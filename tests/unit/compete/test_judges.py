"""Judges: the prompted judge's parsing (good lines, lines in swapped order, garbage, retries, both orders averaged),
the likelihood judge against a direct computation with a tiny Hugging Face model, and the judge registry/threshold
checks."""
from __future__ import annotations

import math

import pytest
import torch

from kd.compete.judges import (LikelihoodJudge, Pair, PromptedJudge, RETRY_REMINDER, Verdict, check_threshold,
                               judge_class, parse_scores, win_rate)
from kd.errors import UserError


def test_parse_good_lines_swapped_lines_and_garbage():
    assert parse_scores("Both fine.\nScore of Assistant 1: 7\nScore of Assistant 2: 4.5") == (7.0, 4.5)
    assert parse_scores("reasoning\n\nScore of Assistant 2: 3\nscore of assistant 1 : 9/10\n") == (9.0, 3.0)
    assert parse_scores("**Score of Assistant 1:** 8\n**Score of Assistant 2:** 6") == (8.0, 6.0)
    for bad in ("", "7 4", "Score of Assistant 1: 7", "Score of Assistant 1: 7\nScore of Assistant 1: 6",
                "Score of Assistant 1: 11\nScore of Assistant 2: 4",  # outside the scale
                "Score of Assistant 1: 0\nScore of Assistant 2: 4",
                "Score of Assistant 1: 7\nScore of Assistant 2: 4\nThanks!",  # not the closing lines
                "Score of Assistant 1: seven\nScore of Assistant 2: 4"):
        assert parse_scores(bad) is None, bad


class ScriptedBackend:
    """Replies by rule from the prompt: the answer shown first is found in the prompt; a queue of replies per
    (first answer, attempt) lets a test script failures."""

    def __init__(self, replies):
        self.replies, self.calls = replies, []

    def generate(self, prompts, *, temperature, stream, max_new_tokens):
        self.calls.append((list(prompts), temperature, stream))
        out = []
        for p in prompts:
            first = p.split("[Answer of Assistant 1]\n")[1].split("\n")[0]
            retry = p.endswith(RETRY_REMINDER)
            out.append(self.replies[(first, retry)])
        return out


def test_both_orders_are_averaged_and_retries_are_by_rule():
    pairs = [Pair("q0", "T0", "S0"), Pair("q1", "T1", "S1")]
    backend = ScriptedBackend({
        ("T0", False): "Score of Assistant 1: 8\nScore of Assistant 2: 5",   # teacher first: (8, 5)
        ("S0", False): "garbage",                                           # student first fails once ...
        ("S0", True): "ok\nScore of Assistant 1: 6\nScore of Assistant 2: 9",  # ... then (6, 9)
        ("T1", False): "Score of Assistant 1: 4\nScore of Assistant 2: 7",
        ("S1", False): "Score of Assistant 1: 8\nScore of Assistant 2: 5",
    })
    judge = PromptedJudge(None)
    verdicts = judge.score(pairs, backend, stream=3)
    # teacher = (s12[0] + s21[1]) / 2, student = (s12[1] + s21[0]) / 2
    assert verdicts[0] == Verdict((8 + 9) / 2, (5 + 6) / 2, attempts=3)
    assert verdicts[1] == Verdict((4 + 5) / 2, (7 + 8) / 2, attempts=2)
    assert judge.failures == 0 and judge.retried == 1
    (first, t0, s0), (second, t1, s1) = backend.calls
    assert len(first) == 4 and len(second) == 1 and second[0].endswith(RETRY_REMINDER)
    assert (t0, t1) == (0.0, 0.7) and s0 != s1  # a retry samples, from another stream
    assert win_rate(verdicts) == 0.5


def test_a_pair_that_never_parses_is_left_out_not_scored():
    backend = ScriptedBackend({("T", False): "Score of Assistant 1: 8\nScore of Assistant 2: 5",
                               ("S", False): "no scores", ("S", True): "still no scores"})
    judge = PromptedJudge(type("Cfg", (), {"retries": 2})())
    [v] = judge.score([Pair("q", "T", "S")], backend)
    assert not v.ok and v.teacher is None and v.student is None and v.attempts == 4
    assert judge.failures == 1 and len(backend.calls) == 3
    assert win_rate([v]) is None


def test_likelihood_judge_against_a_direct_computation():
    from transformers import LlamaConfig, LlamaForCausalLM

    from kd.compete.backend import ModelBackend, chat_ids
    from kd.generation import Target
    from tests.helpers.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256, eos_token_id=tok.eos_token_id,
                                         pad_token_id=tok.pad_token_id)).eval()
    pairs = [Pair("What is the capital of France?", "Paris is the capital of France.", "The fox."),
             Pair("Count to three.", "One, two, three.", "One, two, three, four, five, six."),
             Pair("Say nothing.", "The word.", ""), Pair("Blank lines.", "The word.", "\n\n\n")]
    backend = ModelBackend(Target(model), tok, seed=0, batch_size=2, max_prompt_tokens=200)
    verdicts = LikelihoodJudge().score(pairs, backend)

    def direct(question, answer):
        p = chat_ids(tok, question)
        a = tok(answer, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([p + a])).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        return sum(logp[len(p) - 1 + k, t].item() for k, t in enumerate(a)) / len(a)

    for pair, v in zip(pairs, verdicts):
        assert v.teacher == pytest.approx(direct(pair.instruction, pair.teacher), abs=1e-5)
        if pair.student:
            assert v.student == pytest.approx(direct(pair.instruction, pair.student), abs=1e-5)
    # an empty answer is scored as answering nothing: the log-prob of EOS right after the prompt
    assert verdicts[2].student == pytest.approx(direct(pairs[2].instruction, tok.eos_token), abs=1e-5)
    assert all(v.ok and v.teacher < 0 for v in verdicts)


def test_registry_and_threshold_checks():
    assert judge_class("prompted") is PromptedJudge
    assert judge_class("kd.compete.judges.LikelihoodJudge") is LikelihoodJudge
    with pytest.raises(UserError, match="did you mean 'prompted'"):
        judge_class("prompt")
    with pytest.raises(UserError, match="cannot import"):
        judge_class("no_such_pkg.Judge")
    with pytest.raises(UserError, match="is not a judge"):
        judge_class("kd.compete.pool.grow")
    check_threshold(PromptedJudge, 1.0)
    check_threshold(LikelihoodJudge, 0.25)
    for bad in (0.0, 9.5, -1.0):
        with pytest.raises(UserError, match="outside the PromptedJudge score scale"):
            check_threshold(PromptedJudge, bad)
    assert math.isinf(LikelihoodJudge.scale[0])
