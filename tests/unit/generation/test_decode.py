"""The decode loop on a tiny random Llama (float64, so near-ties cannot flip an argmax between two correct ways of
computing the same logits): cached greedy equals recomputing the whole sequence, left padding changes nothing,
sampling follows its seed, EOS ends a row, and the completions become a training batch."""
from __future__ import annotations

import io

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kd.generation import SamplingConfig, Sampler, decode, generate, left_pad, rollout
from kd.generation.sampling import filter_logits
from kd.labels import IGNORE_INDEX

VOCAB, PAD, EOS = 97, 0, 1
PROMPTS = [[5, 9, 13], [7, 3, 22, 41, 8, 19, 4], [11], [60, 61, 62, 63, 64]]


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None)
    return LlamaForCausalLM(config).double().eval()


def greedy(new_tokens: int = 8) -> Sampler:
    return Sampler(SamplingConfig(max_new_tokens=new_tokens, temperature=0.0))


def run(model, prompts=PROMPTS, sampler=None, **kw):
    ids, mask = left_pad(prompts, PAD)
    return decode(model, ids, mask, sampler=sampler or greedy(), eos_ids=[EOS], pad_id=PAD, **kw)


@torch.no_grad()
def argmax_without_cache(model, prompts, new_tokens: int, eos: int = EOS) -> list[list[int]]:
    """The specification: recompute the whole (left-padded) sequence every step, take the argmax of the last
    position, stop a row at EOS (its later slots are masked pads)."""
    ids, mask = left_pad(prompts, PAD)
    done = torch.zeros(len(prompts), dtype=torch.bool)
    out = [[] for _ in prompts]
    for _ in range(new_tokens):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                       use_cache=False).logits[:, -1]
        token = torch.where(done, PAD, logits.argmax(-1))
        for r in range(len(prompts)):
            if not done[r]:
                out[r].append(int(token[r]))
        ids = torch.cat([ids, token[:, None]], 1)
        mask = torch.cat([mask, (~done).long()[:, None]], 1)
        done |= token == eos
        if done.all():
            break
    return out


def test_cached_greedy_equals_argmax_recomputed_without_cache(model):
    got = run(model, sampler=greedy(10))
    want = argmax_without_cache(model, PROMPTS, 10)
    assert [got.completion(r) for r in range(len(PROMPTS))] == want
    assert got.tokens.shape == (len(PROMPTS), 10) and got.forwards == 10
    # left padding changes nothing: each prompt decoded alone gives the same tokens
    for r, prompt in enumerate(PROMPTS):
        assert run(model, [prompt], sampler=greedy(10)).completion(0) == want[r]


def test_cached_greedy_with_an_eos_row_equals_the_recomputation(model):
    # make the token a row produces at some step the EOS: pick the id greedy picks for row 1 at step 3
    eos = argmax_without_cache(model, PROMPTS, 10)[1][3]
    ids, mask = left_pad(PROMPTS, PAD)
    got = decode(model, ids, mask, sampler=greedy(10), eos_ids=[eos], pad_id=PAD)
    want = argmax_without_cache(model, PROMPTS, 10, eos=eos)
    assert [got.completion(r) for r in range(len(PROMPTS))] == want
    assert got.finish_reasons[1] == "eos" and got.completion(1)[-1] == eos


def force_eos(row: int, at_step: int):
    def processor(logits: torch.Tensor, step: int) -> torch.Tensor:
        if step == at_step:
            logits = logits.clone()
            logits[row] = float("-inf")
            logits[row, EOS] = 0.0
        return logits
    return processor


def test_eos_ends_a_row_and_later_positions_are_pad(model):
    out = run(model, sampler=greedy(6), logits_processor=force_eos(row=2, at_step=1))
    assert out.finish_reasons[2] == "eos"
    assert out.tokens[2, 1] == EOS and out.tokens[2, 2:].tolist() == [PAD] * 4
    assert out.mask[2].tolist() == [1, 1, 0, 0, 0, 0]
    assert out.num_tokens[2] == 2 and out.completion(2)[-1] == EOS
    assert all(out.finish_reasons[r] == "length" for r in (0, 1, 3) if EOS not in out.completion(r))


