"""kd.ops.dense_loss (loss, CE and gradient in one pass) on both backends against the eager spec, and the layering.

The Triton backend runs in Triton's interpreter on CPU (TRITON_INTERPRET=1, tests/conftest.py), so shapes are small.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from kd.losses import functional as F
from kd.ops import dense_loss

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KNOBS = {"jsd": {"beta": 0.3}, "skew_kl": {"alpha": 0.2}, "skew_reverse_kl": {"alpha": 0.2}}
BACKENDS = ["torch"] + (["triton"] if __import__("importlib").util.find_spec("triton") else [])
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def make(shape, vocab, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    s = (torch.randn(*shape, vocab, generator=gen) * 2).to(DEVICE, dtype)
    t = (torch.randn(*shape, vocab, generator=gen) * 2).to(DEVICE, dtype)
    labels = torch.randint(0, vocab, shape, generator=gen).to(DEVICE)
    labels.view(-1)[::4] = -100  # ignored rows
    return s, t, labels


def reference(s, t, labels, name, temperature, ce_weight, knobs, taid_t=None):
    """(1 - w) sum_masked D + w sum_labelled CE, by kd.losses.functional (TAID: the mixed logits built here)."""
    mask = labels != -100
    target = t if taid_t is None else (1.0 - taid_t) * s.detach().float() + taid_t * t.float()
    kd = torch.where(mask, F.DIVERGENCES[name](s, target, temperature=temperature, **knobs), 0.0).sum()
    ce = torch.where(mask, F.cross_entropy(s, labels), 0.0).sum()
    return (1.0 - ce_weight) * kd + ce_weight * ce, kd, ce


def run(backend, name, dtype=torch.float32, shape=(3, 7), vocab=131, temperature=1.7, ce_weight=0.25,
        grad_scale=0.125, grad_output=0.125, taid_t=None, knobs=None, seed=0):
    knobs = KNOBS.get(name, {}) if knobs is None else knobs
    s, t, labels = make(shape, vocab, dtype, seed)
    sk, sr = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    out = dense_loss(sk, t, labels != -100, labels, divergence=name, temperature=temperature, ce_weight=ce_weight,
                     grad_scale=grad_scale, taid_t=taid_t, backend=backend, **knobs)
    (out.loss * grad_output).backward()
    loss, kd, ce = reference(sr, t, labels, name, temperature, ce_weight, knobs, taid_t)
    (loss * grad_output).backward()
    torch.testing.assert_close(out.loss, loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.kd_sum, kd, rtol=1e-4, atol=1e-5)
    if ce_weight > 0:
        torch.testing.assert_close(out.ce_sum, ce, rtol=1e-4, atol=1e-5)
    assert sk.grad.dtype == dtype
    g, r = sk.grad.float(), sr.grad.float()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(g, r, rtol=tol, atol=tol * r.abs().max().item())
    assert torch.all(g[labels == -100] == 0)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(F.DIVERGENCES))
def test_every_divergence_with_ce(backend, name):
    """[B, L, V] input, odd V, ignored rows, T != 1, CE term, gradient stored at the expected scale."""
    run(backend, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_output_other_than_the_scale_rescales(backend, dtype):
    """grad_output != grad_scale (fp16 loss scaling, a caller that does not know the scale) and grad_scale=None."""
    run(backend, "forward_kl", dtype=dtype, grad_scale=0.125, grad_output=3.0)
    run(backend, "jsd", dtype=dtype, grad_scale=None, grad_output=0.7, ce_weight=0.0, temperature=1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_taid_target_and_shifted_view(backend):
    """TAID with CE at T != 1, and the trainer's shifted, vocab-cut [B, L-1, :V] view of wider logits."""
    run(backend, "forward_kl", taid_t=0.4, seed=3)
    s, t, labels = make((2, 6), 140, torch.float32, seed=4)
    sk = s.clone().requires_grad_(True)
    lab = labels[:, 1:]
    out = dense_loss(sk[:, :-1], t[:, :-1], lab != -100, lab, divergence="reverse_kl", vocab_size=131,
                     ce_weight=0.5, grad_scale=0.5, backend=backend)
    (out.loss * 0.5).backward()
    sr = s.clone().requires_grad_(True)
    loss, _, _ = reference(sr[:, :-1, :131], t[:, :-1, :131], lab, "reverse_kl", 1.0, 0.5, {})
    (loss * 0.5).backward()
    torch.testing.assert_close(out.loss, loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sk.grad, sr.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta, end", [(1e-6, "forward_kl"), (1.0 - 1e-6, "reverse_kl")])
def test_jsd_near_the_ends_is_the_end_scaled(backend, beta, end):
    """jsd at beta = 1e-6 / 1 - 1e-6 is 1e-6 x forward / reverse KL, value and gradient, to fp32 precision."""
    s, t, labels = make((4,), 257, torch.float32, seed=5)
    s, t = s / 2, t / 2
    mask = labels != -100
    sk, sr = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    out = dense_loss(sk, t, mask, labels, divergence="jsd", beta=beta, temperature=0.8, grad_scale=1e6,
                     backend=backend)
    (out.loss * 1e6).backward()
    want = torch.where(mask, F.DIVERGENCES[end](sr, t, temperature=0.8), 0.0).sum()
    want.backward()
    torch.testing.assert_close(out.loss * 1e6, want, rtol=1e-4, atol=0)
    torch.testing.assert_close(sk.grad, sr.grad, rtol=0, atol=1e-3 * sr.grad.abs().max().item())


def test_backward_twice_is_refused():
    s, t, labels = make((5,), 33, torch.float32)
    sk = s.clone().requires_grad_(True)
    out = dense_loss(sk, t, labels != -100, labels, divergence="forward_kl", backend="torch")
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward twice"):
        out.loss.backward()


def test_kd_ops_imports_nothing_from_kd_losses():
    """kd.ops is the lower layer: what it shares with kd.losses lives in kd.ops.spec (no import cycle)."""
    ops = Path(__file__).resolve().parents[2] / "kd" / "ops"
    pattern = re.compile(r"^\s*(from\s+kd\.losses|import\s+kd\.losses|from\s+kd\s+import\s+losses)", re.M)
    offenders = [p.name for p in sorted(ops.rglob("*.py")) if pattern.search(p.read_text())]
    assert not offenders, f"kd/ops imports kd.losses in {offenders}"
    assert set(F.DIVERGENCES) == set(__import__("kd.ops.spec", fromlist=["x"]).DIVERGENCE_NAMES)
