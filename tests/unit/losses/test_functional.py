"""The eager divergences against independent float64 formulas, plus their defining properties and gradients."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kd.losses import functional as F

SHAPE = (3, 5, 11)  # two leading dims, odd vocab


def _logits(seed: int, scale: float = 3.0, shape=SHAPE) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen) * scale


def np_probs(logits: torch.Tensor, temperature: float) -> np.ndarray:
    """softmax(logits / T) in float64, written out: exp of shifted values over their sum."""
    z = logits.detach().double().numpy() / temperature
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_kl(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """sum_v a_v log(a_v / b_v), element by element."""
    return (a * np.log(a / b)).sum(axis=-1)


def reference(name: str, s: torch.Tensor, t: torch.Tensor, temperature: float, **kw) -> np.ndarray:
    """The textbook definition of each divergence, on float64 probabilities (p teacher, q student)."""
    p, q = np_probs(t, temperature), np_probs(s, temperature)
    if name == "forward_kl":
        return np_kl(p, q)
    if name == "reverse_kl":
        return np_kl(q, p)
    if name == "jsd":
        beta = kw["beta"]
        m = beta * p + (1 - beta) * q
        return beta * np_kl(p, m) + (1 - beta) * np_kl(q, m)
    if name == "tvd":
        return 0.5 * np.abs(p - q).sum(axis=-1)
    if name == "skew_kl":
        return np_kl(p, kw["alpha"] * p + (1 - kw["alpha"]) * q)
    if name == "skew_reverse_kl":
        return np_kl(q, kw["alpha"] * q + (1 - kw["alpha"]) * p)
    raise AssertionError(name)


CASES = [
    ("forward_kl", {}), ("reverse_kl", {}), ("tvd", {}),
    ("jsd", {"beta": 0.5}), ("jsd", {"beta": 0.2}), ("jsd", {"beta": 0.9}),
    ("skew_kl", {"alpha": 0.1}), ("skew_kl", {"alpha": 0.6}),
    ("skew_reverse_kl", {"alpha": 0.1}), ("skew_reverse_kl", {"alpha": 0.6}),
]


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
@pytest.mark.parametrize("name,kw", CASES)
def test_matches_textbook_formula(name, kw, temperature):
    s, t = _logits(1), _logits(2)
    got = F.DIVERGENCES[name](s, t, temperature=temperature, **kw)
    assert got.shape == SHAPE[:-1] and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), reference(name, s, t, temperature, **kw), rtol=1e-4, atol=1e-6)


def test_divergence_table_has_the_six_names():
    assert set(F.DIVERGENCES) == {"forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl"}


@pytest.mark.parametrize("name,kw", CASES)
def test_nonnegative_and_zero_when_equal(name, kw):
    s, t = _logits(3, scale=5.0), _logits(4, scale=5.0)
    assert (F.DIVERGENCES[name](s, t, temperature=1.3, **kw) >= -1e-6).all()
    same = F.DIVERGENCES[name](s, s.clone(), temperature=1.3, **kw)
    assert same.abs().max() < 1e-5


def test_jsd_symmetric_and_bounded_by_log2():
    s, t = _logits(5), _logits(6)
    np.testing.assert_allclose(F.jsd(s, t).numpy(), F.jsd(t, s).numpy(), rtol=1e-5, atol=1e-7)
    # Nearly disjoint distributions approach the bound log 2 without crossing it.
    far_s, far_t = _logits(7, scale=60.0), _logits(8, scale=60.0)
    value = F.jsd(far_s, far_t)
    assert (value <= math.log(2) + 1e-6).all()
    assert value.max() > 0.6  # the bound is approached, so the test would notice a wrong scale


def test_tvd_in_unit_interval():
    small = F.tvd(_logits(9), _logits(10))
    assert ((small >= 0) & (small <= 1)).all()
    far = F.tvd(_logits(11, scale=80.0), _logits(12, scale=80.0))
    assert ((far >= 0) & (far <= 1 + 1e-6)).all() and far.max() > 0.99


def test_skews_at_alpha_zero_are_the_plain_kls_and_zero_at_alpha_one():
    s, t = _logits(13), _logits(14)
    torch.testing.assert_close(F.skew_kl(s, t, alpha=0.0, temperature=2.0), F.forward_kl(s, t, temperature=2.0))
    torch.testing.assert_close(F.skew_reverse_kl(s, t, alpha=0.0, temperature=2.0), F.reverse_kl(s, t, temperature=2.0))
    s.requires_grad_(True)
    for fn in (F.skew_kl, F.skew_reverse_kl):
        value = fn(s, t, alpha=1.0)
        assert value.abs().max() < 1e-6
        # Still a function of the student (zero gradient), so a loss built on it can call backward.
        (grad,) = torch.autograd.grad(value.sum(), s)
        assert grad.abs().max() < 1e-6


@pytest.mark.parametrize("beta, end", [(0.0, "forward_kl"), (1.0, "reverse_kl")])
def test_jsd_ends_are_the_two_kls(beta, end):
    """TRL's GKD convention: beta = 0 is KL(p || q), beta = 1 is KL(q || p), values and gradients (not 0, as the
    mixture formula gives there). Extreme logits too: no NaN from a mixture that equals one side."""
    for scale in (3.0, 200.0):
        s, t = _logits(15, scale=scale), _logits(16, scale=scale)
        s_j, s_k = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
        got, want = F.jsd(s_j, t, beta=beta, temperature=1.5), F.DIVERGENCES[end](s_k, t, temperature=1.5)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert got.abs().max() > 0.1
        got.sum().backward()
        want.sum().backward()
        torch.testing.assert_close(s_j.grad, s_k.grad, rtol=0, atol=0)
    s, t = _logits(15), _logits(16)  # float64 textbook KL (finite at this scale)
    np.testing.assert_allclose(F.jsd(s, t, beta=beta).numpy(), reference(end, s, t, 1.0), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("beta, end", [(1e-6, "forward_kl"), (1.0 - 1e-6, "reverse_kl")])
def test_jsd_near_the_ends_is_the_end_scaled(beta, end):
    """Near an end JSD_beta is w times the end's KL (w = beta or 1 - beta) up to O(w^2): its gradient points the
    same way, so moving beta to 0 or 1 does not change what the student learns. Computed to fp32 precision at
    w = 1e-6 (log m - log q taken as one logaddexp, not a difference of two log-probabilities)."""
    w = min(beta, 1.0 - beta)
    s, t = _logits(19, scale=1.0, shape=(4, 257)), _logits(20, scale=1.0, shape=(4, 257))
    s_j, s_k = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    got, want = F.jsd(s_j, t, beta=beta, temperature=0.8), F.DIVERGENCES[end](s_k, t, temperature=0.8)
    torch.testing.assert_close(got / w, want, rtol=1e-4, atol=0)
    got.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(s_j.grad / w, s_k.grad, rtol=0, atol=1e-3 * s_k.grad.abs().max().item())


@pytest.mark.parametrize("name,kw", CASES)
def test_bf16_inputs_give_fp32_close_to_fp32(name, kw):
    s, t = _logits(17), _logits(18)
    fn = F.DIVERGENCES[name]
    got = fn(s.bfloat16(), t.bfloat16(), temperature=1.5, **kw)
    assert got.dtype == torch.float32
    # Exactly the fp32 computation on the bf16-rounded logits (the upcast happens before anything else) ...
    torch.testing.assert_close(got, fn(s.bfloat16().float(), t.bfloat16().float(), temperature=1.5, **kw))
    # ... and close to the full-precision result (bf16 keeps ~3 significant digits of the logits).
    np.testing.assert_allclose(got.numpy(), fn(s, t, temperature=1.5, **kw).numpy(), rtol=0.05, atol=0.02)


@pytest.mark.parametrize("name,kw", CASES)
def test_gradient_reaches_the_student_only(name, kw):
    s = _logits(19).requires_grad_(True)
    t = _logits(20).requires_grad_(True)  # even a teacher that requires grad must not get one
    F.DIVERGENCES[name](s, t, temperature=2.0, **kw).sum().backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0


@pytest.mark.parametrize("temperature", [1.0, 0.5, 3.0])
def test_forward_kl_gradient_is_q_minus_p_over_t(temperature):
    s = _logits(21).requires_grad_(True)
    t = _logits(22)
    grad_out = torch.rand(SHAPE[:-1], generator=torch.Generator().manual_seed(0)) + 0.5  # != 1 on purpose
    F.forward_kl(s, t, temperature=temperature).backward(grad_out)
    p, q = np_probs(t, temperature), np_probs(s, temperature)
    expected = grad_out.double().numpy()[..., None] * (q - p) / temperature
    np.testing.assert_allclose(s.grad.double().numpy(), expected, rtol=1e-4, atol=1e-7)


def test_teacher_minus_inf_entries_contribute_nothing():
    # A masked teacher vocabulary entry (-inf) has p = 0: forward KL ignores it, reverse KL becomes inf.
    s, t = _logits(23, shape=(4, 9)), _logits(24, shape=(4, 9))
    t_masked = t.clone()
    t_masked[:, 0] = float("-inf")
    s = s.requires_grad_(True)
    value = F.forward_kl(s, t_masked)
    p = np_probs(t[:, 1:], 1.0)
    q = np_probs(s, 1.0)
    expected = (p * np.log(p / q[:, 1:])).sum(-1)
    np.testing.assert_allclose(value.detach().numpy(), expected, rtol=1e-4, atol=1e-6)
    value.sum().backward()
    assert torch.isfinite(s.grad).all()
    assert torch.isinf(F.reverse_kl(s.detach(), t_masked)).all()
    assert torch.isfinite(F.jsd(s.detach(), t_masked)).all() and torch.isfinite(F.skew_kl(s.detach(), t_masked)).all()


def test_cross_entropy_per_token_and_zero_where_ignored():
    s = _logits(25)
    labels = torch.randint(0, SHAPE[-1], SHAPE[:-1], generator=torch.Generator().manual_seed(1))
    labels[0, :2] = -100
    labels[2, 4] = -100
    got = F.cross_entropy(s.bfloat16(), labels)
    assert got.shape == labels.shape and got.dtype == torch.float32
    q = np_probs(s.bfloat16().float(), 1.0)
    lab = labels.numpy()
    expected = np.zeros(lab.shape)
    for idx in np.ndindex(lab.shape):
        if lab[idx] != -100:
            expected[idx] = -math.log(q[idx][lab[idx]])
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_out_of_range_weights_rejected():
    s, t = _logits(26), _logits(27)
    with pytest.raises(ValueError):
        F.jsd(s, t, beta=1.5)
    with pytest.raises(ValueError):
        F.skew_kl(s, t, alpha=-0.1)
