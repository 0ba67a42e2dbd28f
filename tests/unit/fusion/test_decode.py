"""Fused decoding (kd.fusion.decode) against a brute force written from the definition: at every step, every model
runs on the whole prefix (prompt + tokens so far, one prompt alone, no padding, no KV cache), the last position's
logits are fused by the solver, and the next token is the argmax (or the sampler's draw). The batched, cached,
left-padded decoder must produce the same tokens; with a = 0 it must be the large base's own greedy decoding."""
from __future__ import annotations

import pytest
import torch

from kd.config.schema import FusionConfig
from kd.fusion.decode import fused_generate
from kd.generation import Sampler, SamplingConfig, generate, left_pad
from kd.teachers.fusion import FusionTeacher
from tests.unit.fusion.test_teacher import VOCAB, replicas, tiny_llama

PROMPTS = [[5, 17, 3, 60, 2], [41, 9], [88, 12, 33, 70]]
MAX_NEW = 7
PAD = 0


def fine_tune_of(base: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """A copy of `base` with every weight nudged: an 'expert' close to its small base, as fine-tunes are."""
    expert = tiny_llama(0)
    expert.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in expert.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return expert


def make_fusion(mode: str = "single", dtype=torch.float64, **fusion) -> FusionTeacher:
    large = tiny_llama(1, hidden=48, layers=3, vocab=VOCAB + 7)  # a head padded past the vocabulary, cut when fused
    small = tiny_llama(2)
    experts = [fine_tune_of(small, 3, 0.3), fine_tune_of(small, 4, 0.6)]
    models = replicas(*(m.to(dtype) for m in (large, small, *experts)))
    cfg = FusionConfig(small_base={"path": "s"}, experts=[{"path": "a"}, {"path": "b"}], mode=mode, **fusion)
    return FusionTeacher(models[0], models[1], models[2:], cfg, vocab_size=VOCAB)


def brute_force(fusion: FusionTeacher, prompt: list[int], sampler, eos: int) -> tuple[list[int], list[list[float]]]:
    tokens, weights = [], []
    for _ in range(MAX_NEW):
        ids = torch.tensor([prompt + tokens])
        last = [m.module(input_ids=ids).logits[:, -1, :VOCAB] for m in (fusion.large, fusion.small, *fusion.experts)]
        result = fusion.solve(last[0], last[1], last[2:])
        token = int(sampler(result.logits.float())[0])
        tokens.append(token)
        weights.append(result.weights[0].tolist())
        if token == eos:
            break
    return tokens, weights


def decoded(fusion, prompts, sampler, eos):
    ids, mask = left_pad(prompts, PAD)
    return fused_generate(fusion, ids, mask, sampler=sampler, eos_ids=[eos], pad_id=PAD)


GREEDY = SamplingConfig(MAX_NEW, temperature=0.0)


@pytest.mark.parametrize("mode", ["single", "joint"])
def test_greedy_fused_decoding_equals_recomputing_the_fusion_from_scratch(mode):
    fusion = make_fusion(mode, **({"grid": {"low": 0.0, "high": 1.0, "step": 0.25}} if mode == "joint" else {}))
    # an EOS the brute force emits mid-way for prompt 0: one row ends early while the others go on (padded)
    first, _ = brute_force(fusion, PROMPTS[0], Sampler(GREEDY), eos=-1)
    eos = first[2]
    out = decoded(fusion, PROMPTS, Sampler(GREEDY), eos)
    moved = 0
    for row, prompt in enumerate(PROMPTS):
        tokens, weights = brute_force(fusion, prompt, Sampler(GREEDY), eos)
        assert out.completions.completion(row) == tokens, f"prompt {row}"
        assert out.completions.finish_reasons[row] == ("eos" if tokens[-1] == eos else "length")
        n = len(tokens)
        torch.testing.assert_close(out.weights[row, :n].double(), torch.tensor(weights, dtype=torch.float64))
        assert out.weight_means(row) == pytest.approx(torch.tensor(weights).mean(0).tolist())
        moved += sum(any(w) for w in weights)
    assert out.completions.finish_reasons[0] == "eos" and out.completions.num_tokens[0] <= 3
    assert moved > 0, "the experts should steer some step"
    if mode == "single":
        assert all(sum(f) <= 1 + 1e-9 for f in (out.selected_fractions(r) for r in range(3)))


def test_sampled_fused_decoding_equals_the_brute_force_with_the_same_generator():
    fusion = make_fusion("single")
    config = SamplingConfig(MAX_NEW, temperature=1.3, top_k=20, top_p=0.9)
    out = decoded(fusion, [PROMPTS[2]], Sampler(config, seed=5), eos=-1)
    tokens, _ = brute_force(fusion, PROMPTS[2], Sampler(config, seed=5), eos=-1)
    assert out.completions.completion(0) == tokens
    other = decoded(fusion, [PROMPTS[2]], Sampler(config, seed=6), eos=-1)
    assert other.completions.completion(0) != tokens, "another seed should draw other tokens"


def test_zero_static_weights_decode_like_the_large_base_alone():
    fusion = make_fusion("static", dtype=torch.float32, static_weights=[0.0, 0.0])
    ids, mask = left_pad(PROMPTS, PAD)
    out = fused_generate(fusion, ids, mask, sampler=Sampler(GREEDY), eos_ids=[VOCAB - 1], pad_id=PAD)
    alone = generate(fusion.large.module, ids, mask, sampler=Sampler(GREEDY), eos_ids=[VOCAB - 1], pad_id=PAD,
                     vocab_size=VOCAB)
    assert torch.equal(out.completions.tokens, alone.tokens) and torch.equal(out.completions.mask, alone.mask)
    assert out.completions.finish_reasons == alone.finish_reasons
    assert not out.weights.any()
