"""DivergenceLoss and TAIDLoss on a stored top-k teacher (LossInputs.teacher_sparse): at k = V they equal the same
loss objects on the dense teacher logits (loss_sum, terms and gradient), on every kernel and on the fused-linear
path; the recipe's loss.sparse_tail reaches them."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from kd.config.schema import LossConfig, TAIDConfig
from kd.errors import UserError
from kd.losses import FusedLinearInputs, LossContext, LossInputs, SparseTarget, build_loss
from kd.losses import functional as F
from kd.losses.divergence import DivergenceLoss

B, L, V, H = 2, 5, 29, 8
KERNELS = ["eager", "torch"] + (["triton"] if importlib.util.find_spec("triton") else [])
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _batch(seed=0, temperature=1.0):
    """Student logits, teacher logits, labels, and the teacher's store at k = V (ids shuffled, tail -inf)."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(B, L, V, generator=gen) * 2
    t = torch.randn(B, L, V, generator=gen) * 2
    labels = torch.randint(0, V, (B, L), generator=gen)
    labels[0, :2] = -100
    ids = torch.stack([torch.randperm(V, generator=gen) for _ in range(B * L)]).view(B, L, V)
    lp = torch.log_softmax(t / temperature, -1).gather(-1, ids)
    return s, t, labels, SparseTarget(ids, lp, torch.full((B, L), float("-inf")))


def _run(loss, s, labels, *, teacher_logits=None, teacher_sparse=None):
    leaf = s.clone().requires_grad_(True)
    out = loss(LossInputs(student_logits=leaf, teacher_logits=teacher_logits, labels=labels,
                          teacher_sparse=teacher_sparse, grad_scale=0.25))
    (out.loss_sum * 0.25).backward()
    return out, leaf.grad