def test_every_row_at_eos_stops_the_loop_early(model):
    everyone = lambda logits, step: torch.full_like(logits, float("-inf")).index_fill_(1, torch.tensor([EOS]), 0.0)
    out = run(model, sampler=greedy(50), logits_processor=everyone)
    assert out.forwards == 1 and out.tokens.shape == (len(PROMPTS), 1)
    assert out.finish_reasons == ["eos"] * len(PROMPTS)


def test_inactive_rows_are_finished_from_the_start(model):
    out = run(model, sampler=greedy(4), active=torch.tensor([True, False, True, True]))
    assert out.finish_reasons[1] == "none" and out.num_tokens[1] == 0 and out.tokens[1].tolist() == [PAD] * 4
    assert out.completion(0) == run(model, [PROMPTS[0]], sampler=greedy(4)).completion(0)


def test_sampling_follows_its_seed(model):
    cfg = SamplingConfig(max_new_tokens=12, temperature=1.5, top_p=0.95)
    a, b = run(model, sampler=Sampler(cfg, seed=3)), run(model, sampler=Sampler(cfg, seed=3))
    c = run(model, sampler=Sampler(cfg, seed=4))
    assert torch.equal(a.tokens, b.tokens)
    assert not torch.equal(a.tokens, c.tokens)
    torch.manual_seed(123)  # the global generator is not the sampler's: the draws ignore it
    assert torch.equal(run(model, sampler=Sampler(cfg, seed=3)).tokens, a.tokens)


def test_top_k_one_is_greedy(model):
    sampled = run(model, sampler=Sampler(SamplingConfig(max_new_tokens=8, temperature=0.7, top_k=1), seed=9))
    assert torch.equal(sampled.tokens, run(model, sampler=greedy(8)).tokens)


def test_ids_past_the_vocabulary_are_never_generated(model):
    out = run(model, sampler=Sampler(SamplingConfig(max_new_tokens=20, temperature=5.0), seed=0), vocab_size=10)
    assert int(out.tokens[out.mask.bool()].max()) < 10


def test_filters_keep_what_hugging_face_keeps():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda **kw: torch.isfinite(filter_logits(logits, SamplingConfig(**kw)))[0].tolist()
    assert kept(top_p=0.8) == [True, True, False, False]     # 0.5 + 0.3 reaches 0.8
    assert kept(top_p=0.81) == [True, True, True, False]
    assert kept(top_p=0.1) == [True, False, False, False]    # at least the most likely token
    assert kept(top_k=3) == [True, True, True, False]
    assert kept(top_k=2, top_p=0.5) == [True, False, False, False]


def test_sampler_state_round_trips_through_a_weights_only_load():
    cfg = SamplingConfig(max_new_tokens=1, temperature=1.0)
    sampler = Sampler(cfg, seed=5)
    logits = torch.zeros(3, 50)
    sampler(logits)
    buffer = io.BytesIO()
    torch.save(sampler.state_dict(), buffer)
    expected = [sampler(logits).tolist() for _ in range(3)]
    restored = Sampler(cfg, seed=0)
    buffer.seek(0)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert [restored(logits).tolist() for _ in range(3)] == expected and restored.seed == 5


def test_completions_become_a_right_padded_training_batch(model):
    out = run(model, sampler=greedy(5), logits_processor=force_eos(row=0, at_step=0))
    batch = out.training_batch()
    row0 = PROMPTS[0] + [EOS]
    assert batch["input_ids"][0, :4].tolist() == row0 and batch["attention_mask"][0].tolist()[:4] == [1] * 4
    assert batch["attention_mask"][0, 4:].sum() == 0
    assert batch["labels"][0, :4].tolist() == [IGNORE_INDEX] * 3 + [EOS]
    assert batch["labels"][1].tolist()[:7] == [IGNORE_INDEX] * 7 and batch["labels"][1, 7:].tolist() == out.completion(1)


