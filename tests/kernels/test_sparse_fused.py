"""kd.ops.fused_linear_sparse (student lm_head inside the loop, stored top-k teacher) against the eager spec on
materialized logits: h @ W^T, kd.losses.functional.sparse_divergence / sparse_taid_kl + CE, autograd.

Triton runs in its interpreter on CPU (TRITON_INTERPRET=1, tests/conftest.py): tiny shapes.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from kd.losses import functional as F
from kd.ops import fused_linear_sparse

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KNOBS = {"jsd": {"beta": 0.3}, "skew_kl": {"alpha": 0.2}, "skew_reverse_kl": {"alpha": 0.2}}
BACKENDS = ["torch"] + (["triton"] if importlib.util.find_spec("triton") else [])


def make(n, hs, vocab, pad, k, dtype, seed=0):
    """Hidden states, a padded lm_head, and a top-k store of a random teacher (ids in random order)."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hs, generator=gen).to(dtype)
    w = (torch.randn(vocab + pad, hs, generator=gen) * 0.5).to(dtype)
    lp_full = torch.log_softmax(torch.randn(n, vocab, generator=gen) * 2, -1)
    ids = torch.stack([torch.randperm(vocab, generator=gen)[:k] for _ in range(n)])
    lp = lp_full.gather(-1, ids)
    tail = torch.logsumexp(lp_full.scatter(-1, ids, float("-inf")), -1)
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[::4] = -100
    mask = labels != -100
    mask[1] = False  # a row with a CE label but no divergence
    return [x.to(DEVICE) for x in (h, w, ids, lp, tail, labels, mask)]


def reference(h, w, ids, lp, tail, labels, mask, vocab, name, temperature, ce_weight, normalizer, taid_t, tail_mode):
    logits = h.float() @ w[:vocab].float().t()
    if taid_t is None:
        per_row = F.sparse_divergence(logits, ids, lp, tail, divergence=name, temperature=temperature,
                                      tail=tail_mode, **KNOBS.get(name, {}))
    else:
        per_row = F.sparse_taid_kl(logits, ids, lp, tail, taid_t, temperature=temperature, tail=tail_mode)
    kd = torch.where(mask, per_row, 0.0).sum()
    ce = torch.where(labels != -100, F.cross_entropy(logits, labels), 0.0).sum()
    return ((1 - ce_weight) * kd + ce_weight * ce) / normalizer, kd, ce


def run(backend, name, dtype=torch.float32, n=19, hs=16, vocab=67, pad=5, k=7, temperature=1.5, ce_weight=0.3,
        normalizer=4.0, grad_output=0.5, taid_t=None, tail="bucket", chunk_size=8, seed=0):
    h, w, ids, lp, tail_lp, labels, mask = make(n, hs, vocab, pad, k, dtype, seed)
    hk, wk = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    hr, wr = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out = fused_linear_sparse(hk, wk, ids, lp, tail_lp, mask, labels, divergence=name, temperature=temperature,
                              taid_t=taid_t, ce_weight=ce_weight, normalizer=normalizer, vocab_size=vocab, tail=tail,
                              backend=backend, chunk_size=chunk_size, **KNOBS.get(name, {}))
    (out.loss * grad_output).backward()
    loss, kd, ce = reference(hr, wr, ids, lp, tail_lp, labels, mask, vocab, name, temperature, ce_weight,
                             normalizer, taid_t, tail)
    (loss * grad_output).backward()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.loss, loss.to(out.loss.dtype), rtol=tol, atol=tol)
    torch.testing.assert_close(out.kd_sum, kd, rtol=tol, atol=tol)
    for mine, ref in ((hk.grad, hr.grad), (wk.grad, wr.grad)):
        assert mine.dtype == dtype
        torch.testing.assert_close(mine.float(), ref.float(), rtol=tol, atol=tol * ref.abs().max().item())
    assert torch.all(wk.grad[vocab:] == 0)  # padding rows of the head


pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
# The interpreter runs every program in Python: the Triton cases beyond two divergences run with -m slow.
FAST = ("forward_kl", "skew_reverse_kl")
CASES = [pytest.param(b, n, marks=pytest.mark.slow) if b == "triton" and DEVICE == "cpu" and n not in FAST else (b, n)
         for b in BACKENDS for n in F.DIVERGENCES]


@pytest.mark.parametrize("backend,name", CASES)
def test_every_divergence(backend, name):
    run(backend, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_one_chunk(backend):
    run(backend, "forward_kl", dtype=torch.bfloat16, chunk_size=None)


@pytest.mark.parametrize("backend", [pytest.param(b, marks=pytest.mark.slow) if b == "triton" and DEVICE == "cpu"
                                     else b for b in BACKENDS])
def test_taid_renormalize(backend):
    run(backend, "forward_kl", taid_t=0.4)
    run(backend, "jsd", tail="renormalize", ce_weight=0.0)


def test_no_grad_eval():
    h, w, ids, lp, tail_lp, labels, mask = make(6, 8, 31, 0, 4, torch.float32)
    with torch.no_grad():
        out = fused_linear_sparse(h.requires_grad_(True), w, ids, lp, tail_lp, mask, labels, divergence="tvd",
                                  backend="torch")
    assert out.loss.grad_fn is None and torch.isfinite(out.loss)