def _same(a, b):
    (out_a, grad_a), (out_b, grad_b) = a, b
    torch.testing.assert_close(out_a.loss_sum, out_b.loss_sum, rtol=1e-5, atol=1e-5)
    assert set(out_a.terms) == set(out_b.terms)
    for name in out_a.terms:
        torch.testing.assert_close(out_a.terms[name], out_b.terms[name], rtol=1e-5, atol=1e-5)
    assert int(out_a.num_tokens) == int(out_b.num_tokens)
    torch.testing.assert_close(grad_a, grad_b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("name,kw", [("forward_kl", {}), ("jsd", {"beta": 0.3}), ("skew_reverse_kl", {"alpha": 0.2})])
def test_divergence_loss_sparse_at_full_vocabulary_equals_dense(kernel, name, kw):
    if kernel == "triton" and name != "jsd":
        pytest.skip("interpreter: one divergence is enough here (tests/kernels cover the kernel)")
    s, t, labels, target = _batch(1, temperature=1.5)
    loss = DivergenceLoss(name, temperature=1.5, ce_weight=0.2, kernel=kernel, **kw)
    assert "sparse" in loss.teacher_signals and "dense" in loss.teacher_signals
    _same(_run(loss, s, labels, teacher_sparse=target), _run(loss, s, labels, teacher_logits=t))


def _taid(kernel, ce_weight=0.0, tail="bucket"):
    cfg = LossConfig(name="taid", ce_weight=ce_weight, temperature=1.3, kernel=kernel, sparse_tail=tail,
                     taid=TAIDConfig(t_start=0.35))
    return build_loss(cfg, LossContext(total_steps=10))


@pytest.mark.parametrize("kernel", KERNELS)
def test_taid_sparse_at_full_vocabulary_equals_dense(kernel):
    s, t, labels, target = _batch(2, temperature=1.3)
    loss = _taid(kernel, ce_weight=0.1)
    assert "sparse" in loss.teacher_signals
    for t_now in (0.35, 0.9) if kernel != "triton" else (0.35,):
        loss.t = t_now
        _same(_run(loss, s, labels, teacher_sparse=target), _run(loss, s, labels, teacher_logits=t))


@pytest.mark.parametrize("loss_factory,temperature", [
    (lambda: DivergenceLoss("reverse_kl", temperature=1.5, ce_weight=0.3, kernel="torch"), 1.5),
    (lambda: _taid("torch", ce_weight=0.3), 1.3),
])
def test_fused_linear_sparse_at_full_vocabulary_equals_dense_fused(loss_factory, temperature):
    """fused_linear_loss with teacher_sparse vs with the teacher's logits: loss and both gradients."""
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(B, L, H, generator=gen)
    w = torch.randn(V + 3, H, generator=gen)  # padded past the shared vocabulary
    t = torch.randn(B, L, V, generator=gen) * 2
    _, _, labels, _ = _batch(3)
    ids = torch.stack([torch.randperm(V, generator=gen) for _ in range(B * L)]).view(B, L, V)
    lp = torch.log_softmax(t / temperature, -1).gather(-1, ids)
    target = SparseTarget(ids, lp, torch.full((B, L), float("-inf")))
    results = []
    for kwargs in ({"teacher_sparse": target}, {"teacher_logits": t}):
        loss = loss_factory()
        hl, wl = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        out = loss.fused_linear_loss(FusedLinearInputs(student_hidden=hl, student_weight=wl, labels=labels,
                                                       vocab_size=V, **kwargs))
        (out.loss_sum * 0.5).backward()
        results.append((out, hl.grad, wl.grad))
    (a, ha, wa), (b, hb, wb) = results
    torch.testing.assert_close(a.loss_sum, b.loss_sum, rtol=1e-5, atol=1e-5)
    assert set(a.terms) == set(b.terms)
    torch.testing.assert_close(ha, hb, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(wa, wb, rtol=1e-4, atol=1e-5)


def test_recipe_sparse_tail_reaches_the_losses():
    """loss.sparse_tail: renormalize gives the renormalized formula (k < V: it differs from the bucket one)."""
    s, _, labels, full = _batch(4)
    k = 6
    target = SparseTarget(full.ids[..., :k], full.logprobs[..., :k],
                          torch.logsumexp(full.logprobs[..., k:], -1))
    mask = labels != -100
    for tail in ("bucket", "renormalize"):
        div = build_loss(LossConfig(name="tvd", kernel="torch", sparse_tail=tail))
        assert div.sparse_tail == tail
        assert _taid("torch", tail=tail).sparse_tail == tail
        got, _ = _run(div, s, labels, teacher_sparse=target)
        want = torch.where(mask, F.sparse_divergence(s, target.ids, target.logprobs, target.tail_logprob,
                                                     divergence="tvd", tail=tail), 0.0).sum()
        torch.testing.assert_close(got.loss_sum, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(Exception, match="sparse_tail"):
        LossConfig(name="tvd", sparse_tail="drop")
    with pytest.raises(UserError, match="sparse_tail"):
        DivergenceLoss("tvd", sparse_tail="drop")


def test_no_teacher_signal_is_a_clear_error():
    s, _, labels, _ = _batch(5)
    with pytest.raises(ValueError, match="teacher_logits or teacher_sparse"):
        DivergenceLoss("forward_kl")(LossInputs(student_logits=s, teacher_logits=None, labels=labels))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("name,kw", [("reverse_kl", {}), ("jsd", {"beta": 1.0})])
def test_store_filler_off_the_mask_leaves_the_gradient_finite(kernel, name, kw):
    """Ignored positions carry the store's filler (ids 0..k-1, uniform log-probs, tail -inf), where the reverse KLs
    are +inf: the loss and the gradient stay finite, and equal those with any other target there."""
    s, _, labels, full = _batch(6)
    k = 4
    target = SparseTarget(full.ids[..., :k].clone(), full.logprobs[..., :k].clone(),
                          torch.logsumexp(full.logprobs[..., k:], -1))
    other = SparseTarget(target.ids.clone(), target.logprobs.clone(), target.tail_logprob.clone())
    off = labels == -100
    target.ids[off] = torch.arange(k)
    target.logprobs[off] = -torch.log(torch.tensor(float(k)))
    target.tail_logprob[off] = float("-inf")
    loss = DivergenceLoss(name, ce_weight=0.1, kernel=kernel, **kw)
    (out, grad), (out_other, grad_other) = (_run(loss, s, labels, teacher_sparse=t) for t in (target, other))
    assert torch.isfinite(out.loss_sum) and torch.isfinite(grad).all()
    torch.testing.assert_close(out.loss_sum, out_other.loss_sum)
    torch.testing.assert_close(grad, grad_other)
