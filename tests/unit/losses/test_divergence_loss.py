"""DivergenceLoss / CrossEntropyLoss: masking, CE mixing, sums (never means) and gradients, by hand computation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kd.losses import CrossEntropyLoss, DivergenceLoss, LossInputs

B, L, V = 2, 6, 13


def _batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(B, L, V, generator=gen) * 2
    t = torch.randn(B, L, V, generator=gen) * 2
    labels = torch.randint(0, V, (B, L), generator=gen)
    labels[0, :2] = -100  # e.g. a prompt
    labels[1, 5] = -100  # e.g. the last position of a document
    return s, t, labels


def _np_probs(x: torch.Tensor, temperature: float) -> np.ndarray:
    z = x.detach().double().numpy() / temperature
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _hand_forward_kl_and_ce(s, t, labels, temperature):
    """Per-token forward KL at T and CE at T = 1, written out in float64; lists of (kl, ce) over loss tokens only."""
    p, q, q1 = _np_probs(t, temperature), _np_probs(s, temperature), _np_probs(s, 1.0)
    out = []
    for b in range(B):
        for i in range(L):
            y = int(labels[b, i])
            if y == -100:
                continue
            kl = sum(p[b, i, v] * math.log(p[b, i, v] / q[b, i, v]) for v in range(V))
            out.append((kl, -math.log(q1[b, i, y])))
    return out


def test_ignored_tokens_contribute_nothing():
    s, t, labels = _batch()
    loss = DivergenceLoss("forward_kl", temperature=1.0, ce_weight=0.4)
    out = loss(LossInputs(s, t, labels))
    assert out.num_tokens.dtype == torch.long and int(out.num_tokens) == B * L - 3
    # Garbage (even NaN) at the ignored positions must not change anything.
    s2, t2 = s.clone(), t.clone()
    s2[0, :2] = float("nan")
    t2[1, 5] = 1e4
    out2 = loss(LossInputs(s2, t2, labels))
    torch.testing.assert_close(out2.loss_sum, out.loss_sum)
    assert int(out2.num_tokens) == int(out.num_tokens)


@pytest.mark.parametrize("ce_weight", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_ce_weight_mixing_matches_hand_computation(ce_weight, temperature):
    s, t, labels = _batch(1)
    out = DivergenceLoss("forward_kl", temperature=temperature, ce_weight=ce_weight)(LossInputs(s, t, labels))
    per_token = _hand_forward_kl_and_ce(s, t, labels, temperature)
    kd_sum = sum(k for k, _ in per_token)
    ce_sum = sum(c for _, c in per_token)
    assert out.loss_sum.dim() == 0 and out.loss_sum.dtype == torch.float32
    assert float(out.loss_sum) == pytest.approx((1 - ce_weight) * kd_sum + ce_weight * ce_sum, rel=1e-5)
    assert float(out.terms["kd"]) == pytest.approx(kd_sum, rel=1e-5)
    # The CE term is reported exactly when it is part of the loss.
    assert ("ce" in out.terms) == (ce_weight > 0)
    if ce_weight > 0:
        assert float(out.terms["ce"]) == pytest.approx(ce_sum, rel=1e-5)
    assert all(not v.requires_grad for v in out.terms.values())


def test_gradient_of_mixed_loss_is_closed_form():
    # d/ds [(1 - w) KL(p || q_T) + w CE] = (1 - w) (q_T - p) / T + w (q_1 - onehot(y)), on loss tokens; 0 elsewhere.
    s, t, labels = _batch(2)
    w, temperature = 0.25, 1.7
    s = s.requires_grad_(True)
    DivergenceLoss("forward_kl", temperature=temperature, ce_weight=w)(LossInputs(s, t, labels)).loss_sum.backward()
    p, q, q1 = _np_probs(t, temperature), _np_probs(s, temperature), _np_probs(s, 1.0)
    onehot = np.zeros((B, L, V))
    mask = (labels != -100).numpy()
    for b, i in zip(*np.nonzero(mask)):
        onehot[b, i, labels[b, i]] = 1.0
    expected = ((1 - w) * (q - p) / temperature + w * (q1 - onehot)) * mask[..., None]
    np.testing.assert_allclose(s.grad.double().numpy(), expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name,kw", [("forward_kl", {}), ("jsd", {"beta": 0.3}), ("tvd", {}),
                                     ("skew_reverse_kl", {"alpha": 0.2})])
def test_loss_sum_is_a_sum_not_a_mean(name, kw):
    s, t, labels = _batch(3)
    loss = DivergenceLoss(name, temperature=1.5, ce_weight=0.2, **kw)
    one = loss(LossInputs(s, t, labels))
    two = loss(LossInputs(torch.cat([s, s]), torch.cat([t, t]), torch.cat([labels, labels])))
    torch.testing.assert_close(two.loss_sum, 2 * one.loss_sum)
    assert int(two.num_tokens) == 2 * int(one.num_tokens)
    for key in one.terms:
        torch.testing.assert_close(two.terms[key], 2 * one.terms[key])


def test_all_ignored_batch_sums_to_zero_and_backward_works():
    s, t, labels = _batch(4)
    s = s.requires_grad_(True)
    out = DivergenceLoss("reverse_kl")(LossInputs(s, t, torch.full_like(labels, -100)))
    assert float(out.loss_sum.detach()) == 0.0 and int(out.num_tokens) == 0
    out.loss_sum.backward()
    assert s.grad.abs().max() == 0


@pytest.mark.parametrize("kernel", ["eager", "torch"])
@pytest.mark.parametrize("beta, end", [(0.0, "forward_kl"), (1.0, "reverse_kl")])
def test_jsd_at_the_ends_trains_as_the_kls(kernel, beta, end):
    """jsd with beta = 0 / 1 is forward / reverse KL (TRL's convention), not a loss of 0 that trains nothing."""
    s, t, labels = _batch(5)
    s_j, s_k = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    got = DivergenceLoss("jsd", beta=beta, kernel=kernel, temperature=1.3)(LossInputs(s_j, t, labels))
    want = DivergenceLoss(end, kernel="eager", temperature=1.3)(LossInputs(s_k, t, labels))
    assert float(got.loss_sum.detach()) > 0.1
    torch.testing.assert_close(got.loss_sum, want.loss_sum)
    got.loss_sum.backward()
    want.loss_sum.backward()
    torch.testing.assert_close(s_j.grad, s_k.grad)


def test_bf16_logits_give_fp32_sums():
    s, t, labels = _batch(6)
    out = DivergenceLoss("forward_kl", ce_weight=0.5)(LossInputs(s.bfloat16(), t.bfloat16(), labels))
    ref = DivergenceLoss("forward_kl", ce_weight=0.5)(LossInputs(s.bfloat16().float(), t.bfloat16().float(), labels))
    assert out.loss_sum.dtype == torch.float32
    torch.testing.assert_close(out.loss_sum, ref.loss_sum)


def test_teacher_required():
    s, _, labels = _batch(7)
    with pytest.raises(ValueError, match="teacher"):
        DivergenceLoss("forward_kl")(LossInputs(s, None, labels))


def test_bad_divergence_kwargs_rejected_at_construction():
    with pytest.raises(TypeError, match="beta"):
        DivergenceLoss("forward_kl", beta=0.5)
    with pytest.raises(TypeError):
        DivergenceLoss("jsd", alpha=0.5)


def test_no_state_in_state_dict():
    loss = DivergenceLoss("jsd", beta=0.5)
    assert loss.state_dict() == {} and list(loss.parameters()) == []
    assert loss.needs_teacher and not loss.needs_hidden_states


def test_cross_entropy_loss_needs_no_teacher():
    s, _, labels = _batch(8)
    loss = CrossEntropyLoss()
    assert loss.needs_teacher is False
    out = loss(LossInputs(s, None, labels))
    q = _np_probs(s, 1.0)
    expected = sum(-math.log(q[b, i, labels[b, i]]) for b in range(B) for i in range(L) if labels[b, i] != -100)
    assert float(out.loss_sum) == pytest.approx(expected, rel=1e-5)
    assert float(out.terms["ce"]) == pytest.approx(expected, rel=1e-5)
    assert int(out.num_tokens) == int((labels != -100).sum())


@pytest.mark.parametrize("divergence, knobs", [("forward_kl", {}), ("jsd", {"beta": 0.3}), ("skew_reverse_kl", {"alpha": 0.2})])
def test_kernel_path_matches_eager_spec(divergence, knobs):
    """The default (chunked torch / Triton) path gives the eager formula's loss and gradient."""
    torch.manual_seed(3)
    student = torch.randn(2, 7, 53, requires_grad=True)
    teacher = torch.randn(2, 7, 53)
    labels = torch.randint(0, 53, (2, 7))
    labels[0, :3] = -100
    grads, sums = [], []
    for kernel in ("eager", "torch"):
        s = student.detach().clone().requires_grad_(True)
        out = DivergenceLoss(divergence, temperature=1.5, kernel=kernel, **knobs)(LossInputs(s, teacher, labels))
        (out.loss_sum * 0.7).backward()
        grads.append(s.grad)
        sums.append(out.loss_sum.detach())
    torch.testing.assert_close(sums[0], sums[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