def test_rollout_restores_every_train_flag_and_leaves_checkpointing_alone(model):
    torch.manual_seed(1)
    m = LlamaForCausalLM(model.config).train()
    m.gradient_checkpointing_enable()
    m.model.layers[1].eval()  # a mixed state must come back as it was, not as m.train()
    before = [(name, mod.training) for name, mod in m.named_modules()]
    with rollout(m, gather="always") as r:
        assert r.plan == "replica" and not any(mod.training for mod in m.modules())
    assert [(name, mod.training) for name, mod in m.named_modules()] == before and m.is_gradient_checkpointing
    # generate() too, and the model trains as before afterwards
    ids, mask = left_pad(PROMPTS[:2], PAD)
    generate(m, ids, mask, sampler=greedy(3), eos_ids=[EOS], pad_id=PAD)
    assert [(name, mod.training) for name, mod in m.named_modules()] == before
    m(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()


def test_bad_sampling_settings_are_refused():
    for bad in (dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-2)):
        with pytest.raises(ValueError):
            SamplingConfig(**bad)
    with pytest.raises(ValueError, match="at least one token"):
        left_pad([[1], []], PAD)


# ------------------------------------------------------------------------------------------------------ on a GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_cuda_cached_greedy_equals_the_recomputation_and_sampling_draws_on_the_device(model):
    """The decode loop on CUDA: every tensor it makes lives on the prompts' device (an EOS id tensor or a mask left
    on the CPU fails there, not under gloo), greedy with the cache equals recomputing on the GPU, and sampling
    draws from a CUDA generator that follows its seed and round-trips through a checkpoint's state dict."""
    device = torch.device("cuda")
    gpu = LlamaForCausalLM(model.config).double().eval()
    gpu.load_state_dict(model.state_dict())
    gpu.to(device)
    ids, mask = left_pad(PROMPTS, PAD, device)
    got = decode(gpu, ids, mask, sampler=greedy(10), eos_ids=[EOS], pad_id=PAD)
    assert got.tokens.device.type == "cuda" and got.mask.device.type == "cuda"
    assert [got.completion(r) for r in range(len(PROMPTS))] == argmax_without_cache(model, PROMPTS, 10)

    cfg = SamplingConfig(max_new_tokens=12, temperature=1.5, top_p=0.95, top_k=40)
    first = Sampler(cfg, seed=3, device=device)
    a = decode(gpu, ids, mask, sampler=first, eos_ids=[EOS], pad_id=PAD)
    b = decode(gpu, ids, mask, sampler=Sampler(cfg, seed=3, device=device), eos_ids=[EOS], pad_id=PAD)
    assert torch.equal(a.tokens, b.tokens) and first.generator.device.type == "cuda"
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = Sampler(cfg, seed=0, device=device)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(decode(gpu, ids, mask, sampler=resumed, eos_ids=[EOS], pad_id=PAD).tokens,
                       decode(gpu, ids, mask, sampler=first, eos_ids=[EOS], pad_id=PAD).tokens)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_cuda_bf16_decoding_runs_and_its_batch_trains(model):
    """bf16 weights (what GPU recipes use): the loop upcasts the logits for the sampler, the ids stay int64, and the
    completions make a training batch whose loss backpropagates."""
    device = torch.device("cuda")
    gpu = LlamaForCausalLM(model.config).to(device, torch.bfloat16).eval()
    ids, mask = left_pad(PROMPTS, PAD, device)
    out = decode(gpu, ids, mask, sampler=Sampler(SamplingConfig(max_new_tokens=6, temperature=1.0), seed=1,
                                                   device=device), eos_ids=[EOS], pad_id=PAD)
    assert out.tokens.dtype == torch.long and out.tokens.shape == (len(PROMPTS), out.forwards)
    batch = out.training_batch()
    assert all(t.device.type == "cuda" for t in batch.values())
    gpu.train()
    logits = gpu(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    labels = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=IGNORE_INDEX)
    loss.backward()
    assert torch.isfinite(loss) and gpu.lm_head.weight.grad is not None
