"""Fused-linear Triton path vs a full eager reference (N x V logits, kd.losses.functional, autograd).

Runs in Triton's interpreter without CUDA (TRITON_INTERPRET=1, set by tests/conftest.py before triton is imported). The reference below
materializes the logits with the same matmuls and differentiates the eager divergence + CE with autograd.
"""
from __future__ import annotations


import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from kd.losses import functional as F  # noqa: E402
from kd.losses.chunked import eager_chunk_step  # noqa: E402
from kd.ops.spec import DivergenceSpec  # noqa: E402
from kd.ops import fused_linear_divergence  # noqa: E402
from kd.ops.dense_kl import launch_config  # noqa: E402
from kd.ops.fused_linear_kl import triton_chunk_step  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
KNOBS = {"jsd": {"beta": 0.3}, "skew_kl": {"alpha": 0.2}, "skew_reverse_kl": {"alpha": 0.2}}


def make(n, hs, ht, vocab, pad, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    student_h = torch.randn(n, hs, generator=gen).to(DEVICE, dtype)
    student_w = (torch.randn(vocab + pad, hs, generator=gen) * 0.5).to(DEVICE, dtype)
    teacher_h = torch.randn(n, ht, generator=gen).to(DEVICE, dtype)
    teacher_w = (torch.randn(vocab + 3, ht, generator=gen) * 0.5).to(DEVICE, dtype)
    labels = torch.randint(0, vocab, (n,), generator=gen).to(DEVICE)
    labels[::4] = -100
    mask = labels != -100
    mask[1] = False  # a row with a CE label but no divergence
    return student_h, student_w, teacher_h, teacher_w, labels, mask


def reference(h, w, ht, wt, labels, mask, vocab, name, temperature, ce_weight, normalizer, taid_t=None):
    """((1 - w) sum_masked D + w sum_labelled CE) / normalizer on materialized logits, plus the two sums."""
    zs = h @ w[:vocab].t()
    zt = (ht @ wt[:vocab].t()).detach()
    if taid_t is not None:
        zt = (1.0 - taid_t) * zs.detach().float() + taid_t * zt.float()
    kd = torch.where(mask, F.DIVERGENCES[name](zs, zt, temperature=temperature, **KNOBS.get(name, {})), 0.0).sum()
    ce = torch.where(labels != -100, F.cross_entropy(zs, labels), 0.0).sum()
    return ((1.0 - ce_weight) * kd + ce_weight * ce) / normalizer, kd, ce


def run_both(name, dtype, n=37, vocab=1031, pad=9, temperature=1.7, ce_weight=0.25, taid_t=None, seed=0,
             teacher_as_logits=False, chunk_size=16):
    h, w, ht, wt, labels, mask = make(n, 16, 24, vocab, pad, dtype, seed)
    normalizer = torch.tensor(11.0, device=DEVICE)  # a tensor, as the trainer's global token count
    grad_out = 1.3  # != 1
    hk, wk = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    teacher = dict(teacher_logits=ht @ wt.t()) if teacher_as_logits else dict(teacher_hidden=ht, teacher_weight=wt)
    out = fused_linear_divergence(hk, wk, mask, labels, **teacher, divergence=name, temperature=temperature,
                                  ce_weight=ce_weight, normalizer=normalizer, taid_t=taid_t, vocab_size=vocab,
                                  backend="triton", chunk_size=chunk_size, **KNOBS.get(name, {}))
    (out.loss * grad_out).backward()
    hr, wr = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss, kd, ce = reference(hr, wr, ht, wt, labels, mask, vocab, name, temperature, ce_weight, normalizer, taid_t)
    (loss * grad_out).backward()
    return out, (loss, kd, ce), (hk.grad, wk.grad), (hr.grad, wr.grad), mask


def assert_grads_close(got, want, dtype):
    for g, r in zip(got, want):
        assert g.dtype == dtype
        scale = r.float().abs().max().item()
        tol = 2e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(g.float(), r.float(), rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_kl_odd_shape_with_ce(dtype):
    """37 rows in chunks of 16 (last one partial), vocab 1031 cut from a padded 1040-row lm_head, T != 1, CE term,
    ignored rows, tensor normalizer, grad_output != 1: loss, both sums, grad of hidden states and weight."""
    out, (loss, kd, ce), got, want, mask = run_both("forward_kl", dtype)
    torch.testing.assert_close(out.loss, loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.kd_sum, kd, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.ce_sum, ce, rtol=1e-4, atol=1e-5)
    assert out.num_tokens.item() == mask.sum().item()
    assert_grads_close(got, want, dtype)
    assert torch.all(got[1][1031:] == 0)  # padded lm_head rows


@pytest.mark.parametrize("name", ["reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl"])
def test_every_divergence(name):
    """T = 1 here, so the CE shares the student's normalizer (the other CE branch of the kernel)."""
    out, (loss, _, _), got, want, _ = run_both(name, torch.float32, n=9, temperature=1.0, seed=1, chunk_size=4)
    torch.testing.assert_close(out.loss, loss, rtol=1e-4, atol=1e-5)
    assert_grads_close(got, want, torch.float32)


@pytest.mark.parametrize("name", ["forward_kl", "jsd"])
def test_vocab_of_whole_blocks_with_ce(name):
    """V = two kernel blocks exactly (no partial last block), CE at T != 1, gradient in both pass orders."""
    vocab = 2 * launch_config(torch.device(DEVICE))["BLOCK"]
    out, (loss, kd, ce), got, want, _ = run_both(name, torch.float32, n=7, vocab=vocab, seed=5, chunk_size=4)
    torch.testing.assert_close(out.loss, loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.ce_sum, ce, rtol=1e-4, atol=1e-5)
    assert_grads_close(got, want, torch.float32)
    assert torch.all(got[1][vocab:] == 0)


@pytest.mark.parametrize("teacher_as_logits", [False, True])
def test_taid_target_and_teacher_logits(teacher_as_logits):
    out, (loss, _, _), got, want, _ = run_both("forward_kl", torch.float32, n=9, taid_t=0.4, seed=2,
                                               teacher_as_logits=teacher_as_logits, chunk_size=5)
    torch.testing.assert_close(out.loss, loss, rtol=1e-4, atol=1e-5)
    assert_grads_close(got, want, torch.float32)


@pytest.mark.parametrize("name", ["forward_kl", "jsd"])
def test_chunk_step_matches_eager_step(name):
    """The kernel's per-chunk step (in-place gradient) against the eager step, bf16 logits, CE at T != 1."""
    gen = torch.Generator().manual_seed(3)
    zs = (torch.randn(6, 1031, generator=gen) * 3).to(DEVICE, torch.bfloat16)
    zt = (torch.randn(6, 1031, generator=gen) * 3).to(DEVICE, torch.bfloat16)
    mask = torch.tensor([1, 1, 0, 1, 0, 1], dtype=torch.bool, device=DEVICE)
    labels = torch.tensor([5, -100, 7, 1030, -100, 0], device=DEVICE)
    spec = DivergenceSpec(name, temperature=2.0, beta=0.3)
    got_z, want_z = zs.clone(), zs.clone()
    kd, ce = triton_chunk_step(got_z, zt, mask, labels, spec, 0.6, 0.4)
    kd_ref, ce_ref = eager_chunk_step(want_z, zt, mask, labels, spec, 0.6, 0.4)
    torch.testing.assert_close(kd, kd_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ce, ce_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_z.float(), want_z.float(), rtol=1e-2, atol=1e-2 * want_z.float().abs().max().item())
    assert torch.all(got_z[4] == 0)  # no divergence, no label: zero gradient


def test_tied_embeddings_accumulate():
    """lm_head tied to the input embedding: the loss gradient adds to the embedding's own gradient."""
    gen = torch.Generator().manual_seed(4)
    vocab, hidden, n = 300, 8, 10
    emb = (torch.randn(vocab, hidden, generator=gen) * 0.5).to(DEVICE).requires_grad_(True)
    proj = torch.randn(hidden, hidden, generator=gen).to(DEVICE)
    ids = torch.randint(0, vocab, (n,), generator=gen).to(DEVICE)
    teacher_logits = torch.randn(n, vocab, generator=gen).to(DEVICE)
    labels = torch.randint(0, vocab, (n,), generator=gen).to(DEVICE)
    mask = torch.ones(n, dtype=torch.bool, device=DEVICE)

    def forward(fused: bool):
        h = torch.tanh(emb[ids] @ proj)
        if fused:
            return fused_linear_divergence(h, emb, mask, labels, teacher_logits=teacher_logits, divergence="jsd",
                                           ce_weight=0.5, backend="triton", chunk_size=4).loss
        kd = F.jsd(h @ emb.t(), teacher_logits).sum()
        return 0.5 * kd + 0.5 * F.cross_entropy(h @ emb.t(), labels).sum()

    forward(True).backward()
    got = emb.grad.clone()
    emb.grad = None
    forward(False).backward()
    torch.testing.assert_close(got, emb.grad, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("beta, end", [(0.0, "forward_kl"), (1.0, "reverse_kl")])
def test_jsd_ends_are_the_kls(beta, end, monkeypatch):
    """jsd at beta = 0 / 1 on the fused-linear kernel is forward / reverse KL (TRL's GKD convention): the loss, its
    sums and both gradients against the KL reference on materialized logits."""
    monkeypatch.setitem(KNOBS, "jsd", {"beta": beta})
    out, _, got, _, _ = run_both("jsd", torch.float32, ce_weight=0.25)
    monkeypatch.setitem(KNOBS, "jsd", {"beta": 0.5})
    h, w, ht, wt, labels, mask = make(37, 16, 24, 1031, 9, torch.float32)
    hr, wr = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss, kd, _ = reference(hr, wr, ht, wt, labels, mask, 1031, end, 1.7, 0.25, 11.0)
    (loss * 1.3).backward()
    assert kd > 1.0
    torch.testing.assert_close(out.loss, loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.kd_sum, kd, rtol=1e-4, atol=1e-5)
    assert_grads_close(got, (hr.grad, wr.grad), torch.float32)
