"""The kernel checks at real sizes on a GPU (marked gpu; skipped without CUDA): values and gradients against the
eager reference, and the fused kernel's memory bound at the issue's first config."""
from __future__ import annotations

import pytest
import torch

from kd.losses import functional as F

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
pytest.importorskip("triton", reason="triton is not installed")

KNOBS = {"jsd": {"beta": 0.5}, "skew_kl": {"alpha": 0.1}, "skew_reverse_kl": {"alpha": 0.1}}
GIB = 1024 ** 3


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("taid_t", [None, 0.4])
@pytest.mark.parametrize("name", list(F.DIVERGENCES))
def test_dense_real_vocab(name, taid_t):
    from kd.ops import dense_divergence

    gen = torch.Generator(device="cuda").manual_seed(0)
    n, vocab = 1024, 128256
    student = (torch.randn(n, vocab, device="cuda", generator=gen) * 3).bfloat16()
    teacher = (torch.randn(n, vocab, device="cuda", generator=gen) * 3).bfloat16()
    mask = torch.rand(n, device="cuda", generator=gen) > 0.2
    grad_out = torch.rand(n, device="cuda", generator=gen) + 0.5
    sk = student.clone().requires_grad_(True)
    got = dense_divergence(sk, teacher, mask, divergence=name, temperature=1.5, taid_t=taid_t, backend="triton",
                           **KNOBS.get(name, {}))
    (got * grad_out).sum().backward()
    sr = student.clone().requires_grad_(True)
    target = teacher if taid_t is None else (1 - taid_t) * student.float() + taid_t * teacher.float()
    want = torch.where(mask, F.DIVERGENCES[name](sr, target, temperature=1.5, **KNOBS.get(name, {})), 0.0)
    (want * grad_out).sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
    assert rel_err(sk.grad, sr.grad) < 1e-2


@pytest.mark.parametrize("name", ["forward_kl", "jsd", "reverse_kl"])
def test_fused_real_vocab(name):
    from kd.ops import fused_linear_divergence

    gen = torch.Generator(device="cuda").manual_seed(1)
    n, hs, ht, vocab = 2048, 2048, 2048, 128256
    h = torch.randn(n, hs, device="cuda", generator=gen).bfloat16()
    w = (torch.randn(vocab + 64, hs, device="cuda", generator=gen) * hs ** -0.5).bfloat16()
    th = torch.randn(n, ht, device="cuda", generator=gen).bfloat16()
    tw = (torch.randn(vocab, ht, device="cuda", generator=gen) * ht ** -0.5).bfloat16()
    labels = torch.randint(0, vocab, (n,), device="cuda", generator=gen)
    labels[::7] = -100
    mask = labels != -100
    hk, wk = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out = fused_linear_divergence(hk, wk, mask, labels, teacher_hidden=th, teacher_weight=tw, divergence=name,
                                  temperature=2.0, ce_weight=0.1, normalizer=mask.sum(), vocab_size=vocab,
                                  backend="triton")
    (out.loss * 3.0).backward()
    hr, wr = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    zs = hr @ wr[:vocab].t()
    zt = th @ tw.t()
    kd = torch.where(mask, F.DIVERGENCES[name](zs, zt, temperature=2.0), 0.0).sum()
    ce = torch.where(labels != -100, F.cross_entropy(zs, labels), 0.0).sum()
    loss = (0.9 * kd + 0.1 * ce) / mask.sum()
    (loss * 3.0).backward()
    torch.testing.assert_close(out.loss, loss, rtol=2e-3, atol=1e-4)
    assert rel_err(hk.grad, hr.grad) < 2e-2
    assert rel_err(wk.grad, wr.grad) < 2e-2
    assert torch.all(wk.grad[vocab:] == 0)


def test_fused_memory_bound_at_issue_config():
    """(N, Hs, Ht, V) = (8192, 2048, 4096, 128256), bf16: at most 2 GiB beyond the inputs, gradients included."""
    from kd.ops import fused_linear_divergence

    n, hs, ht, vocab = 8192, 2048, 4096, 128256
    h = torch.randn(n, hs, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(vocab, hs, device="cuda", dtype=torch.bfloat16) * hs ** -0.5).requires_grad_(True)
    th = torch.randn(n, ht, device="cuda", dtype=torch.bfloat16)
    tw = torch.randn(vocab, ht, device="cuda", dtype=torch.bfloat16) * ht ** -0.5
    labels = torch.randint(0, vocab, (n,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fused_linear_divergence(h, w, labels >= 0, labels, teacher_hidden=th, teacher_weight=tw,
                                  divergence="forward_kl", normalizer=float(n), backend="triton")
    out.loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra <= 2 * GIB, f"peak extra memory {extra / GIB:.2f} GiB"
    assert torch.isfinite(w.grad.float()).all()
